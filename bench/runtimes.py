"""Benchmark: one split-learning device step per runtime on SmolLM2-135M segments; writes docs/benchmarks.md.

    .venv/bin/python bench/runtimes.py [--splits 2,4,8] [--settings qv8,all16] [--repeats 7] [--threads 1,all]
                                       [--processes 3]

For each LoRA setting and split k the device segment is exported to both formats with
`export.build` (export seconds and file sizes from its manifest), then every runtime runs the
step the client runs, in one process, interleaved (round-robin repeats, median):

    h = rt.forward(ids, mask, keep=True)    eager: the segment, keeping autograd's graph;
                                            onnxruntime / executorch: the forward graph / method,
                                            returning h and the activations the backward reads
    grads = rt.backward(dL/dh)              eager: autograd; the others: the backward graph / method

each followed by the SDK's AdamW over the LoRA tensors. dL/dh is random (the server's reply).
With more than one thread each runtime is timed in a process of its own (thread pools side by side
slow one another). The timing runs in --processes rounds of fresh processes: eager's step time varies
between processes more than within one (the same k=2 step took 185-260 ms in processes started
minutes apart on the 2-core machine here, onnxruntime's 158-175 ms), so one process is one draw.
The tables give the median over the processes and the range of their ratios.
Each configuration is timed at one thread and at every core ("all", os.cpu_count()): every core is
what a device runs with when the SDK is not told otherwise (torch's, onnxruntime's and ExecuTorch's
own default), one thread the pure per-core comparison.
Only the timing runs under the shared lock /tmp/hsplitlora-bench.lock (taken here: do not wrap
this script in flock(1), the two locks would wait on each other); exports run outside it.
Raw results go to docs/results/runtimes.json, the tables to the "runtimes" section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fcntl
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import export
from edge_sdk.runtimes import AdamW
from edge_sdk.runtimes.executorch_runtime import ExecuTorchRuntime
from edge_sdk.runtimes.onnx_runtime import OnnxRuntime
from edge_sdk.runtimes.torch_runtime import TorchRuntime
from export.pipeline import tool_versions
from hsplitlora.models import load_model
from hsplitlora.report import table

sys.path.insert(0, str(Path(__file__).parent))
from methods import replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOCK = Path("/tmp/hsplitlora-bench.lock")
BATCH, SEQ, ALPHA = 4, 128, 16.0
# qv8: the baselines' adapters (q, v at rank 8). all16: what the planner gives a device with room
# to spare, rank 16 on every projection of its blocks (docs/method.md §2).
SETTINGS = {"qv8": "q=8,v=8", "all16": "q=16,k=16,v=16,o=16,gate=16,up=16,down=16"}
RUNTIMES = ("eager", "onnxruntime", "executorch")


@contextmanager
def bench_lock():
    """The machine's shared timing lock: no two benchmarks time at once on its 2 cores."""
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def set_threads(n: int) -> None:
    """Eager torch (and the SDK's AdamW) and ExecuTorch's process-wide threadpool; ORT per session."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    torch.set_num_threads(n)
    _unsafe_reset_threadpool(n)


class Step:
    """A runtime as the client drives it: forward keeping the activations, backward with dL/dh, AdamW."""

    def __init__(self, rt):
        self.rt = rt

    def split_step(self, ids, mask, upstream, opt: AdamW) -> tuple[float, float, float]:
        t0 = time.perf_counter()
        self.rt.forward(ids, mask, keep=True)
        t1 = time.perf_counter()
        grads = self.rt.backward(upstream)
        t2 = time.perf_counter()
        opt.step(self.rt.lora_tensors(), grads)
        return t1 - t0, t2 - t1, time.perf_counter() - t2


def time_runtimes(model: str, split: int, ranks: str, directory: Path, threads: int, repeats: int,
                  names: tuple[str, ...] = RUNTIMES) -> dict:
    """Median ms of forward / backward / AdamW / the whole split step of each runtime in `names`,
    interleaved in this process."""
    set_threads(threads)
    eager = TorchRuntime.from_model(load_model(model)[0], split, ranks, ALPHA)
    start = {k: v.clone() for k, v in eager.lora_tensors().items()}  # apply_lora's fresh adapters
    makers = {"eager": lambda: eager, "onnxruntime": lambda: OnnxRuntime(directory, threads=threads),
              "executorch": lambda: ExecuTorchRuntime(directory)}
    steps = {name: Step(makers[name]()) for name in names}
    for step in steps.values():
        step.rt.set_lora_tensors(start)
    opts = {name: AdamW(lr=1e-4) for name in steps}
    gen = torch.Generator().manual_seed(0)
    hidden = eager.segment.config.hidden_size
    vocab = eager.segment.config.vocab_size
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=gen)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    upstream = torch.randn(BATCH, SEQ, hidden, generator=gen) * 1e-3
    samples = {name: [] for name in steps}
    for name, s in steps.items():  # warm-up: first calls allocate and pack
        for _ in range(2):
            s.split_step(ids, mask, upstream, opts[name])
    load_before = os.getloadavg()[0]
    for _ in range(repeats):
        for name, s in steps.items():
            samples[name].append(s.split_step(ids, mask, upstream, opts[name]))
    load_after = os.getloadavg()[0]
    out = {}
    for name, rows in samples.items():
        fwd, back, opt = (statistics.median(col) * 1e3 for col in zip(*rows))
        total = statistics.median(sum(r) for r in rows) * 1e3
        out[name] = {"forward_ms": round(fwd, 1), "backward_ms": round(back, 1), "adamw_ms": round(opt, 2),
                     "split_step_ms": round(total, 1), "samples_ms": [round(sum(r) * 1e3, 1) for r in rows]}
    return {"runtimes": out, "load_average": [round(load_before, 2), round(load_after, 2)]}


def in_fresh_process(fn, *args):
    """`fn(*args)` in a spawned interpreter (not forked: it inherits nothing from this one, which
    may have run an export: its heap, its threads); returns its result."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def time_in_processes(model: str, split: int, ranks: str, directory: Path, threads: int, repeats: int,
                      processes: int) -> dict:
    """`processes` rounds of `time_runtimes` in fresh processes, one at a time; per runtime the
    median over the rounds of each time, and per-round ratios to eager (their median and range).

    At one thread a round is one process timing every runtime interleaved. With more threads each
    runtime gets a process of its own in every round: side by side in one process their thread
    pools slow one another (here eager's 2-thread qv8 k=2 step took 100-108 ms alone and 109-151 ms
    interleaved with onnxruntime and ExecuTorch)."""
    groups = [RUNTIMES] if threads == 1 else [(name,) for name in RUNTIMES]
    runs = []
    for _ in range(processes):
        run = {"runtimes": {}, "load_average": []}
        for names in groups:
            part = in_fresh_process(time_runtimes, model, split, ranks, directory, threads, repeats, names)
            run["runtimes"].update(part["runtimes"])
            run["load_average"] += part["load_average"]
        for row in run["runtimes"].values():
            row["ratio_to_eager"] = round(row["split_step_ms"] / run["runtimes"]["eager"]["split_step_ms"], 2)
        runs.append(run)
    out = {}
    for name in RUNTIMES:
        rows = [r["runtimes"][name] for r in runs]
        ratios = [row["ratio_to_eager"] for row in rows]
        out[name] = {key: round(statistics.median(row[key] for row in rows), 2 if key == "adamw_ms" else 1)
                     for key in ("forward_ms", "backward_ms", "adamw_ms", "split_step_ms")}
        out[name].update(ratio_to_eager=round(statistics.median(ratios), 2), ratio_range=[min(ratios), max(ratios)],
                         split_step_ms_per_process=[row["split_step_ms"] for row in rows])
    loads = [x for r in runs for x in r["load_average"]]
    return {"runtimes": out, "load_average": [min(loads), max(loads)], "processes": runs}


