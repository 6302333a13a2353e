"""Important weight identification: HSplitLoRA's resource-normalised |W * dL/dW| score (our formulation).

g(W) = mean over elements of |W * dL/dW|, a first-order estimate of how much the loss would move
if W were perturbed along its gradient (the AdaLoRA / PLATON sensitivity). The frozen W gets no
gradient from autograd, so dL/dW = sum over tokens of grad_out^T x is formed from hooks, one weight
at a time, and dropped as soon as its score is taken: no full weight gradient is kept.
I(W) = g(W) / c(W), c(W) = (d_in + d_out) normalised to mean 1 over the candidates: the cost of a
LoRA adapter on W, so a cheap weight with the same sensitivity ranks higher.
Ibar_t = beta_t * Ibar_{t-1} + (1 - beta_t) * I_t, with beta_t rising with training progress.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from transformers import PreTrainedModel

from hsplitlora.cost import ModelDims
from hsplitlora.family import family_of
from hsplitlora.lora import LoRALinear, Target, lora_layer


def all_targets(model: PreTrainedModel, layers: Iterable[int] | None = None) -> list[Target]:
    """Every adaptable weight of the given blocks (all blocks by default)."""
    family = family_of(model)
    n = len(family.blocks(model))
    return [Target(i, p) for i in (layers if layers is not None else range(n)) for p in family.projections]


def _base_and_slice(model: PreTrainedModel, target: Target) -> tuple[nn.Module, tuple[int, int], bool]:
    layer = lora_layer(model, target)  # wraps on first use; a wrapper without adapters is the plain layer
    return layer.base, layer.slices[target.proj], layer.transposed


class SensitivityProbe:
    """Hooks that score g(W) for the targets during whatever forward/backward runs inside `with`.

    Used around a real training step (the split step's two backward halves included), the scores
    cost one extra (d_out x d_in) matmul per weight and nothing else. `scores` holds the sums over
    the backward passes seen.
    """

    def __init__(self, model: PreTrainedModel, targets: list[Target]):
        self.model = model
        self.scores: dict[Target, float] = {t: 0.0 for t in targets}
        self._by_module: dict[nn.Module, list[tuple[Target, tuple[int, int], bool]]] = {}
        for t in targets:
            base, out_slice, transposed = _base_and_slice(model, t)
            self._by_module.setdefault(base, []).append((t, out_slice, transposed))
        self._layers = sorted({t.layer for t in targets})
        self._handles: list = []

    def _on_forward(self, module, inputs, output):
        x = inputs[0].detach()
        if not output.requires_grad:
            return

        def on_grad(grad_out: torch.Tensor) -> None:
            xs = x.reshape(-1, x.shape[-1])
            gs = grad_out.reshape(-1, grad_out.shape[-1])
            for target, (lo, hi), transposed in self._by_module[module]:
                grad_w = gs[:, lo:hi].t() @ xs  # (d_out_slice, d_in), dropped after this line's use
                w = module.weight[:, lo:hi].t() if transposed else module.weight[lo:hi]
                self.scores[target] += float((w * grad_w).abs().mean())

        output.register_hook(on_grad)

    @staticmethod
    def _need_grad(module, args, kwargs):
        # A frozen model has nothing that requires a gradient before the first adapter; mark each
        # block's input so the backward pass reaches every hooked linear layer.
        h = args[0]
        if not h.requires_grad:
            h = h.detach().requires_grad_(True)
        return (h, *args[1:]), kwargs

    def __enter__(self) -> SensitivityProbe:
        blocks = family_of(self.model).blocks(self.model)
        self._handles = [m.register_forward_hook(self._on_forward) for m in self._by_module]
        self._handles += [blocks[i].register_forward_pre_hook(self._need_grad, with_kwargs=True)
                          for i in self._layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def normalised(self) -> dict[Target, float]:
        """The scores so far, resource-normalised (`resource_normalised`): what a round reports."""
        return resource_normalised(self.model, self.scores)


def sensitivity(
    model: PreTrainedModel, targets: list[Target], run_loss: Callable[[], torch.Tensor]
) -> dict[Target, float]:
    """g(W) for each target from one forward/backward of `run_loss()` (a profiling batch).

    Adapter gradients of this pass are dropped so that it never leaks into an optimizer step.
    """
    with SensitivityProbe(model, targets) as probe, torch.enable_grad():
        run_loss().backward()
    for p in (p for f in _adapters_of(model) for p in f.parameters()):
        p.grad = None
    return probe.scores


def _adapters_of(model: PreTrainedModel):
    return [a for m in model.modules() if isinstance(m, LoRALinear) for a in m.adapters.values()]


def resource_normalised(model: PreTrainedModel, scores: dict[Target, float]) -> dict[Target, float]:
    """I(W) = g(W) / c(W), with c(W) = d_in + d_out normalised to mean 1 over the model's weights.

    The mean is over every adaptable weight of the model, not over the ones scored, so scores taken
    on different parts of it (a device's blocks, the server's) are on one scale and can be averaged.
    """
    dims = ModelDims.from_config(model.config)
    cost = {p: sum(dims.weight_shape(p)) for p in dims.projections}
    mean_cost = sum(cost.values()) / len(cost)  # every block has the same projections
    return {t: s / (cost[t.proj] / mean_cost) for t, s in scores.items()}


def mean_scores(rows: list[dict[Target, float]]) -> dict[Target, float]:
    """Per weight, the mean of one round's scores over the clients that scored it.

    Not every client scores every weight: a device running an exported segment has no weight
    gradients, so only the server's half of its pipeline is scored.
    """
    sums: dict[Target, float] = {}
    counts: dict[Target, int] = {}
    for row in rows:
        for t, v in row.items():
            sums[t], counts[t] = sums.get(t, 0.0) + v, counts.get(t, 0) + 1
    return {t: sums[t] / counts[t] for t in sorted(sums)}


def fill_unscored(importance: dict[Target, float], targets: list[Target]) -> dict[Target, float]:
    """Every target with a score. A target never scored (its block is held only by devices that
    run exported segments, which have no weight gradients) takes the mean score of its projection
    over the blocks that were scored, or of all scored weights if its projection never was."""
    if not importance:
        return {}
    by_proj: dict[str, list[float]] = {}
    for t, v in importance.items():
        by_proj.setdefault(t.proj, []).append(v)
    overall = sum(importance.values()) / len(importance)
    out = {}
    for t in targets:
        same = by_proj.get(t.proj)
        out[t] = importance[t] if t in importance else (sum(same) / len(same) if same else overall)
    return out


@dataclass
class ImportanceTracker:
    """Smoothed importance: history weighs more as training progresses (scores settle)."""

    beta_start: float = 0.3
    beta_end: float = 0.9
    smoothed: dict[Target, float] = field(default_factory=dict)

    def beta(self, progress: float) -> float:
        progress = min(max(progress, 0.0), 1.0)
        return self.beta_start + (self.beta_end - self.beta_start) * progress

    def update(self, scores: dict[Target, float], progress: float) -> dict[Target, float]:
        """Fold in a new set of scores (progress in [0, 1]); weights first seen take their score."""
        b = self.beta(progress)
        for t, s in scores.items():
            self.smoothed[t] = b * self.smoothed[t] + (1 - b) * s if t in self.smoothed else s
        return dict(self.smoothed)

    def ranking(self) -> list[Target]:
        """Targets from most to least important."""
        return sorted(self.smoothed, key=lambda t: (-self.smoothed[t], t))
