"""Where each supported decoder family keeps its embeddings, blocks, head and projections.

Two layouts cover the supported models: the Llama layout (Llama, SmolLM2, Qwen2, Mistral: rotary
positions, separate q/k/v) and GPT-2 (learned positions, a fused `c_attn` stored as a Conv1D).
Everything family-specific in the project goes through this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask


@dataclass(frozen=True)
class Projection:
    """One adaptable weight inside a block: a module path and, for fused modules, its output third."""

    path: str
    part: int | None = None  # index into (q, k, v) of a fused qkv output; None = the whole output


class Family:
    """The interface the split and LoRA code use; one subclass per model layout."""

    name: str
    projections: dict[str, Projection]

    def blocks(self, model: PreTrainedModel) -> nn.ModuleList:
        raise NotImplementedError

    def embedding_modules(self, model: PreTrainedModel) -> dict[str, nn.Module]:
        """Modules the device segment needs besides its blocks (embeddings, rotary tables)."""
        raise NotImplementedError

    def head_modules(self, model: PreTrainedModel) -> dict[str, nn.Module]:
        """Modules the server segment needs besides its blocks: "norm" and "lm_head" at least."""
        raise NotImplementedError

    def embed(self, mods: nn.ModuleDict, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def block_kwargs(self, config, mods: nn.ModuleDict, h: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """Per-call inputs every block needs (masks, positions), rebuilt from the 2-D mask on each side."""
        raise NotImplementedError

    def run_block(self, block: nn.Module, index: int, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
        raise NotImplementedError


def _positions(h: torch.Tensor) -> torch.Tensor:
    # Training batches are right-padded, so positions are 0..T-1 for every row, as in transformers.
    return torch.arange(h.shape[1], device=h.device).unsqueeze(0)


class LlamaFamily(Family):
    name = "llama"
    projections = {
        "q": Projection("self_attn.q_proj"),
        "k": Projection("self_attn.k_proj"),
        "v": Projection("self_attn.v_proj"),
        "o": Projection("self_attn.o_proj"),
        "gate": Projection("mlp.gate_proj"),
        "up": Projection("mlp.up_proj"),
        "down": Projection("mlp.down_proj"),
    }

    def blocks(self, model):
        return model.model.layers

    def embedding_modules(self, model):
        return {"embed_tokens": model.model.embed_tokens, "rotary_emb": model.model.rotary_emb}

    def head_modules(self, model):
        return {"norm": model.model.norm, "rotary_emb": model.model.rotary_emb, "lm_head": model.lm_head}

    def embed(self, mods, input_ids):
        return mods["embed_tokens"](input_ids)

    def block_kwargs(self, config, mods, h, attention_mask):
        positions = _positions(h)
        common = dict(config=config, inputs_embeds=h, attention_mask=attention_mask, cache=None,
                      position_ids=positions)
        masks = {"full_attention": create_causal_mask(**common)}
        layer_types = getattr(config, "layer_types", None)
        if layer_types is None:
            # Mistral has no per-layer types: a sliding window, when set, applies to every layer.
            kind = "full_attention" if getattr(config, "sliding_window", None) is None else "sliding_attention"
            layer_types = [kind] * config.num_hidden_layers
        if "sliding_attention" in layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**common)
        return {
            "masks": masks,
            "layer_types": layer_types,
            "position_ids": positions,
            "position_embeddings": mods["rotary_emb"](h, positions),
        }

    def run_block(self, block, index, h, kwargs):
        return block(
            h,
            attention_mask=kwargs["masks"][kwargs["layer_types"][index]],
            position_ids=kwargs["position_ids"],
            position_embeddings=kwargs["position_embeddings"],
        )


class GPT2Family(Family):
    name = "gpt2"
    projections = {
        "q": Projection("attn.c_attn", part=0),
        "k": Projection("attn.c_attn", part=1),
        "v": Projection("attn.c_attn", part=2),
        "o": Projection("attn.c_proj"),
        "up": Projection("mlp.c_fc"),
        "down": Projection("mlp.c_proj"),
    }

    def blocks(self, model):
        return model.transformer.h

    def embedding_modules(self, model):
        t = model.transformer
        return {"wte": t.wte, "wpe": t.wpe, "drop": t.drop}

    def head_modules(self, model):
        return {"norm": model.transformer.ln_f, "lm_head": model.lm_head}

    def embed(self, mods, input_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return mods["drop"](mods["wte"](input_ids) + mods["wpe"](positions))

    def block_kwargs(self, config, mods, h, attention_mask):
        positions = _positions(h)
        mask = create_causal_mask(config=config, inputs_embeds=h, attention_mask=attention_mask,
                                  cache=None, position_ids=positions)
        return {"mask": mask, "position_ids": positions}

    def run_block(self, block, index, h, kwargs):
        return block(h, None, kwargs["mask"], position_ids=kwargs["position_ids"])


FAMILIES: dict[str, Family] = {"llama": LlamaFamily(), "gpt2": GPT2Family()}
_MODEL_TYPES = {"llama": "llama", "qwen2": "llama", "mistral": "llama", "gpt2": "gpt2"}


def family_of(model: PreTrainedModel) -> Family:
    """The layout of a loaded model, or a clear error for an unsupported architecture."""
    model_type = model.config.model_type
    if model_type not in _MODEL_TYPES:
        raise ValueError(
            f"model type {model_type!r} is not supported; supported: {', '.join(sorted(_MODEL_TYPES))}"
        )
    return FAMILIES[_MODEL_TYPES[model_type]]


def num_layers(model: PreTrainedModel) -> int:
    return len(family_of(model).blocks(model))
