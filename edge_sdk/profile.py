"""The device profiler: what this device can do, measured in seconds (`hsplitlora profile`).

A device sends its profile at registration; the server plans its split and ranks from it, and
`hsplitlora.predict` turns it into predicted step time and peak memory (design §3.3). Measured:

- sustained matmul FLOP/s at the model's shapes (tokens x hidden @ hidden x intermediate) in
  fp32, and in fp16/bf16 when the device runs them at least half as fast (None otherwise: a
  dtype the planner should not choose);
- memory available for training: the smaller of the kernel's MemAvailable and what the memory
  limits of this process's cgroup and its ancestors leave, times `memory_fraction` (default
  0.8: the rest stays for the OS, the page cache and other apps). It is measured before the
  model is loaded, while this process holds about what the client's runtime will hold, so that
  runtime is already accounted for;
- for the model at hand at (batch, seq): one block's forward + backward seconds, frozen and with
  every projection adapted; the bytes autograd keeps for one frozen block and what adapting each
  projection adds;
- the runtime baseline: the resident memory of a fresh process that imported the client and
  loaded the model (weights are memory-mapped and only become resident when a step reads them),
  and the allocator's overhead: that process then trains two blocks for a few steps, and its
  anonymous resident memory grows by `allocator_overhead` times the bytes training keeps live
  (glibc's malloc keeps freed temporaries in its heap, a little over 2x on x86-64 Linux);
- with a server: upload and download bandwidth and the round-trip time, against `/v1/probe`.

`memory_bytes` is the key the server's planner reads as the device's memory budget.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import torch

from edge_sdk.cgroups import available_memory, process_memory
from hsplitlora.configs import add_arguments as config_arguments
from hsplitlora.configs import from_arguments, option
from hsplitlora.federation.protocol import DEFAULT_BATCH_SIZE, DEFAULT_MAX_LEN
from hsplitlora.models import DEFAULT_MODEL, MODEL_HELP

LORA_PROBE_RANK = 8


@dataclass
class ProfileConfig:
    """What `hsplitlora profile` measures, and where it writes the profile."""

    out: Path = option(help="write the profile JSON here")
    model: str = option(DEFAULT_MODEL, help="the model to profile: " + MODEL_HELP)
    server: str | None = option(None, help="server URL whose link to measure, e.g. http://127.0.0.1:8080")
    batch_size: int = option(DEFAULT_BATCH_SIZE, help="sequences per step, as the server trains them")
    max_len: int = option(DEFAULT_MAX_LEN, help="tokens per sequence, as the server trains them")
    threads: int | None = option(None, help="torch threads, as the client will use (default: torch's choice)")
    memory_fraction: float = option(0.8, help="share of the available memory offered for training")
    cafile: Path | None = option(None, help="CA certificate to trust for an HTTPS server")


@dataclass
class DeviceProfile:
    """One device's measured capabilities; `to_dict()` is what registration sends."""

    memory_bytes: float  # budget for training: memory_fraction x available_memory_bytes
    available_memory_bytes: int
    memory_fraction: float
    flops_fp32: float  # sustained FLOP/s at the model's matmul shapes
    flops_fp16: float | None
    flops_bf16: float | None
    threads: int
    model: str
    batch: int
    seq: int
    seconds_per_block: float  # one frozen block forward + backward at batch x seq
    seconds_per_adapted_block: float  # ... with every projection adapted (rank 8)
    saved_bytes_frozen_block: int
    saved_bytes_per_adapter: dict[str, int]  # projection -> extra bytes autograd keeps per block
    baseline_rss_bytes: int
    allocator_overhead: float  # resident bytes per byte training keeps live (>= 1)
    upload_bytes_per_s: float | None = None
    download_bytes_per_s: float | None = None
    rtt_s: float | None = None
    seconds_input_grad: float = 0.0  # what an adapted block spends on its input's gradient (block 0 has none)
    machine: str = ""
    seconds: float = 0.0  # how long profiling took

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DeviceProfile:
        names = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.name not in data and f.default is MISSING]
        if missing:
            raise ValueError(f"device profile lacks {', '.join(missing)}")
        return cls(**{k: v for k, v in data.items() if k in names})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> DeviceProfile:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def summary(self) -> str:
        """A few readable lines for the terminal."""

        def g(x: float | None, unit: str = "GFLOP/s") -> str:
            return "not usable" if x is None else f"{x / 1e9:.1f} {unit}"

        lines = [
            f"device       {self.machine}, {self.threads} thread(s)",
            f"matmul       fp32 {g(self.flops_fp32)}, fp16 {g(self.flops_fp16)}, bf16 {g(self.flops_bf16)}",
            f"memory       {self.memory_bytes / 2**20:.0f} MiB for training "
            f"({self.memory_fraction:.0%} of {self.available_memory_bytes / 2**20:.0f} MiB available); "
            f"runtime baseline {self.baseline_rss_bytes / 2**20:.0f} MiB, "
            f"allocator overhead x{self.allocator_overhead:.2f}",
            f"model        {self.model} at batch {self.batch} x seq {self.seq}: "
            f"{self.seconds_per_block * 1e3:.1f} ms per block forward+backward "
            f"({self.seconds_per_adapted_block * 1e3:.1f} ms with every projection adapted, "
            f"{self.seconds_input_grad * 1e3:.1f} ms of it the input's gradient), "
            f"{self.saved_bytes_frozen_block / 2**20:.1f} MiB saved per frozen block",
        ]
        if self.rtt_s is not None:
            lines.append(f"link         up {self.upload_bytes_per_s / 1e6:.1f} MB/s, "
                         f"down {self.download_bytes_per_s / 1e6:.1f} MB/s, rtt {self.rtt_s * 1e3:.1f} ms")
        lines.append(f"profiled in  {self.seconds:.1f} s")
        return "\n".join(lines)


