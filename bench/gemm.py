"""Benchmark: the device step's matrix products in onnxruntime (MLAS) against eager torch; writes docs/benchmarks.md.

    .venv/bin/python bench/gemm.py [--model smollm2-135m] [--repeats 30] [--threads 1,all]

The device step is mostly the frozen projections' products (forward x W^T, backward dL/dy W),
so how fast each library runs them bounds how far onnxruntime can get below eager. For every
projection shape of one transformer block at batch 4 x 128 tokens this times

    onnxruntime  MatMul(a, B) with B a constant initializer, as in the exported graphs
                 (onnxruntime prepacks it once per session)
    torch        the same product as eager autograd runs it: F.linear(x, W) forward, dy @ W backward

and, in onnxruntime only, the block's products that share an operand done as one product over
concatenated weights (q+k+v, gate+up; forward and backward), against doing them one by one.
Cases run round-robin (each repeat times every case once), median of --repeats after 3 warm-up
calls each; that in --processes fresh processes one after another (torch's speed at the same
product varies between processes by up to a third on the 2-core machine here), with the median
over them reported, all under the shared timing lock /tmp/hsplitlora-bench.lock. At one thread a
round is one process timing both libraries; with more, as in `bench/runtimes.py`, each library
gets a process of its own (their thread pools side by side slow one another) and onnxruntime's
workers do not spin between calls, as the SDK's `OnnxRuntime` sets it.
Raw results go to docs/results/gemm.json, the tables to the "gemm" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from export.pipeline import tool_versions
from hsplitlora.models import load_model
from hsplitlora.report import table

sys.path.insert(0, str(Path(__file__).parent))
from methods import replace_section  # noqa: E402
from runtimes import BATCH, SEQ, bench_lock, in_fresh_process  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Product:
    """One frozen projection's product in a block's split step: a [M, K] @ [K, N]."""

    role: str
    k: int
    n: int
    per_block: int  # how many of them one block's forward + backward runs
    backward: bool  # dL/dy @ W (eager: matmul) rather than x @ W^T (eager: F.linear)


def block_products(hidden: int, kv: int, ffn: int) -> list[Product]:
    """A Llama block's frozen products with their counts (the backward's input gradients included)."""
    return [
        Product("forward q, o", hidden, hidden, 2, False),
        Product("forward k, v", hidden, kv, 2, False),
        Product("forward gate, up", hidden, ffn, 2, False),
        Product("forward down", ffn, hidden, 1, False),
        Product("backward q, o", hidden, hidden, 2, True),
        Product("backward k, v", kv, hidden, 2, True),
        Product("backward gate, up", ffn, hidden, 2, True),
        Product("backward down", hidden, ffn, 1, True),
    ]


def ort_session(nodes: list, inputs: dict[str, list[int]], initializers: dict[str, np.ndarray], threads: int,
                outputs: tuple[str, ...] = ("y",)):
    """An onnxruntime session over a one-off graph (outputs not named would be pruned)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes, "gemm", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(a, n) for n, a in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    if threads != 1:
        # As in the SDK's OnnxRuntime: every session here has a pool of its own, and workers left
        # spinning after their session's call took the cores from the next session's (one block's
        # products at 2 threads: 229-247 ms spinning, 41-44 ms not, 73 ms at one thread).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def ort_call(session, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    return lambda: session.run(None, feeds)


def check_same(name: str, got: list, want: list) -> None:
    """Two ways of computing a case must give the same tensors, or the timing compares different work."""
    for g, w in zip(got, want, strict=True):
        g, w = np.asarray(g), np.asarray(w)
        error = float(np.abs(g - w).max() / np.abs(w).max())
        if g.shape != w.shape or error > 1e-5:
            raise RuntimeError(f"{name}: the two computations disagree (shapes {g.shape} / {w.shape}, "
                               f"relative error {error:.2e})")


def product_cases(products: list[Product], m: int, threads: int, rng: np.random.Generator
                  ) -> dict[str, Callable[[], object]]:
    """'<role> ort' and '<role> torch' calls for every product."""
    from onnx import helper

    cases = {}
    for p in products:
        a = rng.standard_normal((m, p.k), dtype=np.float32)
        b = rng.standard_normal((p.k, p.n), dtype=np.float32)
        session = ort_session([helper.make_node("MatMul", ["a", "b"], ["y"])], {"a": [m, p.k]}, {"b": b}, threads)
        cases[f"{p.role} ort"] = ort_call(session, {"a": a})
        ta = torch.from_numpy(a).clone()  # torch's own (64-byte aligned) allocations, as in eager
        if p.backward:
            tb = torch.from_numpy(b).clone()
            cases[f"{p.role} torch"] = lambda ta=ta, tb=tb: ta @ tb
        else:
            weight = torch.from_numpy(b).T.contiguous()  # nn.Linear's [out, in]
            cases[f"{p.role} torch"] = lambda ta=ta, w=weight: F.linear(ta, w)
        check_same(p.role, cases[f"{p.role} ort"](), [cases[f"{p.role} torch"]().numpy()])
    return cases