def run_config(model: str, setting: str, split: int, threads: list[int], repeats: int, processes: int,
               work: Path) -> dict:
    out_dir = work / f"{setting}-k{split}"
    start = time.perf_counter()
    manifest = export.build(model, split, SETTINGS[setting], alpha=ALPHA, batch=BATCH, seq=SEQ, formats="both",
                            out_dir=out_dir)
    build_seconds = time.perf_counter() - start
    result = {
        "setting": setting, "ranks": SETTINGS[setting], "split": split, "lora_tensors": len(manifest.lora),
        "build_seconds": round(build_seconds, 1),
        "artifacts": {fmt: {"export_seconds": a.export_seconds, "bytes": a.bytes, "parity": a.parity}
                      for fmt, a in manifest.artifacts.items()},
        "timing": {},
    }
    with bench_lock():
        for n in threads:
            result["timing"][str(n)] = time_in_processes(model, split, SETTINGS[setting], out_dir, n, repeats,
                                                         processes)
    print(json.dumps({k: v for k, v in result.items() if k != "artifacts"}, indent=1), flush=True)
    return result


def mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def report(results: list[dict], model: str, repeats: int, threads: list[int], processes: int) -> str:
    step_rows, part_rows, art_rows = [], [], []
    for r in results:
        for n, t in r["timing"].items():
            rt = t["runtimes"]
            ratios = (f"**{rt[x]['ratio_to_eager']:.2f}** ({rt[x]['ratio_range'][0]:.2f}-{rt[x]['ratio_range'][1]:.2f})"
                      for x in RUNTIMES[1:])
            step_rows.append([r["setting"], r["split"], n, *(f"{rt[x]['split_step_ms']:.0f}" for x in RUNTIMES),
                              *ratios, f"{t['load_average'][0]:.1f}-{t['load_average'][1]:.1f}"])
            part_rows.append([r["setting"], r["split"], n, *(f"{rt[x]['forward_ms']:.0f} + {rt[x]['backward_ms']:.0f} + "
                                                             f"{rt[x]['adamw_ms']:.1f}" for x in RUNTIMES)])
        onnx, pte = r["artifacts"]["onnx"], r["artifacts"]["pte"]
        ob, pb = onnx["bytes"], pte["bytes"]
        art_rows.append([r["setting"], r["split"],
                         f"{mb(ob['device_segment.onnx'])} + {mb(ob['device_segment_forward.onnx'])} + "
                         f"{mb(ob['device_segment_backward.onnx'])} + {mb(ob['device_segment.onnx.data'])}",
                         f"{mb(pb['device_segment.pte'])} + {mb(pb['device_segment.ptd'])}",
                         f"{onnx['export_seconds']:.0f}", f"{pte['export_seconds']:.0f}", f"{r['build_seconds']:.0f}",
                         f"{max(onnx['parity'].values()):.1e} / {max(pte['parity'].values()):.1e}"])
    return "\n".join([
        "## Device runtimes (`bench/runtimes.py`)",
        "",
        f"Model {model}, batch {BATCH} x {SEQ} tokens, LoRA alpha {ALPHA:g}; settings `qv8` = `{SETTINGS['qv8']}`, "
        f"`all16` = rank 16 on all seven projections of every device block (what the planner gives a device "
        f"with room to spare). One **split-learning device step** as the client runs it, through the SDK's "
        f"runtime interface: `forward(ids, mask, keep=True)` (eager: the segment keeping its autograd graph; "
        f"onnxruntime / ExecuTorch: the forward graph / method returning h and the activations the backward "
        f"reads), then `backward(dL/dh)` (eager: autograd; the others: the backward graph / method), then the "
        f"SDK's AdamW; median of {repeats} after 2 warm-up steps. At one thread all runtimes run in one "
        f"process, interleaved; with more threads each runtime runs in a fresh process of its own, one after "
        f"another (their thread pools side by side in one process slowed one another: eager's 2-thread qv8 k=2 "
        f"step took 100-108 ms alone and 109-151 ms interleaved with them). That in {processes} rounds of "
        f"fresh processes (eager's speed varies more between processes than within one): times are medians "
        f"over the rounds, ratios the median of the per-round ratios with their range in parentheses. Threads "
        f"{' and '.join(map(str, threads))} (torch threads, ORT intra-op threads, ExecuTorch threadpool; "
        f"{os.cpu_count()} = every core, what the SDK runs with by default), under the shared timing lock. "
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} CPUs; the load average "
        f"(1 min, lowest and highest over the processes' starts and ends) says whether other work shared the "
        f"cores.",
        "",
        table(["setting", "k", "threads", "eager ms", "onnxruntime ms", "ExecuTorch ms", "ORT / eager",
               "ExecuTorch / eager", "load avg"], step_rows),
        "",
        "Where the time goes, ms: forward + backward + AdamW:",
        "",
        table(["setting", "k", "threads", "eager", "onnxruntime", "ExecuTorch"], part_rows),
        "",
        "Artifacts (MB: onnx joint + forward + backward graphs + weights; pte program (three methods) + LoRA "
        "`.ptd`), export seconds (trace + "
        "lowering + writing, per format), the whole `export.build` (both formats, model load and verification "
        "included) and the worst parity error at export (onnx / pte, relative):",
        "",
        table(["setting", "k", "onnx MB", "pte MB", "onnx export s", "pte export s", "build s", "parity"], art_rows),
        "",
        "Raw results: `docs/results/runtimes.json`.",
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--splits", default="2,4,8", help="device blocks k, comma-separated")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"LoRA settings from {sorted(SETTINGS)}")
    p.add_argument("--repeats", type=int, default=7, help="timed split steps per runtime (after 2 warm-up)")
    p.add_argument("--threads", default="1,all",
                   help="thread counts to time, comma-separated; 'all' = every core (the SDK's default)")
    p.add_argument("--processes", type=int, default=3, help="fresh processes each configuration is timed in")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "runtimes.json")
    p.add_argument("--no-doc", action="store_true", help="write the JSON only, not docs/benchmarks.md")
    args = p.parse_args()
    settings = args.settings.split(",")
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        p.error(f"unknown settings {sorted(unknown)}; choose from {sorted(SETTINGS)}")
    splits = [int(k) for k in args.splits.split(",")]
    try:
        threads = [os.cpu_count() if n == "all" else int(n) for n in args.threads.split(",")]
    except ValueError:
        p.error(f"--threads takes numbers or 'all', comma-separated, not {args.threads!r}")
    threads = list(dict.fromkeys(threads))  # "1,all" on a one-core machine times once
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-runtimes-") as work:
        for setting in settings:
            for k in splits:
                results.append(run_config(args.model, setting, k, threads, args.repeats, args.processes, Path(work)))
                # Artifacts of a config are not needed after its timing (up to ~0.5 GB each).
                for f in (Path(work) / f"{setting}-k{k}").iterdir():
                    f.unlink()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": args.model, "batch": BATCH, "seq": SEQ, "alpha": ALPHA, "repeats": args.repeats,
        "processes": args.processes,
        "machine": platform.machine(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
        "tools": tool_versions(), "results": results}, indent=1) + "\n")
    body = report(results, args.model, args.repeats, threads, args.processes)
    if not args.no_doc:
        replace_section(ROOT / "docs" / "benchmarks.md", "runtimes", body)
    print(body)


if __name__ == "__main__":
    main()
