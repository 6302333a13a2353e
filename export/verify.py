"""Parity of an artifact's step with PyTorch eager autograd, on a fixed random input.

Errors are relative to the largest magnitude: for h, max|h - h_ref| / max|h_ref|; for the
gradients, max over every LoRA tensor of max|g - g_ref| divided by the largest |g_ref| of any
LoRA tensor (a tensor whose gradient is tiny is not held to a bound it cannot meet in fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hsplitlora.lora import Target



class VerificationError(RuntimeError):
    """An artifact's outputs differ from eager autograd by more than the tolerance."""


@dataclass(frozen=True)
class Parity:
    h: float
    grads: float
    worst: str  # the LoRA key of the worst gradient
    per_tensor: dict[str, float]
    h_scale: float  # max |h_ref|
    grad_scale: float  # max |g_ref| over all LoRA tensors

    def ok(self, rtol: float) -> bool:
        return self.h <= rtol and self.grads <= rtol

    def describe(self) -> str:
        return (f"h: max error {self.h:.2e} relative to max|h| = {self.h_scale:.3g}; gradients: max error "
                f"{self.grads:.2e} relative to max|grad| = {self.grad_scale:.3g} (worst: {self.worst})")


def compare(ref_h: torch.Tensor, ref_grads: dict[str, torch.Tensor],
            h: torch.Tensor, grads: dict[str, torch.Tensor]) -> Parity:
    if tuple(h.shape) != tuple(ref_h.shape):
        raise VerificationError(f"h has shape {tuple(h.shape)}, eager gives {tuple(ref_h.shape)}")
    for key, g in ref_grads.items():
        if key not in grads:
            raise VerificationError(f"the artifact returns no gradient for {key}")
        if tuple(grads[key].shape) != tuple(g.shape):
            raise VerificationError(f"gradient {key} has shape {tuple(grads[key].shape)}, eager gives {tuple(g.shape)}")
    h_scale = float(ref_h.abs().max()) or 1.0
    grad_scale = max((float(g.abs().max()) for g in ref_grads.values()), default=0.0) or 1.0
    per = {k: float((grads[k].double() - g.double()).abs().max()) / grad_scale for k, g in ref_grads.items()}
    worst = max(per, key=per.get) if per else ""
    nan = not torch.isfinite(h).all() or any(not torch.isfinite(g).all() for g in grads.values())
    h_err = float("inf") if nan else float((h.double() - ref_h.double()).abs().max()) / h_scale
    return Parity(h=h_err, grads=float("inf") if nan else per.get(worst, 0.0), worst=worst, per_tensor=per,
                  h_scale=h_scale, grad_scale=grad_scale)


def verification_inputs(batch: int, seq: int, hidden: int, vocab: int,
                        lora_shapes: dict[str, tuple[int, ...]], seed: int = 1234):
    """Fixed random (input_ids, attention_mask, upstream_grad, lora) for a parity check.

    The last row is right-padded (as training batches are), so the check covers the mask input.

    B is non-zero (std 0.1) so that every factor's gradient is non-trivial: with B = 0, as fresh
    adapters start, the gradient of A is exactly zero and would check nothing.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if seq > 1:
        mask[-1, seq - seq // 3:] = 0  # right padding in the last row: the mask is a real input
    upstream = torch.randn(batch, seq, hidden, generator=gen)
    lora = {}
    for key, shape in lora_shapes.items():
        std = shape[1] ** -0.5 if Target.from_key(key)[1] == "A" else 0.1
        lora[key] = torch.randn(shape, generator=gen) * std
    return ids, mask, upstream, lora