def fusion_cases(hidden: int, kv: int, ffn: int, m: int, threads: int, rng: np.random.Generator
                 ) -> dict[str, Callable[[], object]]:
    """In onnxruntime: products sharing an operand one by one ('separate') and as one product over
    concatenated weights ('concatenated'), each with what makes the result the same tensor(s)."""
    from onnx import helper

    cases = {}
    for group, widths in (("q+k+v", (hidden, kv, kv)), ("gate+up", (ffn, ffn))):
        names = [f"w{i}" for i in range(len(widths))]
        weights = {n: rng.standard_normal((hidden, w), dtype=np.float32) for n, w in zip(names, widths)}
        x = rng.standard_normal((m, hidden), dtype=np.float32)
        # forward: x @ W_i (outputs apart) vs x @ [W_0 | W_1 | ...] then Split
        outs = tuple(f"y{i}" for i in range(len(widths)))
        separate = [helper.make_node("MatMul", ["x", n], [y]) for n, y in zip(names, outs)]
        fwd_sep = ort_session(separate, {"x": [m, hidden]}, weights, threads, outs)
        fused = [helper.make_node("MatMul", ["x", "w"], ["xy"]), helper.make_node("Split", ["xy", "widths"], outs, axis=1)]
        fwd_cat = ort_session(fused, {"x": [m, hidden]},
                              {"w": np.concatenate(list(weights.values()), axis=1),
                               "widths": np.array(widths, dtype=np.int64)}, threads, outs)
        cases[f"forward {group} separate"] = ort_call(fwd_sep, {"x": x})
        cases[f"forward {group} concatenated"] = ort_call(fwd_cat, {"x": x})
        check_same(f"forward {group}", cases[f"forward {group} concatenated"](), cases[f"forward {group} separate"]())
        # backward: sum_i dy_i @ W_i^T vs [dy_0 | dy_1 | ...] @ [W_0 | W_1 | ...]^T
        grads = {f"d{i}": rng.standard_normal((m, w), dtype=np.float32) for i, w in enumerate(widths)}
        transposed = {n: np.ascontiguousarray(w.T) for n, w in weights.items()}
        nodes = [helper.make_node("MatMul", [f"d{i}", n], [f"p{i}"]) for i, n in enumerate(names)]
        total = "p0"
        for i in range(1, len(widths)):
            out = "y" if i == len(widths) - 1 else f"s{i}"
            nodes.append(helper.make_node("Add", [total, f"p{i}"], [out]))
            total = out
        bwd_sep = ort_session(nodes, {k: list(v.shape) for k, v in grads.items()}, transposed, threads)
        bwd_cat = ort_session(
            [helper.make_node("Concat", list(grads), ["d"], axis=1), helper.make_node("MatMul", ["d", "w"], ["y"])],
            {k: list(v.shape) for k, v in grads.items()},
            {"w": np.concatenate(list(transposed.values()), axis=0)}, threads)
        cases[f"backward {group} separate"] = ort_call(bwd_sep, grads)
        cases[f"backward {group} concatenated"] = ort_call(bwd_cat, grads)
        check_same(f"backward {group}", cases[f"backward {group} concatenated"](), cases[f"backward {group} separate"]())
    return cases


def time_round_robin(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms per case; every repeat times each case once, so drift hits all cases alike."""
    for call in cases.values():
        for _ in range(3):
            call()
    samples = {name: [] for name in cases}
    for _ in range(repeats):
        for name, call in cases.items():
            start = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) * 1e3 for name, s in samples.items()}


LIBRARIES = ("ort", "torch")


def measure(hidden: int, kv: int, ffn: int, threads: int, repeats: int,
            libraries: tuple[str, ...] = LIBRARIES) -> dict[str, float]:
    """Median ms of every case of `libraries` (the fusion cases are onnxruntime's), in this process."""
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    m = BATCH * SEQ
    cases = product_cases(block_products(hidden, kv, ffn), m, threads, rng)
    cases = {name: call for name, call in cases.items() if name.rsplit(" ", 1)[1] in libraries}
    if "ort" in libraries:
        cases.update(fusion_cases(hidden, kv, ffn, m, threads, rng))
    return time_round_robin(cases, repeats)


def measure_in_processes(hidden: int, kv: int, ffn: int, threads: int, repeats: int, processes: int
                         ) -> list[dict[str, float]]:
    """`processes` rounds of `measure`, each in fresh processes: one for both libraries at one
    thread, one per library with more."""
    groups = [LIBRARIES] if threads == 1 else [(lib,) for lib in LIBRARIES]
    runs = []
    for _ in range(processes):
        run = {}
        for libraries in groups:
            run.update(in_fresh_process(measure, hidden, kv, ffn, threads, repeats, libraries))
        runs.append(run)
    return runs


def block_ratio(products: list[Product], ms: dict[str, float]) -> float:
    """onnxruntime's time over torch's for one block's products, each weighted by its count."""
    return (sum(p.per_block * ms[f"{p.role} ort"] for p in products)
            / sum(p.per_block * ms[f"{p.role} torch"] for p in products))


def report(model: str, m: int, products: list[Product], runs_by_threads: dict[int, list[dict[str, float]]],
           repeats: int) -> str:
    rows, fusion = [], []
    for threads, runs in runs_by_threads.items():
        ms = {name: statistics.median(run[name] for run in runs) for name in runs[0]}
        ratios = [block_ratio(products, run) for run in runs]
        block = {"ort": 0.0, "torch": 0.0}
        for p in products:
            gflop = 2 * m * p.k * p.n / 1e9
            o, t = ms[f"{p.role} ort"], ms[f"{p.role} torch"]
            block["ort"] += p.per_block * o
            block["torch"] += p.per_block * t
            rows.append([p.role, f"{m} x {p.k} x {p.n}", p.per_block, threads, f"{o:.2f}", f"{t:.2f}",
                         f"{gflop / o * 1e3:.0f}", f"{gflop / t * 1e3:.0f}", f"**{o / t:.2f}**"])
        rows.append(["one block", "", sum(p.per_block for p in products), threads, f"{block['ort']:.1f}",
                     f"{block['torch']:.1f}", "", "",
                     f"**{statistics.median(ratios):.2f}** ({min(ratios):.2f}-{max(ratios):.2f})"])
        for direction in ("forward", "backward"):
            for group in ("q+k+v", "gate+up"):
                sep, cat = ms[f"{direction} {group} separate"], ms[f"{direction} {group} concatenated"]
                fusion.append([f"{direction} {group}", threads, f"{sep:.2f}", f"{cat:.2f}", f"**{cat / sep:.2f}**"])
    processes = len(next(iter(runs_by_threads.values())))
    return "\n".join([
        "## Matrix products: onnxruntime against eager torch (`bench/gemm.py`)",
        "",
        f"Model {model}, the frozen projections of one block at batch {BATCH} x {SEQ} (M = {m} rows): "
        f"onnxruntime's `MatMul` with the weight a constant initializer, as in the exported graphs, against "
        f"the product as eager autograd runs it (`F.linear` forward, `dy @ W` backward). Threads "
        f"{', '.join(map(str, runs_by_threads))} (torch threads and onnxruntime intra-op threads). {processes} rounds "
        f"of fresh processes one after another: at one thread one process times both libraries, with more each "
        f"library has a process of its own and onnxruntime's workers do not spin between calls (as in the SDK); "
        f"in a process its cases run round-robin, median of {repeats}; times are medians over the rounds; "
        f"measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} CPUs, under the shared "
        f"timing lock.",
        "",
        table(["product", "M x K x N", "per block", "threads", "onnxruntime ms", "torch ms", "onnxruntime GFLOP/s",
               "torch GFLOP/s", "onnxruntime / torch"], rows),
        "",
        "\"one block\" weights each product by how often one block's forward and backward run it (LoRA's "
        "rank-sized products left out): the step-time ratio a deep split tends to if everything but "
        "these products cost the same in both. Its ratio is the median of the rounds' ratios, their "
        "range in parentheses.",
        "",
        "The products that share an operand as one product over concatenated weights, in onnxruntime "
        "(forward: `x @ [W_q | W_k | W_v]` then `Split`; backward: `[dq | dk | dv] @ [W_q | W_k | W_v]^T` "
        "instead of three products and two `Add`s):",
        "",
        table(["products", "threads", "separate ms", "concatenated ms", "concatenated / separate"], fusion),
        "",
        "Raw results: `docs/results/gemm.json`.",
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per case (after 3 warm-up)")
    p.add_argument("--threads", default="1,all",
                   help="comma-separated thread counts (torch threads and onnxruntime intra-op threads); "
                        "'all' = every core")
    p.add_argument("--processes", type=int, default=5, help="rounds of fresh processes the cases are timed in")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "gemm.json")
    p.add_argument("--no-doc", action="store_true", help="write the JSON only, not docs/benchmarks.md")
    args = p.parse_args()
    threads = [os.cpu_count() if n == "all" else int(n) for n in args.threads.split(",")]
    config = load_model(args.model)[0].config
    hidden, ffn = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    m = BATCH * SEQ
    products = block_products(hidden, kv, ffn)
    with bench_lock():
        runs = {n: measure_in_processes(hidden, kv, ffn, n, args.repeats, args.processes) for n in threads}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": args.model, "m": m, "repeats": args.repeats, "processes": args.processes,
        "machine": platform.machine(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
        "tools": tool_versions(),
        "threads": {str(n): {"block_ratio_per_process": [round(block_ratio(products, r), 3) for r in rs],
                             "ms_per_process": [{k: round(v, 3) for k, v in r.items()} for r in rs]}
                    for n, rs in runs.items()}}, indent=1) + "\n")
    body = report(args.model, m, products, runs, args.repeats)
    if not args.no_doc:
        replace_section(ROOT / "docs" / "benchmarks.md", "gemm", body)
    print(body)


if __name__ == "__main__":
    main()
