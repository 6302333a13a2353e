"""Benchmark: the calibrated cost model (hsplitlora.predict) against real device processes.

    flock /tmp/hsplitlora-bench.lock .venv/bin/python bench/calibration.py [--model smollm2-135m]

1. Starts `hsplitlora server` on 127.0.0.1 and profiles this device against it
   (edge_sdk.profile: FLOP/s, per-block time and saved bytes, runtime baseline, link).
2. For every split k and rank setting, runs a separate client-like process (this script with
   --worker) that loads the model as the SDK client does and trains blocks[0:k] with LoRA:
   forward, h (fp16) with mask and labels POSTed to the server's /v1/probe, a gradient-sized
   reply fetched from it, backward with a random dL/dh of the right shape, AdamW step. It reports
   its median step time (after a warm-up step) and its peak RSS (VmHWM).
3. Compares both with the prediction from the profile; writes docs/results/calibration.json
   and the "calibration" section of docs/benchmarks.md.

Profile and workers use the same number of torch threads (--threads, default 1): one thread
gives stable timings on a shared machine, and the prediction is only valid at the profiled count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

ROOT = Path(__file__).resolve().parents[1]

SPLITS = (1, 2, 4, 8)
RANK_SETTINGS = {"q,v r8": "q=8,v=8", "all r4": "all=4", "all r16": "all=16"}
GOALS = {"memory": 0.10, "time": 0.25}


def expand_ranks(spec: str, projections: tuple[str, ...], layers: int, split: int):
    """'q=8,v=8' or 'all=16' -> {Target: rank} for blocks[0:split]."""
    from hsplitlora.lora import parse_ranks

    if spec.startswith("all="):
        spec = ",".join(f"{p}={spec[4:]}" for p in projections)
    return {t: r for t, r in parse_ranks(spec, layers).items() if t.layer < split}


# ----- the client-like process ---------------------------------------------------------------
async def _worker_steps(args: argparse.Namespace) -> dict:
    import aiohttp
    import torch

    import edge_sdk.client  # noqa: F401  (the client's runtime: its imports are part of the baseline)
    from edge_sdk.cgroups import process_memory
    from hsplitlora.cost import ModelDims
    from hsplitlora.lora import apply_lora
    from hsplitlora.models import load_model
    from hsplitlora.split import Segment
    from hsplitlora.train import make_optimizer
    from hsplitlora.wire import TensorSpec, decode, encode

    model, _ = load_model(args.model)
    dims = ModelDims.from_config(model.config)
    ranks = expand_ranks(args.ranks, dims.projections, dims.layers, args.split)
    factors = apply_lora(model, ranks, 16.0)
    optimizer = make_optimizer((p for f in factors.values() for p in f.parameters()), 1e-3)
    device = Segment(model, 0, args.split, embed=True, head=False)
    model.train()
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, args.seq)
    times = []
    async with aiohttp.ClientSession() as session:
        for _ in range(args.steps + 1):
            # Random token ids: over a few steps they touch pages across the whole embedding table.
            ids = torch.randint(0, dims.vocab, shape, generator=gen)
            mask = torch.ones(shape, dtype=torch.long)
            # What the server would compute: made before the clock starts.
            grad_body = encode({"grad": torch.randn(*shape, dims.hidden, generator=gen)}, args.wire)
            start = time.perf_counter()
            h = device(ids, mask)
            body = encode({"h": h, "attention_mask": mask, "labels": ids}, args.wire)
            async with session.post(args.probe + "/v1/probe", data=body) as resp:
                resp.raise_for_status()
                await resp.read()
            async with session.get(args.probe + "/v1/probe", params={"bytes": str(len(grad_body))}) as resp:
                resp.raise_for_status()
                await resp.read()  # random bytes of the gradient's size; the gradient is grad_body
            grad = decode(grad_body, {"grad": TensorSpec(tuple(h.shape))}, len(grad_body))["grad"]
            h.backward(grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    memory = process_memory()
    return {"step_seconds": times[1:], "peak_rss_bytes": memory["VmHWM"], "rss_bytes": memory["VmRSS"],
            "adapters": len(ranks)}


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    print(json.dumps(asyncio.run(_worker_steps(args))))


def run_worker(model: str, split: int, ranks: str, steps: int, threads: int, batch: int, seq: int,
               probe: str, wire: str = "fp16") -> dict:
    """One client-like process; its JSON report."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", model, "--split", str(split),
           "--ranks", ranks, "--steps", str(steps), "--threads", str(threads), "--batch", str(batch),
           "--seq", str(seq), "--probe", probe, "--wire", wire]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {split} {ranks} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----- comparison ----------------------------------------------------------------------------
