"""Benchmark: the networked split step against single-process PEFT LoRA, concurrency, wire formats.

    .venv/bin/python bench/network.py [--model smollm2-135m] [--steps 8]

1. Tokens per second of one networked client + server on 127.0.0.1 divided by single-process
   PEFT LoRA on the same model, batches and ranks (q, v at rank 8 in every block; split 4).
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
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from peft import LoraConfig, get_peft_model

from edge_sdk.client import AsyncClient
from hsplitlora.cost import ModelDims, StepShape, device_memory
from hsplitlora.data import collate, default_e2e_dir, load_e2e_train
from hsplitlora.demo import _free_port, _wait_healthy
from hsplitlora.lora import Target, module_path
from hsplitlora.models import load_model
from hsplitlora.report import table

sys.path.insert(0, str(Path(__file__).parent))
from methods import replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BATCH, SEQ, RANK, SPLIT = 4, 128, 8, 4


def peft_tokens_per_s(model_name: str, batches, steps: int) -> float:
    model, _ = load_model(model_name)
    n = model.config.num_hidden_layers
    paths = [module_path(model, Target(i, p)) for i in range(n) for p in ("q", "v")]
    peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=16, target_modules=paths, lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    peft_model.train()

    def one(b):
        out = peft_model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad()

    one(batches[0])  # warm-up
    start = time.perf_counter()
    for b in batches[1: steps + 1]:
        one(b)
    return steps * BATCH * SEQ / (time.perf_counter() - start)


def start_server(model: str, state: Path, wire: str, budget_clients: int, steps: int):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hsplitlora", "server", "--model", model, "--port", str(port), "--state", str(state),
         "--local-steps", str(steps), "--batch-size", str(BATCH), "--max-len", str(SEQ), "--wire", wire,
         "--rank-set", str(RANK), "--clients-per-round", str(budget_clients)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(url, proc)
    return proc, url


async def networked(url: str, examples, budget: float, clients: int) -> tuple[float, list]:
    """Run one round on `clients` concurrent clients; (seconds of the stepping, reports)."""
    torch.manual_seed(0)  # the same device adapters in every run, so wire formats compare like for like
    cs = [AsyncClient(url, examples, budget) for _ in range(clients)]
    for c in cs:
        await c.register()
    start = time.perf_counter()
    reports = await asyncio.gather(*(c.run(1) for c in cs))
    return time.perf_counter() - start, [r[0] for r in reports]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    model, tok = load_model(args.model)
    dims = ModelDims.from_config(model.config)
    # Every example padded/cut to SEQ tokens so both sides process exactly BATCH x SEQ per step.
    examples = [e for e in load_e2e_train(default_e2e_dir())][: BATCH * (args.steps + 1)]
    batches = [collate(tok, examples[i: i + BATCH], SEQ) for i in range(0, len(examples), BATCH)]
    ranks = {Target(i, q): RANK for i in range(SPLIT) for q in ("q", "v")}
    budget = device_memory(dims, SPLIT, ranks, StepShape(BATCH, SEQ)).total / 0.75 * 1.001
    del model

    peft_rate = peft_tokens_per_s(args.model, batches, args.steps)
    rows, wire_rows = [], []
    with TemporaryDirectory() as tmp:
        for clients in (1, 4, 8):
            proc, url = start_server(args.model, Path(tmp) / f"c{clients}", "fp16", clients, args.steps)
            try:
                seconds, reports = asyncio.run(networked(url, examples, budget, clients))
            finally:
                proc.terminate()
                proc.wait()
            tokens = clients * args.steps * BATCH * SEQ
            rows.append([clients, f"{clients * args.steps / seconds:.2f}", f"{tokens / seconds:.0f}"])
            if clients == 1:
                net_rate = tokens / seconds
        for wire in ("fp32", "fp16", "int8"):
            proc, url = start_server(args.model, Path(tmp) / f"w{wire}", wire, 1, args.steps)
            try:
                _, reports = asyncio.run(networked(url, examples, budget, 1))
            finally:
                proc.terminate()
                proc.wait()
            r = reports[0]
            wire_rows.append([wire, f"{(r.bytes_up + r.bytes_down) / args.steps / 1e6:.2f}", f"{r.losses[-1]:.4f}"])
    body = "\n".join([
        "## Network (`bench/network.py`)",
        "",
        f"Model {args.model}, batch {BATCH} x {SEQ} tokens, LoRA q/v rank {RANK} in every block, split {SPLIT}, "
        f"{args.steps} steps after a warm-up; server (`hsplitlora server`) and clients on 127.0.0.1 of one 2-core "
        f"machine, {os.cpu_count()} CPUs. Includes the once-per-round adapter upload and update.",
        "",
        f"- single-process PEFT LoRA: {peft_rate:.0f} tokens/s; one networked client + server: {net_rate:.0f} "
        f"tokens/s; **ratio {net_rate / peft_rate:.2f}** (goal >= 0.95).",
        "",
        table(["concurrent clients", "split steps / s (all)", "tokens / s (all)"], rows),
        "",
        table(["wire", "MB per step (up + down, incl. the round's adapters)", f"loss at step {args.steps}"], wire_rows),
    ])
    replace_section(ROOT / "docs" / "benchmarks.md", "network", body)
    print(body)


if __name__ == "__main__":
    main()
