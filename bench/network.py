"""Benchmark: the networked split step against single-process PEFT LoRA, concurrency, wire formats.

    .venv/bin/python bench/network.py [--model smollm2-135m] [--steps 8] [--pairs 3]

1. Tokens per second of one networked client + server on 127.0.0.1 divided by single-process
   PEFT LoRA on the same model, batches and ranks (q, v at rank 8 in every block, the server
   started with `--projections q,v`; split 4). PEFT trains exactly the batches the client's data
   stream yields. PEFT timings and networked rounds alternate (--pairs rounds), each round against
   the mean of the PEFT timings on either side of it: the machine's speed drifts by tens of
   percent within a minute here.
2. Server throughput (split steps per second, all clients together) with 1, 4 and 8 concurrent
   clients.
3. Bytes per step (request + reply) and the training loss after the same steps for each wire
   format (fp32, fp16, int8), from identical starting points and data.
Writes the "network" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from peft import LoraConfig, get_peft_model

from edge_sdk.client import AsyncClient
from hsplitlora.cost import ModelDims, StepShape, device_memory
from hsplitlora.data import default_e2e_dir, endless_batches, load_e2e_train
from app.demo import free_port, wait_healthy
from hsplitlora.lora import Target, module_path
from hsplitlora.models import load_model
from hsplitlora.report import table

sys.path.insert(0, str(Path(__file__).parent))
from methods import replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BATCH, SEQ, RANK, SPLIT = 4, 128, 8, 4
PROJECTIONS = ("q", "v")  # PEFT's adapters here, and the only ones the server may plan


def client_batches(tok, examples, number: int, steps: int) -> list:
    """The batches client `number` trains in its first round (the server's seed is 0)."""
    stream = endless_batches(tok, examples, BATCH, SEQ, seed=number)
    return [next(stream) for _ in range(steps)]


def padded_tokens(batches) -> int:
    return sum(b.input_ids.numel() for b in batches)


def fmt(values: list[float], digits: int = 0) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def peft_trainer(model_name: str):
    """Single-process PEFT LoRA on the model: a function timing a warm-up step and then `batches`
    (tokens per second)."""
    model, _ = load_model(model_name)
    n = model.config.num_hidden_layers
    paths = [module_path(model, Target(i, p)) for i in range(n) for p in PROJECTIONS]
    peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=16, target_modules=paths, lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    peft_model.train()

    def one(b):
        out = peft_model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad()

    def tokens_per_s(batches) -> float:
        one(batches[0])  # warm-up
        start = time.perf_counter()
        for b in batches:
            one(b)
        return padded_tokens(batches) / (time.perf_counter() - start)

    return tokens_per_s


def start_server(model: str, state: Path, wire: str, budget_clients: int, steps: int):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "server", "--model", model, "--port", str(port), "--state", str(state),
         "--open-registration", "--local-steps", str(steps), "--batch-size", str(BATCH), "--max-len", str(SEQ), "--wire", wire,
         "--rank-set", str(RANK), "--projections", ",".join(PROJECTIONS), "--clients-per-round", str(budget_clients)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc)
    return proc, url