# ----- memory --------------------------------------------------------------------------------
def _runtime_probe(model_name: str, threads: int, batch: int, seq: int, blocks: int = 2, steps: int = 5) -> dict:
    """Run in a fresh process: the resident baseline, then the anonymous memory a short training adds."""
    torch.set_num_threads(threads)
    import edge_sdk.client  # noqa: F401  (the client's imports are part of its baseline)
    from hsplitlora.family import family_of
    from hsplitlora.lora import Target, apply_lora
    from hsplitlora.models import load_model
    from hsplitlora.split import Segment
    from hsplitlora.train import make_optimizer

    model, _ = load_model(model_name)
    before = process_memory()
    ranks = {Target(b, p): LORA_PROBE_RANK for b in range(blocks) for p in family_of(model).projections}
    factors = apply_lora(model, ranks)
    optimizer = make_optimizer((p for f in factors.values() for p in f.parameters()), 1e-3)
    segment = Segment(model, 0, blocks, embed=True, head=False)
    model.train()
    peak = before["RssAnon"]
    for _ in range(steps):
        h = segment(torch.randint(0, model.config.vocab_size, (batch, seq)), torch.ones(batch, seq, dtype=torch.long))
        peak = max(peak, process_memory()["RssAnon"])  # RSS only grows within a step: sample at its ends
        h.backward(torch.randn_like(h))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        peak = max(peak, process_memory()["RssAnon"])
    return {"baseline_rss_bytes": before["VmRSS"], "anon_growth_bytes": peak - before["RssAnon"], "blocks": blocks}


