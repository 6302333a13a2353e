"""Greedy generation of completions for evaluation and before/after samples."""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.no_grad()
def generate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
    max_new_tokens: int = 64, batch_size: int = 8,
) -> list[str]:
    """Greedy completions, cut at EOS or the first newline (E2E descriptions are one line)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation needs the prompts flush right
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True,
                            add_special_tokens=False)
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
            for row in out[:, enc["input_ids"].shape[1]:]:
                text = tokenizer.decode(row, skip_special_tokens=True)
                outputs.append(text.strip().split("\n")[0].strip())
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs
