"""Benchmark: all five methods on one model and data, same seeds; writes docs/benchmarks.md.

    .venv/bin/python bench/methods.py [--model smollm2-135m] [--rounds 3] [--local-steps 4]

Each method runs `hsplitlora simulate` in-process with identical data shards, budgets and seeds;
the table (final validation PPL, test metrics, traffic, wall time) and the validation-PPL plot
go into the "methods" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch

from hsplitlora.finetune import EvalConfig
from hsplitlora.report import plot_validation, results_table
from hsplitlora.federation.strategies import METHODS
from hsplitlora.simulate import SimConfig, simulate

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"


def replace_section(doc: Path, name: str, body: str) -> None:
    """Replace the text between <!-- name:start --> and <!-- name:end --> (appending if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n\nEvery number here was measured by a script in `bench/`.\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "results")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    runs, seconds = {}, {}
    for method in args.methods.split(","):
        cfg = SimConfig(method=method, model=args.model, clients=args.clients, rounds=args.rounds,
                        local_steps=args.local_steps, seed=args.seed,
                        eval=EvalConfig(loss_items=20, generate_items=40, coco=True))
        start = time.perf_counter()
        runs[method] = simulate(cfg)
        seconds[method] = time.perf_counter() - start
        (args.out_dir / f"methods-{method}.json").write_text(json.dumps(runs[method], indent=1))
    plot = ROOT / "docs" / "img" / "methods-val-ppl.png"
    plot.parent.mkdir(parents=True, exist_ok=True)
    plot_validation(runs, plot)
    cfg = next(iter(runs.values()))["config"]
    body = "\n".join([
        "## Methods on E2E (`bench/methods.py`)",
        "",
        f"Model {args.model}; {args.clients} clients with non-IID shards of the E2E **dev** set (by restaurant), "
        f"{args.rounds} rounds x {args.local_steps} local steps, batch {cfg['batch_size']} x max {cfg['max_len']} "
        f"tokens, lr {cfg['lr']}, seed {args.seed}; test metrics on 40 test MRs (loss on the references of 20). "
        f"cenlora runs {args.clients}x the local steps (as many batches as all clients). "
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {torch.get_num_threads()} threads.",
        "",
        results_table(runs),
        "",
        "| method | wall seconds (whole run incl. evaluation) |",
        "|---|---|",
        *(f"| {m} | {s:.0f} |" for m, s in seconds.items()),
        "",
        "![validation perplexity per round](img/methods-val-ppl.png)",
        "",
        "Raw results: `docs/results/methods-*.json`.",
    ])
    replace_section(DOC, "methods", body)
    print(body)


if __name__ == "__main__":
    main()