def calibrate(profile: dict, model: str, splits, settings: dict[str, str], steps: int, probe: str,
              wire_bytes: int = 2) -> list[dict]:
    """Predicted and measured step time and peak RSS for every (split, rank setting)."""
    from hsplitlora.cost import StepShape
    from hsplitlora.models import load_dims
    from hsplitlora.predict import DeviceRates, predict_step

    dims = load_dims(model)
    rates = DeviceRates.from_profile(profile)
    shape = StepShape(profile["batch"], profile["seq"])
    rows = []
    for split in splits:
        for name, spec in settings.items():
            ranks = expand_ranks(spec, dims.projections, dims.layers, split)
            pred = predict_step(rates, dims, split, ranks, shape, wire_bytes)
            meas = run_worker(model, split, spec, steps, profile["threads"], shape.batch, shape.seq, probe)
            seconds = statistics.median(meas["step_seconds"])
            rows.append({
                "split": split, "ranks": name, "adapters": meas["adapters"],
                "predicted_peak_rss_bytes": pred.peak_rss_bytes, "measured_peak_rss_bytes": meas["peak_rss_bytes"],
                "memory_error": pred.peak_rss_bytes / meas["peak_rss_bytes"] - 1,
                "predicted_step_s": pred.seconds, "measured_step_s": seconds,
                "time_error": pred.seconds / seconds - 1,
                "prediction": pred.to_dict(), "measured_step_seconds": meas["step_seconds"],
            })
            r = rows[-1]
            print(f"k={split:2d} {name:8s} memory {r['predicted_peak_rss_bytes'] / 2**20:6.0f} vs "
                  f"{r['measured_peak_rss_bytes'] / 2**20:6.0f} MiB ({r['memory_error']:+.1%}), time "
                  f"{r['predicted_step_s']:.3f} vs {r['measured_step_s']:.3f} s ({r['time_error']:+.1%})", flush=True)
    return rows


def markdown(profile: dict, rows: list[dict], model: str, steps: int) -> str:
    mib = 2**20
    worst_mem = max(abs(r["memory_error"]) for r in rows)
    worst_time = max(abs(r["time_error"]) for r in rows)
    lines = [
        "## Calibrated cost model (`bench/calibration.py`)",
        "",
        f"Model {model}, batch {profile['batch']} x {profile['seq']} tokens, {profile['threads']} torch thread(s), "
        f"fp16 wire; measured {time.strftime('%Y-%m-%d')} on {platform.machine()} ({profile['machine']}). "
        f"One profile (`hsplitlora profile`, {profile['seconds']:.1f} s) predicts every row; each row is a separate "
        f"client-like process (model loaded as the SDK client loads it, LoRA on blocks[0:k], forward, h up and a "
        f"gradient-sized reply down through the server's `/v1/probe` on 127.0.0.1, backward with a random dL/dh, "
        f"AdamW), {steps} timed steps after a warm-up (median). Memory is the process's peak RSS (VmHWM). "
        f"Ranks: `q,v r8` = q and v at rank 8, `all rN` = all seven projections at rank N, in every device block.",
        "",
        f"Profile: fp32 matmul {profile['flops_fp32'] / 1e9:.1f} GFLOP/s, {profile['seconds_per_block'] * 1e3:.0f} ms "
        f"per block forward+backward ({profile['seconds_per_adapted_block'] * 1e3:.0f} ms with every projection "
        f"adapted, {profile['seconds_input_grad'] * 1e3:.0f} ms of it the input's gradient, which block 0 does "
        f"not compute), runtime baseline {profile['baseline_rss_bytes'] / mib:.0f} MiB, allocator overhead "
        f"x{profile['allocator_overhead']:.2f}, link up "
        f"{profile['upload_bytes_per_s'] / 1e6:.0f} MB/s / down {profile['download_bytes_per_s'] / 1e6:.0f} MB/s, "
        f"rtt {profile['rtt_s'] * 1e3:.1f} ms.",
        "",
        "| k | ranks | adapters | predicted MiB | measured MiB | error | predicted s | measured s | error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['split']} | {r['ranks']} | {r['adapters']} | {r['predicted_peak_rss_bytes'] / mib:.0f} | "
            f"{r['measured_peak_rss_bytes'] / mib:.0f} | {r['memory_error']:+.1%} | {r['predicted_step_s']:.3f} | "
            f"{r['measured_step_s']:.3f} | {r['time_error']:+.1%} |")
    verdict = lambda worst, goal: "met" if worst <= goal else "**not met**"
    lines += [
        "",
        f"Worst memory error {worst_mem:.1%} (goal ±{GOALS['memory']:.0%}: {verdict(worst_mem, GOALS['memory'])}); "
        f"worst time error {worst_time:.1%} (goal ±{GOALS['time']:.0%}: {verdict(worst_time, GOALS['time'])}). "
        "Raw numbers and each prediction's breakdown: `docs/results/calibration.json`.",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--splits", default=",".join(map(str, SPLITS)))
    p.add_argument("--steps", type=int, default=6, help="timed steps per process, after one warm-up")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "calibration.json")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    # The client-like process (run by this script).
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--split", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ranks", help=argparse.SUPPRESS)
    p.add_argument("--probe", help=argparse.SUPPRESS)
    p.add_argument("--wire", default="fp16", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    # Imported here, not at the top: the worker processes must hold only what a client holds.
    sys.path.insert(0, str(Path(__file__).parent))
    from methods import replace_section

    from edge_sdk.profile import profile_device
    from app.demo import free_port, wait_healthy

    with TemporaryDirectory() as state:
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "app", "server", "--model", args.model, "--port", str(port),
             "--state", state, "--open-registration", "--batch-size", str(args.batch), "--max-len", str(args.seq)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, server)
            profile = profile_device(args.model, args.batch, args.seq, url, args.threads).to_dict()
            print(json.dumps(profile, indent=1), flush=True)
            splits = [int(s) for s in args.splits.split(",")]
            rows = calibrate(profile, args.model, splits, RANK_SETTINGS, args.steps, url)
        finally:
            server.terminate()
            server.wait()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "profile": profile, "rows": rows}, indent=1))
    replace_section(args.doc, "calibration", markdown(profile, rows, args.model, args.steps))
    print(f"written {args.out} and the calibration section of {args.doc}")


if __name__ == "__main__":
    main()
