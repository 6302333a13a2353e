"""Shared fixtures: tiny models of both families and the E2E data directory."""

from __future__ import annotations

import pytest
import torch
from transformers.utils import logging as hf_logging

from hsplitlora.data import default_e2e_dir
from hsplitlora.models import load_model

FAMILY_MODELS = ["tiny-llama", "tiny-gpt2"]
hf_logging.disable_progress_bar()


@pytest.fixture(scope="session")
def e2e_dir():
    path = default_e2e_dir()
    if not (path / "devset.csv").is_file():
        pytest.skip(f"E2E data not found at {path} (set HSPLITLORA_E2E_DIR)")
    return path


@pytest.fixture
def tiny():
    """Load a fresh tiny model + tokenizer by name (fresh so tests can change weights freely)."""
    return load_model


@pytest.fixture
def text_batch():
    """Two right-padded sentences for a tokenizer, as tensors (ids, mask)."""

    def make(tokenizer):
        enc = tokenizer(["Meaning representation: name[Aromi]\nDescription: a pub", "short"],
                        return_tensors="pt", padding=True)
        return enc["input_ids"], enc["attention_mask"]

    return make


def randomize_adapters(factors, seed: int = 0, std: float = 0.1) -> None:
    """Give fresh adapters non-zero B so that they change the output (B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for f in factors.values():
            f.B.copy_(torch.randn(f.B.shape, generator=gen) * std)
