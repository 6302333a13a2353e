"""The pieces of training every method shares: the optimizer and the evaluation loss."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from hsplitlora.data import Batch
from hsplitlora.split import Segment


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW over the trainable LoRA tensors (the optimizer SplitLoRA and every device runtime use)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires a gradient")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


@torch.no_grad()
def mean_loss(model: Segment, batches: Iterable[Batch]) -> float:
    """Token-weighted mean completion loss of an uncut model over the batches (NaN if no tokens)."""
    total, tokens = 0.0, 0
    for batch in batches:
        total += float(model.loss(batch.input_ids, batch.attention_mask, batch.labels, reduction="sum"))
        tokens += batch.target_tokens
    return total / tokens if tokens else math.nan
