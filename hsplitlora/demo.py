"""`hsplitlora demo`: a server and K heterogeneous client processes on 127.0.0.1, end to end.

The demo is a supervisor: it starts `hsplitlora server` and `hsplitlora client` as separate
processes (each client gets only its own shard, as a file), shows one progress line per client,
then evaluates the merged model the server saved against the base model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from hsplitlora.cost import ModelDims, StepShape
from hsplitlora.data import default_e2e_dir, load_examples, shard
from hsplitlora.finetune import EvalConfig, evaluate, split_eval, spread
from hsplitlora.lora import Target, lora_layer
from hsplitlora.models import DEFAULT_MODEL, load_model
from hsplitlora.planner import PlannerConfig
from hsplitlora.report import metrics_table, table
from hsplitlora.simulate import device_budgets

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """`hsplitlora demo` options."""

    model: str = DEFAULT_MODEL
    data: Path = field(default_factory=default_e2e_dir)
    clients: int = 5
    rounds: int = 3
    local_steps: int = 4
    batch_size: int = 4
    max_len: int = 128
    budget_spread: float = 4.0
    eval: EvalConfig = field(default_factory=EvalConfig)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc, timeout_s: float = 300.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        code = proc.poll() if hasattr(proc, "poll") else proc.returncode  # subprocess or asyncio process
        if code is not None:
            raise RuntimeError(f"the server exited with status {code} before it was ready")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the server did not answer {url}/healthz within {timeout_s:.0f} s")


async def _supervise(cfg: DemoConfig, workdir: Path) -> dict:
    model_cfg = load_model(cfg.model)[0].config
    dims, shape = ModelDims.from_config(model_cfg), StepShape(cfg.batch_size, cfg.max_len)
    train, _ = split_eval(Path(cfg.data), load_examples(cfg.data), seed=0)
    shards = shard(train, cfg.clients, iid=False)
    budgets = device_budgets(dims, shape, cfg.clients, cfg.budget_spread, PlannerConfig())
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    py = [sys.executable, "-m", "hsplitlora"]
    # The server does most of the compute (every client's remaining blocks) and keeps torch's
    # threads; the K clients, mostly waiting on it, get one thread each.
    client_env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = await asyncio.create_subprocess_exec(
        *py, "server", "--model", cfg.model, "--port", str(port), "--state", str(workdir / "state"),
        "--rounds", str(cfg.rounds), "--clients-per-round", str(cfg.clients), "--local-steps", str(cfg.local_steps),
        "--batch-size", str(cfg.batch_size), "--max-len", str(cfg.max_len),
        stdout=asyncio.subprocess.DEVNULL, stderr=open(workdir / "server.log", "wb"))
    try:
        await asyncio.get_running_loop().run_in_executor(None, _wait_healthy, url, server)
        procs, bars, rounds = [], [], {}
        for i, (examples, budget) in enumerate(zip(shards, budgets)):
            data = workdir / f"client{i}.jsonl"
            data.write_text("".join(json.dumps({"prompt": e.prompt, "completion": e.completion}) + "\n"
                                    for e in examples))
            procs.append(await asyncio.create_subprocess_exec(
                *py, "client", "--server", url, "--data", str(data), "--memory-budget", str(budget.memory_bytes),
                "--relative-speed", f"{budget.memory_bytes / budgets[0].memory_bytes:.3f}", "--rounds", str(cfg.rounds),
                "--threads", "1", "--progress-json", stdout=asyncio.subprocess.PIPE,
                stderr=open(workdir / f"client{i}.log", "wb"), env=client_env))
            bars.append(tqdm(total=cfg.rounds * cfg.local_steps, desc=f"client{i}", unit="step", position=i,
                             leave=True))

        async def follow(i: int, proc) -> None:
            async for line in proc.stdout:
                event = json.loads(line)
                if event["event"] == "registered":
                    bars[i].set_description(f"client{i} split {event['split']:>2}")
                elif event["event"] == "step":
                    bars[i].update(1)
                    bars[i].set_postfix(round=event["round"], loss=f"{event['loss']:.3f}")
                elif event["event"] == "round":
                    rounds.setdefault(event["round"], []).append(event)
            if await proc.wait() != 0:
                raise RuntimeError(f"client{i} failed (status {proc.returncode}); see {workdir / f'client{i}.log'}")

        try:
            await asyncio.gather(*(follow(i, p) for i, p in enumerate(procs)))
        finally:
            for bar in bars:
                bar.close()
            for p in procs:
                if p.returncode is None:
                    p.kill()
        with urllib.request.urlopen(url + "/v1/status", timeout=10) as r:
            status = json.loads(r.read())
    finally:
        server.terminate()
        await server.wait()
    return {"status": status, "rounds": rounds}


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo; returns plans, per-round numbers and before/after evaluation."""
    model, tokenizer = load_model(cfg.model)
    _, items = split_eval(Path(cfg.data), load_examples(cfg.data), seed=0)
    log.info("evaluating the base model before training")
    before = evaluate(model, tokenizer, items, cfg.eval, cfg.max_len)
    with tempfile.TemporaryDirectory(prefix="hsplitlora-demo-") as tmp:
        workdir = Path(tmp)
        started = time.perf_counter()
        run = asyncio.run(_supervise(cfg, workdir))
        seconds = time.perf_counter() - started
        from safetensors.torch import load_file

        deltas = load_file(str(workdir / "state" / "deltas" / "merged.safetensors"))
    for key, delta in deltas.items():
        t = Target.parse(key)
        lora_layer(model, t).add_to_weight(t.proj, delta)
    after = evaluate(model, tokenizer, items, cfg.eval, cfg.max_len)
    gen_items = spread(items, cfg.eval.generate_items)
    return {**run, "train_seconds": seconds, "before": before.summary(), "after": after.summary(),
            "samples": [{"prompt": it.prompt, "before": b, "after": a, "reference": it.references[0]}
                        for it, b, a in zip(gen_items, before.outputs, after.outputs)]}


def print_demo_report(result: dict) -> None:
    print("\nper-client plans (from the server's /v1/status)")
    print(table(["client", "budget MB", "split", "device adapters", "predicted MB", "last loss"],
                [[c["id"], f"{c['budget_mb']:.0f}", c["split"], c["device_adapters"], f"{c['predicted_memory_mb']:.0f}",
                  f"{c['loss']:.3f}" if c["loss"] is not None else "-"]
                 for c in sorted(result["status"]["clients"], key=lambda c: c["budget_mb"])]))
    print("\nper round (means over clients)")
    rows = []
    for number, events in sorted(result["rounds"].items(), key=lambda kv: int(kv[0])):
        rows.append([number, sum(e["loss"] for e in events) / len(events), f"{max(e['seconds'] for e in events):.0f}",
                     f"{sum(e['bytes_up'] for e in events) / 1e6:.1f}", f"{sum(e['bytes_down'] for e in events) / 1e6:.1f}"])
    print(table(["round", "train loss", "seconds", "MB up (all)", "MB down (all)"], rows))
    print(f"\nfederated training took {result['train_seconds']:.0f} s\n")
    print(metrics_table({"before": result["before"], "after": result["after"]}))
    for sample in result["samples"][:2]:
        print(f"\n{sample['prompt']}\n  before:    {sample['before']}\n  after:     {sample['after']}"
              f"\n  reference: {sample['reference']}")
