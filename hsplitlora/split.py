"""The cut: a decoder model as a device segment (embeddings + blocks[0:k]) and a server segment.

Both segments hold references to the model's own modules, not copies, so LoRA wrapped into the
model (before or after the cut) is trained through either segment, and composing the two is the
full model exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from hsplitlora.data import IGNORE
from hsplitlora.family import family_of, num_layers


class Segment(nn.Module):
    """Blocks [start, stop) of a model, optionally with the embeddings in front and the head after."""

    def __init__(self, model: PreTrainedModel, start: int, stop: int, *, embed: bool, head: bool):
        super().__init__()
        n = num_layers(model)
        # No block at all only for a head (the server's part when the device holds every block).
        if not (0 <= start < stop <= n or (head and start == stop == n)):
            raise ValueError(f"block range [{start}, {stop}) is outside the model's {n} blocks")
        self.family = family_of(model)
        self.config = model.config
        self.start, self.stop = start, stop
        self.has_embed, self.has_head = embed, head
        mods: dict[str, nn.Module] = {}
        if embed:
            mods.update(self.family.embedding_modules(model))
        if head:
            mods.update(self.family.head_modules(model))
        if "rotary_emb" not in mods and self.family.name == "llama":
            mods["rotary_emb"] = model.model.rotary_emb  # buffers only: every Llama segment needs it
        self.mods = nn.ModuleDict(mods)
        self.blocks = nn.ModuleList(self.family.blocks(model)[start:stop])

    def blocks_output(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids (if the segment embeds) or hidden states in; the last block's output out."""
        h = self.family.embed(self.mods, x) if self.has_embed else x
        kwargs = self.family.block_kwargs(self.config, self.mods, h, attention_mask)
        for offset, block in enumerate(self.blocks):
            h = self.family.run_block(block, self.start + offset, h, kwargs)
        return h

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states at the cut (no head) or logits (with the head)."""
        h = self.blocks_output(x, attention_mask)
        return self.mods["lm_head"](self.mods["norm"](h)) if self.has_head else h

    def loss(self, x: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
             reduction: str = "mean") -> torch.Tensor:
        """Completion-token loss, running the LM head only where a label counts.

        The head (hidden x vocabulary) is about a third of a small model's compute; on E2E about
        half the positions are prompt or padding, so skipping them saves real time.
        """
        if not self.has_head:
            raise ValueError("this segment has no LM head: only the server segment computes the loss")
        h = self.mods["norm"](self.blocks_output(x, attention_mask))
        targets = labels[:, 1:]
        keep = targets != IGNORE
        logits = self.mods["lm_head"](h[:, :-1][keep])
        return F.cross_entropy(logits.float(), targets[keep], reduction=reduction)


def split_model(model: PreTrainedModel, k: int) -> tuple[Segment, Segment]:
    """Cut after block k: (device segment = embeddings + blocks[0:k], server segment = the rest).

    k = n (every block on the device) leaves the server segment the final norm and the head: how a
    strategy that trains the whole model on the device runs over the network."""
    n = num_layers(model)
    if not 1 <= k <= n:
        raise ValueError(f"split point must satisfy 1 <= k <= {n} (the model has {n} blocks), got {k}")
    return Segment(model, 0, k, embed=True, head=False), Segment(model, k, n, embed=False, head=True)


def whole_model(model: PreTrainedModel) -> Segment:
    """The uncut model as one segment (centralised training, evaluation)."""
    return Segment(model, 0, num_layers(model), embed=True, head=True)
