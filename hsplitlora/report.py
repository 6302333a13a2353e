"""Readable terminal output of a run: metric tables and before/after samples."""

from __future__ import annotations

from typing import Sequence

METRIC_ORDER = ("loss", "ppl", "BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")


def jsonable(obj):
    """Config dataclass dicts made JSON-safe (paths as strings, tuples as lists)."""
    from pathlib import Path

    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return str(obj) if isinstance(obj, Path) else obj


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


def print_simulation_report(results: dict) -> None:
    print(f"\n{results['method']}: per-client plans")
    rows = [[p["client"], p["examples"], f"{p['budget_mb']:.0f}", p["split"] if p["split"] is not None else "all",
             p["device_adapters"], p["device_rank_sum"], p["server_adapters"],
             f"{p['predicted_memory_mb']:.0f}" if p["predicted_memory_mb"] is not None else "-"]
            for p in results["final_plans"]]
    print(table(["client", "examples", "budget MB", "split", "device adapters", "sum of ranks",
                 "server adapters", "predicted MB"], rows))
    print("\nper round")
    print(table(["round", "train loss", "val PPL", "seconds", "MB up", "MB down"],
                [[r["round"], r["train_loss"], r["val_ppl"], f"{r['seconds']:.0f}", f"{r['bytes_up'] / 1e6:.1f}",
                  f"{r['bytes_down'] / 1e6:.1f}"] for r in results["rounds"]]))
    print()
    print(metrics_table({"before": results["before"], "after": results["test"]}))
    for sample in results["samples"][:2]:
        print(f"\n{sample['prompt']}\n  before:    {sample['before']}\n  after:     {sample['after']}"
              f"\n  reference: {sample['reference']}")


def load_results(paths: Sequence) -> dict[str, dict]:
    """Result files by a readable name (the method, with the file stem if methods repeat)."""
    import json
    from pathlib import Path

    runs = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        if "method" not in data or "rounds" not in data:
            raise ValueError(f"{path}: not a results file of `hsplitlora simulate --out`")
        name = data["method"] if data["method"] not in runs else f"{data['method']} ({Path(path).stem})"
        runs[name] = data
    return runs


def results_table(runs: dict[str, dict]) -> str:
    """Final test metrics, last validation PPL and traffic per method."""
    metrics = {name: {**r["test"], "val PPL": r["rounds"][-1]["val_ppl"]} for name, r in runs.items()}
    present = [m for m in METRIC_ORDER if any(m in r for r in metrics.values())]
    rows = [[name, m["val PPL"], *(m.get(k, "-") for k in present),
             f"{sum(x['bytes_up'] + x['bytes_down'] for x in runs[name]['rounds']) / 1e6:.1f}"]
            for name, m in metrics.items()]
    return table(["method", "final val PPL", *(f"test {k}" for k in present), "MB moved"], rows)


def plot_validation(runs: dict[str, dict], path) -> None:
    """Validation perplexity per round, one line per run, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in runs.items():
        ax.plot([x["round"] for x in r["rounds"]], [x["val_ppl"] for x in r["rounds"]], marker="o", label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("validation perplexity")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