def runtime_probe(model: str, threads: int, batch: int, seq: int) -> dict:
    """`_runtime_probe` in a fresh process: the profiler's own holds the profiling's leftovers."""
    code = ("import json, sys; from edge_sdk.profile import _runtime_probe; "
            "print(json.dumps(_runtime_probe(sys.argv[1], *map(int, sys.argv[2:]))))")
    out = subprocess.run([sys.executable, "-c", code, model, str(threads), str(batch), str(seq)],
                         capture_output=True, text=True, check=False,
                         env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    if out.returncode != 0:
        raise RuntimeError(f"measuring the runtime baseline failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----- compute -------------------------------------------------------------------------------
def _rate(work: Callable[[], object], flops: float, min_seconds: float, min_reps: int = 3) -> float:
    """Sustained FLOP/s of `work`: one warm-up, then repeats for at least min_seconds; the median."""
    work()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        work()
        times.append(time.perf_counter() - t)
    return flops / statistics.median(times)


def matmul_flops(tokens: int, d_in: int, d_out: int, dtype: torch.dtype = torch.float32,
                 min_seconds: float = 0.3) -> float:
    """FLOP/s of (tokens x d_in) @ (d_in x d_out) in `dtype`."""
    x, w = torch.randn(tokens, d_in, dtype=dtype), torch.randn(d_in, d_out, dtype=dtype)
    return _rate(lambda: x @ w, 2.0 * tokens * d_in * d_out, min_seconds)


def low_precision_flops(dtype: torch.dtype, fp32: float, tokens: int, d_in: int, d_out: int) -> float | None:
    """FLOP/s in fp16/bf16, or None when unsupported or under half the fp32 rate.

    A small matmul first: CPUs without native half-precision kernels run it tens of times
    slower than fp32, and a full-size measurement would then take seconds.
    """
    try:
        small = matmul_flops(min(tokens, 32), d_in, d_out, dtype, min_seconds=0.0)
        if small < fp32 / 4:
            return None
        rate = matmul_flops(tokens, d_in, d_out, dtype, min_seconds=0.2)
    except RuntimeError:  # no kernel for this dtype on this device
        return None
    return rate if rate >= fp32 / 2 else None


def _saved_bytes(run: Callable[[], object], exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves while `run` builds its graph (no parameters)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    del out
    return sum(storages.values())


@dataclass(frozen=True)
class BlockMeasurement:
    """One block of the model at batch x seq: forward + backward seconds and saved bytes."""

    seconds_frozen: float
    seconds_adapted: float  # every projection adapted at LORA_PROBE_RANK
    seconds_input_grad: float  # of seconds_adapted, what the input's gradient costs
    saved_frozen: int
    saved_per_adapter: dict[str, int]


def measure_blocks(model, batch: int, seq: int, reps: int = 9) -> BlockMeasurement:
    """Time and saved bytes of block 1, which stands for every block (its input needs a gradient,
    as every block's but the first does).

    Frozen and adapted runs alternate, so that a burst of load elsewhere on the machine hits both;
    an adapted run whose input needs no gradient (block 0's, fed by the frozen embedding) gives
    what the input's gradient costs.
    For the saved bytes, each projection is adapted alone at rank 1 and its 1-wide intermediate
    subtracted; `hsplitlora.predict` adds the real ranks' intermediates back.
    """
    from hsplitlora.family import family_of
    from hsplitlora.lora import Target, apply_lora, install_adapters
    from hsplitlora.split import Segment

    block = Segment(model, 1, 2, embed=False, head=False)
    projections = tuple(family_of(model).projections)
    h0 = torch.randn(batch, seq, model.config.hidden_size) * 0.1
    mask = torch.ones(batch, seq, dtype=torch.long)
    grad = torch.randn_like(h0)
    all_adapters = apply_lora(model, {Target(1, p): LORA_PROBE_RANK for p in projections})
    was_training = model.training
    model.train()

    def forward(input_grad: bool = True) -> torch.Tensor:
        return block(h0.clone().requires_grad_(input_grad), mask)

    def timed(factors, input_grad: bool = True) -> float:
        install_adapters(model, factors)
        start = time.perf_counter()
        forward(input_grad).backward(grad)
        return time.perf_counter() - start

    timed({}), timed(all_adapters)  # warm-up: first touch of the weights' pages, the allocator
    frozen_s, adapted_s, no_input_s = zip(*((timed({}), timed(all_adapters), timed(all_adapters, False))
                                            for _ in range(reps)))
    install_adapters(model, {})
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    frozen = _saved_bytes(forward, params)
    extra: dict[str, int] = {}
    for proj in projections:
        factors = apply_lora(model, {Target(1, proj): 1})
        own = {p.untyped_storage().data_ptr() for f in factors.values() for p in f.parameters()}
        extra[proj] = max(_saved_bytes(forward, params | own) - frozen - 4 * batch * seq, 0)
        install_adapters(model, {})
    model.train(was_training)
    adapted = statistics.median(adapted_s)
    input_grad = max(adapted - statistics.median(no_input_s), 0.0)
    return BlockMeasurement(statistics.median(frozen_s), adapted, input_grad, frozen, extra)


# ----- link ----------------------------------------------------------------------------------
async def measure_link(server: str, payload_bytes: int, repeats: int = 3, ssl=None) -> tuple[float, float, float]:
    """(upload bytes/s, download bytes/s, round-trip seconds) against the server's /v1/probe.

    The round trip is the median of empty requests; a transfer's time less one round trip gives
    its bandwidth (medians of `repeats`).
    """
    import aiohttp

    from edge_sdk.transport import retry_after
    from hsplitlora.federation.protocol import Route

    url = server.rstrip("/") + Route.PROBE
    payload = os.urandom(payload_bytes)  # random: nothing on the way can compress it
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def timed(method: str, **kw) -> tuple[float, int]:
            for _ in range(5):
                t = time.perf_counter()
                async with session.request(method, url, ssl=ssl, **kw) as resp:
                    body = await resp.read()
                    if resp.status == 429:  # over the server's rate for strangers: wait as it says, then measure
                        await asyncio.sleep(retry_after(resp.headers))
                        continue
                    if resp.status != 200:
                        raise RuntimeError(f"{method} {url}: {resp.status} {body[:200]!r}")
                return time.perf_counter() - t, len(body)
            raise RuntimeError(f"{method} {url}: still rate limited after 5 tries")

        await timed("GET", params={"bytes": "0"})  # connection set-up is not part of a step
        rtt = statistics.median([(await timed("GET", params={"bytes": "0"}))[0] for _ in range(5)])
        ups, downs = [], []
        for _ in range(repeats):
            seconds, _ = await timed("POST", data=payload)
            ups.append(payload_bytes / max(seconds - rtt, 1e-6))
            seconds, got = await timed("GET", params={"bytes": str(payload_bytes)})
            downs.append(got / max(seconds - rtt, 1e-6))
    return statistics.median(ups), statistics.median(downs), rtt


# ----- the whole profile ---------------------------------------------------------------------
def profile_device(model: str, batch: int = ProfileConfig.batch_size, seq: int = ProfileConfig.max_len,
                   server: str | None = None, threads: int | None = None,
                   memory_fraction: float = ProfileConfig.memory_fraction, wire_bytes: int = 2,
                   ssl=None) -> DeviceProfile:
    """Measure this device for `model` at batch x seq (and the link to `server`, if given)."""
    from hsplitlora.cost import ModelDims, StepShape
    from hsplitlora.family import family_of
    from hsplitlora.lora import Target
    from hsplitlora.models import load_model
    from hsplitlora.predict import DeviceRates, live_bytes

    if not 0 < memory_fraction <= 1:
        raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    start = time.perf_counter()
    available = available_memory()  # before the model: see the module docstring
    net, _ = load_model(model)
    dims = ModelDims.from_config(net.config)
    if dims.layers < 2:
        raise ValueError(f"profiling needs a model of at least 2 blocks; {model} has {dims.layers}")
    tokens = batch * seq
    with torch.no_grad():
        fp32 = matmul_flops(tokens, dims.hidden, dims.intermediate)
        fp16 = low_precision_flops(torch.float16, fp32, tokens, dims.hidden, dims.intermediate)
        bf16 = low_precision_flops(torch.bfloat16, fp32, tokens, dims.hidden, dims.intermediate)
    blocks = measure_blocks(net, batch, seq)
    projections = tuple(family_of(net).projections)
    del net
    link: tuple[float | None, ...] = (None, None, None)
    if server:
        link = asyncio.run(measure_link(server, tokens * dims.hidden * wire_bytes, ssl=ssl))
    runtime = runtime_probe(model, threads, batch, seq)
    # What the probe's training kept live, by the same counts the predictions use.
    rates = DeviceRates(flops_fp32=fp32, saved_bytes_frozen_block=blocks.saved_frozen,
                        saved_bytes_per_adapter=blocks.saved_per_adapter, profiled_tokens=tokens)
    probe_ranks = {Target(b, p): LORA_PROBE_RANK for b in range(runtime["blocks"]) for p in projections}
    live = live_bytes(rates, dims, runtime["blocks"], probe_ranks, StepShape(batch, seq))
    return DeviceProfile(
        memory_bytes=memory_fraction * available, available_memory_bytes=available,
        memory_fraction=memory_fraction, flops_fp32=fp32, flops_fp16=fp16, flops_bf16=bf16,
        threads=threads, model=model, batch=batch, seq=seq, seconds_per_block=blocks.seconds_frozen,
        seconds_per_adapted_block=blocks.seconds_adapted, seconds_input_grad=blocks.seconds_input_grad,
        saved_bytes_frozen_block=blocks.saved_frozen,
        saved_bytes_per_adapter=blocks.saved_per_adapter, baseline_rss_bytes=runtime["baseline_rss_bytes"],
        allocator_overhead=max(runtime["anon_growth_bytes"] / live, 1.0),
        upload_bytes_per_s=link[0], download_bytes_per_s=link[1], rtt_s=link[2],
        machine=f"{platform.machine()} {platform.processor() or platform.system()}".strip(),
        seconds=time.perf_counter() - start,
    )


# ----- `hsplitlora profile` ------------------------------------------------------------------
DESCRIPTION = (
    "Measure this device in a few seconds: sustained matmul FLOP/s at the model's shapes (fp32; fp16/bf16 "
    "where the device runs them), memory available for training, the model's per-block forward+backward "
    "time and saved activations at the training batch, the runtime's resident baseline, and, with --server, "
    "the link's upload/download bandwidth and round-trip time. Prints a summary and writes the profile as "
    "JSON: the object a client sends at registration, from which the server plans its split and ranks."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    config_arguments(p, ProfileConfig)


def run(args: argparse.Namespace) -> int:
    import ssl

    cfg = from_arguments(ProfileConfig, args)
    context = ssl.create_default_context(cafile=str(cfg.cafile)) if cfg.cafile else None
    profile = profile_device(cfg.model, cfg.batch_size, cfg.max_len, cfg.server, cfg.threads, cfg.memory_fraction,
                             ssl=context)
    print(profile.summary())
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    profile.save(cfg.out)
    print(f"profile written to {cfg.out}")
    return 0
