"""Where each adapted frozen weight lives inside an artifact, so a device can merge updates in place.

After a noise-free aggregation (design §3.4) every holder of a weight W adds the merged update
to W. A device does that without downloading its segment again: the manifest lists, for every
weight that carries an adapter, each byte range of the artifact files that holds a copy of W
(fp32, little-endian, row-major) and its layout, "oi" (d_out x d_in, as `nn.Linear` stores it)
or "io" (d_in x d_out, as GPT-2's Conv1D stores it, or a transposed copy a compiler made). The
runtime reads one copy, adds the update, writes every copy back and reloads the program.

Copies are found by their exact bytes, which works for any container that stores tensors raw
(ONNX initializers, external data, the ExecuTorch constant segment, XNNPACK's named data).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hsplitlora.lora import LoRALinear
from hsplitlora.split import Segment

MAX_COPIES = 8  # more matches than this means the bytes are not distinctive (e.g. an all-zero W)


@dataclass(frozen=True)
class AdaptedWeight:
    name: str  # module path inside the segment, e.g. 'blocks.0.self_attn.q_proj.base'
    layer: int
    value: torch.Tensor  # (d_out, d_in), the layout updates are given in
    targets: dict[str, tuple[int, int]]  # projection -> the output rows its adapter covers


def adapted_weights(segment: Segment) -> list[AdaptedWeight]:
    """The frozen weights of the segment that can be adapted: every LoRA-wrapped linear layer.

    A layer is wrapped once any target in it is adapted or scored. Wrapped layers without an
    adapter are listed too (their `targets` are all their projections): the aggregate of a round
    can change a weight this device does not adapt, when another client adapts it.
    """
    out = []
    for offset, block in enumerate(segment.blocks):
        for name, module in block.named_modules():
            if isinstance(module, LoRALinear):
                w = module.base.weight.detach()
                out.append(AdaptedWeight(
                    name=f"blocks.{offset}.{name}.base",
                    layer=segment.start + offset,
                    value=(w.t() if module.transposed else w).contiguous().float(),
                    targets={proj: tuple(rows) for proj, rows in module.slices.items()},
                ))
    return out


def _find_all(blob: bytes, pattern: bytes) -> list[int]:
    found, start = [], 0
    while True:
        i = blob.find(pattern, start)
        if i < 0:
            return found
        found.append(i)
        start = i + 1


def locate(weights: list[AdaptedWeight], files: list[Path]) -> list[dict]:
    """The manifest's `frozen_weights` entries for one artifact: every copy of every adapted W.

    A weight with no copy found, or too many to be sure, gets `copies: []`, which tells the
    runtime it cannot merge into that weight in place.
    """
    blobs = {f.name: f.read_bytes() for f in files}
    entries = []
    for w in weights:
        copies = []
        for layout, tensor in (("oi", w.value), ("io", w.value.t().contiguous())):
            pattern = tensor.numpy().astype("<f4").tobytes()
            for name, blob in blobs.items():
                copies += [{"file": name, "offset": off, "layout": layout} for off in _find_all(blob, pattern)]
        if len(copies) > MAX_COPIES:
            copies = []
        entries.append({
            "name": w.name,
            "layer": w.layer,
            "shape": list(w.value.shape),
            "targets": {proj: list(rows) for proj, rows in sorted(w.targets.items())},
            "copies": sorted(copies, key=lambda c: (c["file"], c["offset"])),
        })
    return entries
