"""Tensors on the wire: safetensors bytes, checked before anything uses them. Never pickle.

Activations and their gradients travel as fp16 by default, fp32 on request, or int8 with one
fp32 scale per token (per row of the last dimension), which keeps each token's relative error
near 1/254 whatever its magnitude. `decode` refuses, with a `WireError` that says what was wrong,
a payload that is too large, not safetensors, missing or carrying unexpected tensors, of a dtype
or shape other than expected, or with a NaN or infinity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

WIRE_FORMATS = ("fp16", "fp32", "int8")
BYTES_PER_ELEMENT = {"fp16": 2, "fp32": 4, "int8": 1}  # of an activation (int8's per-token scales aside)
_SCALE_SUFFIX = ".scale"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class WireError(ValueError):
    """A tensor payload that must be refused (the server answers it with a 4xx)."""


@dataclass(frozen=True)
class TensorSpec:
    """What one named tensor must look like: dtypes allowed and shape (None = any size there)."""

    shape: tuple[int | None, ...]
    dtypes: tuple[torch.dtype, ...] = _FLOAT_DTYPES
    finite: bool = True

    def check(self, name: str, t: torch.Tensor) -> None:
        if t.dtype not in self.dtypes:
            raise WireError(f"{name}: dtype {t.dtype} not allowed (expected one of {list(self.dtypes)})")
        if len(t.shape) != len(self.shape) or any(w is not None and w != s for w, s in zip(self.shape, t.shape)):
            want = "x".join("*" if w is None else str(w) for w in self.shape)
            raise WireError(f"{name}: shape {'x'.join(map(str, t.shape)) or 'scalar'} does not match {want}")
        if self.finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise WireError(f"{name}: contains NaN or infinite values")


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, fp32 scale per row of the last dimension)."""
    scale = x.detach().abs().amax(dim=-1, keepdim=True).float() / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8), scale


def encode(tensors: dict[str, torch.Tensor], fmt: str = "fp32", metadata: dict[str, str] | None = None) -> bytes:
    """Serialise tensors as safetensors; floating tensors are cast to the wire format."""
    if fmt not in WIRE_FORMATS:
        raise ValueError(f"wire format must be one of {', '.join(WIRE_FORMATS)}, got {fmt!r}")
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        t = t.detach().cpu()
        if not t.is_floating_point() or fmt == "fp32":
            out[name] = t.float().contiguous() if t.is_floating_point() else t.contiguous()
        elif fmt == "fp16":
            out[name] = t.to(torch.float16).contiguous()
        else:
            out[name], out[name + _SCALE_SUFFIX] = quantize_int8(t)
    return save(out, metadata={"wire": fmt, **(metadata or {})})


def _refuse_duplicate_names(data: bytes) -> None:
    """safetensors keeps the last of two tensors of one name; a payload carrying two is refused
    (ValueError) instead. The header is 8 bytes of length, then JSON."""
    if len(data) < 8:
        return  # too short to be safetensors: load() says so
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        return

    def unique(pairs):
        names = [k for k, _ in pairs]
        if len(names) != len(set(names)):
            raise ValueError(f"the header names a tensor twice: {sorted({n for n in names if names.count(n) > 1})}")
        return dict(pairs)

    try:
        json.loads(data[8:8 + size], object_pairs_hook=unique)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return  # not JSON: load() refuses it with its own message


def decode(data: bytes, specs: dict[str, TensorSpec] | None, max_bytes: int) -> dict[str, torch.Tensor]:
    """Parse and check a payload; floating tensors come back as fp32.

    Every name in `specs` must be present and nothing else; the checks run before any tensor is
    returned, so a refused payload changes nothing. `specs=None` accepts any names and shapes of
    finite float tensors (for replies from a server already trusted with the model).
    """
    if len(data) > max_bytes:
        raise WireError(f"payload is {len(data)} bytes, over the limit of {max_bytes}")
    try:
        _refuse_duplicate_names(data)
        raw = load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise WireError(f"not a valid safetensors payload: {e}") from None
    scales = {k[: -len(_SCALE_SUFFIX)]: raw.pop(k) for k in list(raw) if k.endswith(_SCALE_SUFFIX)}
    if specs is None:
        specs = {k: TensorSpec((None,) * v.dim()) for k, v in raw.items()}
    missing, extra = sorted(set(specs) - set(raw)), sorted(set(raw) - set(specs))
    if missing or extra:
        raise WireError(f"tensors missing: {missing or 'none'}; unexpected: {extra or 'none'}")
    out = {}
    for name, spec in specs.items():
        t = raw[name]
        if name in scales:
            scale = scales.pop(name)
            if t.dtype != torch.int8 or scale.dtype != torch.float32 or scale.shape != (*t.shape[:-1], 1):
                raise WireError(f"{name}: an int8 tensor needs an fp32 scale of shape {(*t.shape[:-1], 1)}")
            TensorSpec(scale.shape, (torch.float32,)).check(name + _SCALE_SUFFIX, scale)
            TensorSpec(spec.shape, (torch.int8,), finite=False).check(name, t)
            t = t.float() * scale
            if not bool(torch.isfinite(t).all()):  # finite parts, an overflowing product (int8 x 1e38)
                raise WireError(f"{name}: the dequantised values (int8 x scale) are not finite")
        else:
            spec.check(name, t)
        out[name] = t.float() if t.is_floating_point() else t
    if scales:
        raise WireError(f"scales without their tensors: {sorted(scales)}")
    return out
