"""AdamW over a runtime's LoRA tensors, in SDK code (the ExecuTorch runtime ships SGD only, ONNX none).

The update is torch.optim.AdamW's (decoupled weight decay, bias-corrected moments), written out
with elementwise operations only, so it ports line by line to Kotlin or Swift:

    p <- p * (1 - lr * wd)
    m <- b1 * m + (1 - b1) * g            v <- b2 * v + (1 - b2) * g^2
    p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

The state is keyed by LoRA name, not bound to tensor objects, so a runtime may hand out new
tensors (e.g. after reloading a program) without the optimizer losing its moments.
"""

from __future__ import annotations

import math

import torch


class AdamW:
    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW settings: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.t = 0
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
        """Update every tensor in `params` in place with its gradient from `grads`."""
        missing = set(params) - set(grads)
        if missing:
            raise KeyError(f"no gradient for {sorted(missing)}")
        self.t += 1
        b1, b2 = self.betas
        step_size = self.lr / (1 - b1 ** self.t)
        bc2_sqrt = math.sqrt(1 - b2 ** self.t)
        for key, p in params.items():
            g = torch.as_tensor(grads[key]).to(p.dtype)
            if key not in self.m:
                self.m[key], self.v[key] = torch.zeros_like(p), torch.zeros_like(p)
            m, v = self.m[key], self.v[key]
            p.mul_(1 - self.lr * self.weight_decay)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.addcdiv_(m, v.sqrt().div_(bc2_sqrt).add_(self.eps), value=-step_size)

    def reset(self) -> None:
        """Forget the moments and the step count (after a merge, adapters restart from scratch)."""
        self.t = 0
        self.m.clear()
        self.v.clear()

    def state_dict(self) -> dict:
        return {"t": self.t, "m": {k: v.clone() for k, v in self.m.items()},
                "v": {k: v.clone() for k, v in self.v.items()},
                "hyper": {"lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                          "weight_decay": self.weight_decay}}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])
        self.m = {k: v.clone() for k, v in state["m"].items()}
        self.v = {k: v.clone() for k, v in state["v"].items()}
