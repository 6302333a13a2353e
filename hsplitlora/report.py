"""Readable terminal output of a run: metric tables and before/after samples."""

from __future__ import annotations

from typing import Sequence

METRIC_ORDER = ("loss", "ppl", "BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")


def table(header: Sequence[str], rows: Sequence[Sequence], fmt: str = "{:.4f}") -> str:
    """A Markdown table; floats formatted with `fmt`."""
    cells = [[fmt.format(c) if isinstance(c, float) else str(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def metrics_table(results: dict[str, dict[str, float]]) -> str:
    """One row per named result, one column per metric present in any of them."""
    present = [m for m in METRIC_ORDER if any(m in r for r in results.values())]
    rows = [[name, *(r.get(m, "-") for m in present)] for name, r in results.items()]
    return table(["", *present], rows)


def print_finetune_report(report: dict) -> None:
    print()
    print(metrics_table({"before": report["before"], "after": report["after"]}))
    print(f"\ntraining: {len(report['train_losses'])} steps in {report['train_seconds']:.0f} s, "
          f"loss {report['train_losses'][0]:.3f} -> {report['train_losses'][-1]:.3f}")
    for sample in report["samples"][:3]:
        print(f"\n{sample['prompt']}\n  before:    {sample['before']}\n  after:     {sample['after']}"
              f"\n  reference: {sample['reference']}")
