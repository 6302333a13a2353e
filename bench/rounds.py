"""Benchmark: what closing a round costs when many more clients are registered than take part.

    .venv/bin/python bench/rounds.py [--participants 32] [--registered 1000] [--rounds 3]

A real server (in this process, on 127.0.0.1, the tiny Llama model: this measures the control
plane, not the model) and `--participants` SDK clients training rounds together. First the
participants are the only registered clients; then `--registered` minus them register as well
(through `POST /v1/register`, as devices would) and stay quiet, and the same participants train
the same number of rounds. Per round it reads the server's own timing of the close (the
`hsplitlora_aggregation_seconds` histogram: aggregation, merge, re-planning, the round's update
written) and the bytes of the round's files. The ratio (crowded / alone) of the medians is the
number; before the server derived replies from one shared update, a round wrote a reply for every
registered client and re-planned each of them, and the ratio grew with the registrations.
Raw results go to docs/results/rounds.json, the table to the "rounds" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from edge_sdk.client import AsyncClient
from hsplitlora.data import default_e2e_dir, load_e2e_train, shard
from hsplitlora.report import table
from server.app import STATE, make_app
from server.config import ServerConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods import ROOT, replace_section  # noqa: E402


def _close_seconds(state) -> float:
    """The sum of the server's aggregation-seconds histogram so far."""
    for metric in state.monitor.aggregation_seconds.collect():
        for sample in metric.samples:
            if sample.name.endswith("_sum"):
                return sample.value
    return 0.0


async def _rounds(state, clients, rounds: int) -> list[tuple[float, int]]:
    """(close seconds, bytes of the round's files) of each of `rounds` rounds the clients train."""
    out = []
    for _ in range(rounds):
        before = _close_seconds(state)
        await asyncio.gather(*(c.train_round() for c in clients))
        number = state.round - 1
        directory = state.cfg.state / "rounds" / str(number)
        out.append((_close_seconds(state) - before, sum(p.stat().st_size for p in directory.iterdir())))
    return out


async def measure(participants: int, registered: int, rounds: int) -> dict:
    shards = shard(load_e2e_train(default_e2e_dir())[: 10 * participants], participants, iid=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ServerConfig(model="tiny-llama", state=Path(tmp) / "state", local_steps=1, batch_size=2, max_len=400,
                           clients_per_round=participants, open_registration=True, keep_rounds=2 * rounds + 1,
                           rate_per_client="100000/second", rate_per_address="100000/second")
        app = make_app(cfg)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = "http://127.0.0.1:%d" % runner.addresses[0][1]
        state = app[STATE]
        clients = [AsyncClient(url, shards[i], memory_budget=40e6) for i in range(participants)]
        try:
            for c in clients:
                await c.register()
            alone = await _rounds(state, clients, rounds)
            start = time.perf_counter()
            async with aiohttp.ClientSession() as s:
                for _ in range(registered - participants):
                    async with s.post(url + "/v1/register",
                                      json={"profile": {"memory_bytes": 40e6}, "examples": 4}) as r:
                        assert r.status == 200, await r.text()
            registering = time.perf_counter() - start
            crowded = await _rounds(state, clients, rounds)
        finally:
            for c in clients:
                await c.close()
            await runner.cleanup()
    return {"participants": participants, "registered": registered, "rounds": rounds,
            "alone": [{"close_s": round(t, 4), "bytes": b} for t, b in alone],
            "crowded": [{"close_s": round(t, 4), "bytes": b} for t, b in crowded],
            "registering_s": round(registering, 2)}


def report(result: dict) -> str:
    def med(key, part):
        return statistics.median(r[key] for r in result[part])

    rows = [[f"{result['participants']} registered", f"{med('close_s', 'alone'):.3f}", f"{med('bytes', 'alone') / 2**20:.2f}"],
            [f"{result['registered']} registered", f"{med('close_s', 'crowded'):.3f}",
             f"{med('bytes', 'crowded') / 2**20:.2f}"],
            ["ratio", f"{med('close_s', 'crowded') / med('close_s', 'alone'):.2f}",
             f"{med('bytes', 'crowded') / med('bytes', 'alone'):.2f}"]]
    return "\n".join([
        "## Closing a round with many registered clients (`bench/rounds.py`)", "",
        f"{result['participants']} SDK clients train {result['rounds']} rounds (tiny Llama, 1 local step of batch 2) "
        f"with only themselves registered, then again with {result['registered']} registered "
        f"({result['registered'] - result['participants']} quiet ones, registered over HTTP in "
        f"{result['registering_s']:.0f} s). Medians over the rounds of the server's own close time "
        f"(`hsplitlora_aggregation_seconds`) and of the bytes a round writes; measured "
        f"{time.strftime('%Y-%m-%d')} on {platform.machine()} with {os.cpu_count()} CPUs.", "",
        table(["clients registered", "close (s)", "round files (MiB)"], rows), ""])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--participants", type=int, default=32)
    p.add_argument("--registered", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "rounds.json")
    p.add_argument("--no-doc", action="store_true", help="write the JSON only, not docs/benchmarks.md")
    args = p.parse_args()
    result = asyncio.run(measure(args.participants, args.registered, args.rounds))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    body = report(result)
    if not args.no_doc:
        replace_section(ROOT / "docs" / "benchmarks.md", "rounds", body)
    print(body)


if __name__ == "__main__":
    main()
