"""The cost model calibrated by a device profile: predicted step time and peak process memory.

`hsplitlora.cost` counts what a device segment holds and computes from the model's shapes alone;
this module turns those counts into seconds and resident bytes with what a device measured about
itself (`edge_sdk.profile`, design §3.3). The profile travels as a JSON object; `DeviceRates`
reads the keys this module needs, so the core depends on no device code.

Time of one split step (the device's forward and backward of blocks[0:split], the activations
going up, dL/dh coming down):

  compute   split x seconds_per_block (measured on the model at hand, one block forward+backward,
            scaled linearly by tokens when the step's shape differs from the profiled one), less
            what block 0 does not do: its input, the frozen embedding's output, needs no
            gradient (measured as seconds_input_grad; SmolLM2-135M: ~20 % of a block), plus
            for each adapter its share of what adapting every projection of a block added in the
            profile, shared in proportion to d_in + d_out and independent of the rank: at ranks
            up to 16 an adapter's time is the traffic of its input and output gradients, not its
            r-proportional FLOPs (SmolLM2-135M, 8 blocks: rank 16 everywhere is ~6 % slower than
            rank 4). Without per-block measurements, FLOPs / the fp32 matmul rate;
  transfer  h, the mask and the labels up, dL/dh down, at the measured bandwidths, plus one
            round trip. The optimizer step and the embedding lookup are not modelled: both are
            a few milliseconds against the blocks' hundreds.

Peak resident memory (RSS) of the device process:

  baseline   what the runtime holds before training: the interpreter, torch, the client's
             imports, the tokenizer and the model's structure, measured in a fresh process by
             the profiler. Weights are memory-mapped from the checkpoint, so they are not here;
  weights    the frozen weights the step touches: the embedding table and blocks[0:split]
             (`cost.device_memory`; the rest of the checkpoint stays on disk). The whole table
             is counted: the pages of every row a batch looks up become resident and stay;
  saved      the tensors autograd keeps for backward, per block as measured by the profiler
             (frozen block + the input each adapted projection makes autograd keep, shared by
             projections that read the same input) + each adapter's r-wide intermediate; the
             analytic count of `cost` where no measurement is given (an upper bound);
  lora       adapters with gradients and Adam moments, and the two cut buffers (`cost`);
  allocator  what the allocator keeps beyond the live bytes of the last three: glibc's malloc
             serves tensors under its (self-raising) mmap threshold from a heap that keeps
             freed temporaries, so a training process's anonymous memory grows by a little over
             twice what it holds live. The profiler measures the factor on the device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

from hsplitlora.cost import ModelDims, StepShape, device_flops, device_memory
from hsplitlora.lora import Target

# Projections that read the same input tensor: an adapter on any of them makes autograd keep
# that input once (x @ A^T needs x for A's gradient), however many of the group are adapted.
INPUT_GROUPS = {
    "llama": (("q", "k", "v"), ("o",), ("gate", "up"), ("down",)),
    "gpt2": (("q", "k", "v"), ("o",), ("up",), ("down",)),
}
LABEL_BYTES_PER_TOKEN = 16  # attention_mask and labels travel up as int64 with every step


@dataclass(frozen=True)
class DeviceRates:
    """What the predictions need from a device profile (the keys `edge_sdk.profile` writes).

    Per-block numbers were measured at `profiled_tokens` tokens (batch x seq of the profile).
    `saved_bytes_per_adapter[proj]` is what adapting `proj` alone adds to one block's saved
    tensors besides the adapter's own r-wide intermediate.
    """

    flops_fp32: float
    seconds_per_block: float | None = None
    seconds_per_adapted_block: float | None = None  # every projection adapted (rank does not matter)
    seconds_input_grad: float = 0.0  # what a block's input gradient costs (block 0 has none)
    saved_bytes_frozen_block: int | None = None
    saved_bytes_per_adapter: Mapping[str, int] | None = None
    profiled_tokens: int | None = None
    baseline_rss_bytes: int = 0
    allocator_overhead: float = 1.0  # resident bytes per live byte of training
    upload_bytes_per_s: float | None = None
    download_bytes_per_s: float | None = None
    rtt_s: float = 0.0

    def __post_init__(self):
        # A profile crosses the network: a NaN or a negative rate would make every plan "fit".
        numbers = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "saved_bytes_per_adapter"}
        numbers |= {f"saved_bytes_per_adapter.{k}": v for k, v in (self.saved_bytes_per_adapter or {}).items()}
        for name, value in numbers.items():
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"device profile: {name} must be a finite number >= 0, got {value}")
        if not self.flops_fp32 > 0 or self.allocator_overhead < 1:
            raise ValueError("device profile: flops_fp32 must be > 0 and allocator_overhead >= 1")

    @classmethod
    def from_profile(cls, profile: Mapping) -> DeviceRates:
        """The rates of a profile dict; unknown keys are ignored, missing optional ones stay None."""
        try:
            flops = float(profile["flops_fp32"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("a device profile needs flops_fp32 (FLOP/s) to predict step time") from None
        tokens = None
        if profile.get("batch") and profile.get("seq"):
            tokens = int(profile["batch"]) * int(profile["seq"])

        def opt(key: str, kind=float):
            value = profile.get(key)
            return None if value is None else kind(value)

        adapters = profile.get("saved_bytes_per_adapter")
        return cls(
            flops_fp32=flops, seconds_per_block=opt("seconds_per_block"),
            seconds_per_adapted_block=opt("seconds_per_adapted_block"),
            seconds_input_grad=float(profile.get("seconds_input_grad") or 0.0),
            saved_bytes_frozen_block=opt("saved_bytes_frozen_block", int),
            saved_bytes_per_adapter={str(k): int(v) for k, v in adapters.items()} if adapters else None,
            profiled_tokens=tokens, baseline_rss_bytes=int(profile.get("baseline_rss_bytes") or 0),
            allocator_overhead=float(profile.get("allocator_overhead") or 1.0),
            upload_bytes_per_s=opt("upload_bytes_per_s"), download_bytes_per_s=opt("download_bytes_per_s"),
            rtt_s=float(profile.get("rtt_s") or 0.0),
        )


@dataclass(frozen=True)
class StepPrediction:
    """Predicted seconds of one split step and peak resident bytes of the device process."""

    compute_s: float
    upload_s: float
    download_s: float
    rtt_s: float
    baseline_bytes: int
    weights_bytes: int
    saved_bytes: int
    lora_bytes: int
    buffer_bytes: int
    allocator_bytes: int

    @property
    def seconds(self) -> float:
        return self.compute_s + self.upload_s + self.download_s + self.rtt_s

    @property
    def peak_rss_bytes(self) -> int:
        return (self.baseline_bytes + self.weights_bytes + self.saved_bytes + self.lora_bytes + self.buffer_bytes
                + self.allocator_bytes)

    def to_dict(self) -> dict:
        return {**asdict(self), "seconds": self.seconds, "peak_rss_bytes": self.peak_rss_bytes}

    @classmethod
    def from_dict(cls, data: Mapping) -> StepPrediction:
        """Back from `to_dict` (the derived totals are recomputed, not read)."""
        kinds = {"float": float, "int": int}
        return cls(**{f.name: kinds[f.type](data[f.name]) for f in fields(cls)})


def _by_layer(ranks: dict[Target, int], split: int) -> dict[int, dict[str, int]]:
    layers: dict[int, dict[str, int]] = {}
    for t, r in ranks.items():
        if t.layer < split and r > 0:
            layers.setdefault(t.layer, {})[t.proj] = r
    return layers


def saved_bytes(rates: DeviceRates, dims: ModelDims, split: int, ranks: dict[Target, int], shape: StepShape,
                bytes_per_param: int = 4) -> int:
    """Bytes autograd keeps for backward across blocks[0:split] (module docstring, "saved")."""
    measured = rates.saved_bytes_frozen_block is not None and rates.saved_bytes_per_adapter and rates.profiled_tokens
    if not measured:
        return device_memory(dims, split, ranks, shape, bytes_per_param).activations
    per_token = 1 / rates.profiled_tokens
    extra = rates.saved_bytes_per_adapter
    total = split * rates.saved_bytes_frozen_block * per_token
    for adapted in _by_layer(ranks, split).values():
        for group in INPUT_GROUPS[dims.family]:
            total += max((extra.get(p, 0) for p in group if p in adapted), default=0) * per_token
        total += sum(adapted.values()) * bytes_per_param  # each adapter's x @ A^T, r wide
    return round(total * shape.tokens)


def live_bytes(rates: DeviceRates, dims: ModelDims, split: int, ranks: dict[Target, int], shape: StepShape,
               bytes_per_param: int = 4) -> int:
    """What training keeps live at its peak besides the weights: saved tensors, LoRA state, cut buffers."""
    memory = device_memory(dims, split, ranks, shape, bytes_per_param)
    return saved_bytes(rates, dims, split, ranks, shape, bytes_per_param) + memory.lora + memory.buffers


def compute_seconds(rates: DeviceRates, dims: ModelDims, split: int, ranks: dict[Target, int],
                    shape: StepShape) -> float:
    """Device forward + backward of blocks[0:split] with their adapters (module docstring)."""
    if rates.seconds_per_block is None or not rates.profiled_tokens:
        return device_flops(dims, split, ranks, shape) / rates.flops_fp32
    scale = shape.tokens / rates.profiled_tokens
    seconds = (split * rates.seconds_per_block - rates.seconds_input_grad) * scale
    if rates.seconds_per_adapted_block is not None:
        width = {p: sum(dims.weight_shape(p)) for p in dims.projections}
        per_width = max(rates.seconds_per_adapted_block - rates.seconds_per_block, 0.0) / sum(width.values())
        seconds += scale * per_width * sum(width[p] for adapted in _by_layer(ranks, split).values() for p in adapted)
    return seconds


def step_bytes(dims: ModelDims, shape: StepShape, wire_bytes: int) -> tuple[int, int]:
    """(up, down) payload bytes of one split step: h with mask and labels, then dL/dh."""
    h = shape.tokens * dims.hidden * wire_bytes
    return h + shape.tokens * LABEL_BYTES_PER_TOKEN, h


def predict_step(rates: DeviceRates, dims: ModelDims, split: int, ranks: dict[Target, int], shape: StepShape,
                 wire_bytes: int = 2, bytes_per_param: int = 4) -> StepPrediction:
    """Seconds of one split step and the device process's peak RSS for this split and these ranks.

    `wire_bytes` is the size of one activation element on the wire (2 for the default fp16).
    Transfer times are 0 when the profile has no link measurement.
    """
    memory = device_memory(dims, split, ranks, shape, bytes_per_param)
    up, down = step_bytes(dims, shape, wire_bytes)
    saved = saved_bytes(rates, dims, split, ranks, shape, bytes_per_param)
    return StepPrediction(
        compute_s=compute_seconds(rates, dims, split, ranks, shape),
        upload_s=up / rates.upload_bytes_per_s if rates.upload_bytes_per_s else 0.0,
        download_s=down / rates.download_bytes_per_s if rates.download_bytes_per_s else 0.0,
        rtt_s=rates.rtt_s,
        baseline_bytes=rates.baseline_rss_bytes,
        weights_bytes=memory.frozen_weights,
        saved_bytes=saved,
        lora_bytes=memory.lora,
        buffer_bytes=memory.buffers,
        allocator_bytes=round((rates.allocator_overhead - 1) * (saved + memory.lora + memory.buffers)),
    )