async def networked(url: str, examples, budget: float, clients: int) -> tuple[float, list, list[float]]:
    """Run one round on `clients` concurrent clients: (seconds of the round, reports, when the first
    client finished each step, in seconds from the start)."""
    torch.manual_seed(0)  # the same device adapters in every run, so wire formats compare like for like
    cs = [AsyncClient(url, examples, budget) for _ in range(clients)]
    for c in cs:
        await c.register()
    start = time.perf_counter()
    marks: list[float] = []
    runs = [c.run(1, (lambda r, s, loss: marks.append(time.perf_counter() - start)) if i == 0 else None)
            for i, c in enumerate(cs)]
    reports = await asyncio.gather(*runs)
    return time.perf_counter() - start, [r[0] for r in reports], marks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--pairs", type=int, default=3, help="networked rounds alternating with PEFT timings")
    args = p.parse_args()
    model, tok = load_model(args.model)
    dims = ModelDims.from_config(model.config)
    # Batches are padded to their longest example (at most SEQ tokens); rates count padded tokens.
    examples = [e for e in load_e2e_train(default_e2e_dir())][: BATCH * (args.steps + 1)]
    ranks = {Target(i, q): RANK for i in range(SPLIT) for q in PROJECTIONS}
    budget = device_memory(dims, SPLIT, ranks, StepShape(BATCH, SEQ)).total / 0.75 * 1.001
    del model

    first_client = client_batches(tok, examples, 0, args.steps)
    peft = peft_trainer(args.model)
    rows, wire_rows = [], []
    with TemporaryDirectory() as tmp:

        def one_round(name: str, wire: str, clients: int):
            proc, url = start_server(args.model, Path(tmp) / name, wire, clients, args.steps)
            try:
                return asyncio.run(networked(url, examples, budget, clients))
            finally:
                proc.terminate()
                proc.wait()

        peft_rates, net_rates, steady_rates, ratios, steady_ratios = [peft(first_client)], [], [], [], []
        for i in range(args.pairs):
            seconds, _, marks = one_round(f"pair{i}", "fp16", 1)
            peft_rates.append(peft(first_client))
            around = (peft_rates[-2] + peft_rates[-1]) / 2
            net_rates.append(padded_tokens(first_client) / seconds)
            # Steps 1.. only: no cold start, no importance scoring, no round end.
            steady_rates.append(padded_tokens(first_client[1:]) / (marks[-1] - marks[0]))
            ratios.append(net_rates[-1] / around)
            steady_ratios.append(steady_rates[-1] / around)
        for clients in (1, 4, 8):
            seconds, _, _ = one_round(f"c{clients}", "fp16", clients)
            tokens = sum(padded_tokens(client_batches(tok, examples, n, args.steps)) for n in range(clients))
            rows.append([clients, f"{clients * args.steps / seconds:.2f}", f"{tokens / seconds:.0f}"])
        for wire in ("fp32", "fp16", "int8"):
            _, reports, _ = one_round(f"w{wire}", wire, 1)
            r = reports[0]
            wire_rows.append([wire, f"{(r.bytes_up + r.bytes_down) / args.steps / 1e6:.2f}", f"{r.losses[-1]:.4f}"])
    body = "\n".join([
        "## Network (`bench/network.py`)",
        "",
        f"Model {args.model}, batches of {BATCH} E2E examples padded to their longest (at most {SEQ} tokens; "
        f"rates count padded tokens), LoRA {'/'.join(PROJECTIONS)} rank {RANK} in every block, split {SPLIT}; "
        f"server (`hsplitlora server --projections {','.join(PROJECTIONS)}`) and clients on 127.0.0.1 of one "
        f"machine, {os.cpu_count()} CPUs. A networked run is one round of {args.steps} steps per client from a "
        f"cold start (step 0 also scores importance), the round's adapter upload and its update included; PEFT "
        f"trains the same {args.steps} batches as client 0 after one warm-up step. {args.pairs} one-client "
        f"rounds alternate with {args.pairs + 1} PEFT timings, each round against the mean of the two beside it.",
        "",
        f"- single-process PEFT LoRA: {fmt(peft_rates)} tokens/s; one networked client + server: "
        f"{fmt(net_rates)} tokens/s; **ratio {statistics.median(ratios):.2f}** (median; rounds {fmt(ratios, 2)}; "
        f"goal >= 0.95).",
        f"- its steps 2-{args.steps} alone (no cold start, importance scoring or round end): "
        f"{fmt(steady_rates)} tokens/s, ratio {statistics.median(steady_ratios):.2f} (rounds {fmt(steady_ratios, 2)}).",
        "",
        table(["concurrent clients", "split steps / s (all)", "tokens / s (all)"], rows),
        "",
        table(["wire", "MB per step (up + down, incl. the round's adapters)", f"loss at step {args.steps}"], wire_rows),
    ])
    replace_section(ROOT / "docs" / "benchmarks.md", "network", body)
    print(body)


if __name__ == "__main__":
    main()
