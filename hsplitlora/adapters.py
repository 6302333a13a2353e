"""Adapters on disk in Hugging Face PEFT's format, and merged model directories.

`save_adapter` writes `adapter_config.json` (with `rank_pattern` / `alpha_pattern`) and
`adapter_model.safetensors` so that `PeftModel.from_pretrained(base, dir)` reproduces the
project's model. GPT-2's q/k/v adapters live in one fused `c_attn` module for PEFT: they are
written as one adapter whose A stacks the parts' A and whose B is block-diagonal with each part's
scale folded in (alpha = rank, so PEFT's own scale is 1): the product is exactly the sum of the
parts. A small `hsplitlora.json` records the parts so the project can read its own files back.
"""

from __future__ import annotations

import copy
import json
from collections import Counter, defaultdict
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hsplitlora.family import family_of
from hsplitlora.lora import (
    LoRAFactors,
    Target,
    adapters,
    apply_lora,
    lora_layer,
    merge_adapters,
    module_path,
    remove_lora,
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PARTS_FILE = "hsplitlora.json"


def _peft_key(path: str, factor: str) -> str:
    return f"base_model.model.{path}.lora_{factor}.weight"


def _fuse(model: PreTrainedModel, parts: list[tuple[Target, LoRAFactors]]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One (A, B, alpha) for PEFT from the adapters sharing a module; exact when there is only one."""
    layer = lora_layer(model, parts[0][0])
    if len(parts) == 1 and layer.slices[parts[0][0].proj] == (0, layer.d_out):
        factors = parts[0][1]
        return factors.A.detach(), factors.B.detach(), factors.alpha
    total = sum(f.rank for _, f in parts)
    a = torch.cat([f.A.detach() for _, f in parts])
    b = torch.zeros(layer.d_out, total, dtype=a.dtype)
    col = 0
    for target, factors in parts:
        lo, hi = layer.slices[target.proj]
        b[lo:hi, col:col + factors.rank] = factors.scale * factors.B.detach()
        col += factors.rank
    return a, b, float(total)


def save_adapter(model: PreTrainedModel, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's adapters as a PEFT LoRA adapter directory; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_path: dict[str, list[tuple[Target, LoRAFactors]]] = defaultdict(list)
    for target, factors in adapters(model).items():
        by_path[module_path(model, target)].append((target, factors))
    if not by_path:
        raise ValueError("the model has no LoRA adapters to save")
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for path, parts in sorted(by_path.items()):
        a, b, alpha = _fuse(model, parts)
        tensors[_peft_key(path, "A")] = a.contiguous()
        tensors[_peft_key(path, "B")] = b.contiguous()
        rank_pattern[path], alpha_pattern[path] = a.shape[0], alpha
    config = LoraConfig(
        r=Counter(rank_pattern.values()).most_common(1)[0][0],
        lora_alpha=Counter(alpha_pattern.values()).most_common(1)[0][0],
        target_modules=sorted(by_path),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=family_of(model).name == "gpt2",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path or model.name_or_path,
    )
    config.save_pretrained(str(out))
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    parts_doc = {
        path: [{"target": str(t), "rank": f.rank, "alpha": f.alpha} for t, f in parts]
        for path, parts in sorted(by_path.items())
    }
    (out / PARTS_FILE).write_text(json.dumps(parts_doc, indent=1) + "\n")
    return out


def load_adapter(model: PreTrainedModel, adapter_dir: str | Path) -> dict[Target, LoRAFactors]:
    """Put the adapters of a PEFT LoRA directory (written by `save_adapter`) into the model."""
    src = Path(adapter_dir)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (src / name).is_file():
            raise FileNotFoundError(f"{src} is not a PEFT adapter directory: {name} is missing")
    config = json.loads((src / CONFIG_FILE).read_text())
    tensors = load_file(str(src / WEIGHTS_FILE))
    parts_doc = json.loads((src / PARTS_FILE).read_text()) if (src / PARTS_FILE).is_file() else {}
    alpha_pattern = config.get("alpha_pattern") or {}
    loaded: dict[Target, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        path = key[len("base_model.model."):-len(".lora_A.weight")]
        a, b = tensors[key], tensors[_peft_key(path, "B")]
        alpha = float(alpha_pattern.get(path, config["lora_alpha"]))
        targets = [Target.parse(p["target"]) for p in parts_doc.get(path, [])] or _targets_at(model, path)
        if len(targets) == 1:
            loaded[targets[0]] = (a, b, alpha)
            continue
        if path not in parts_doc:
            raise ValueError(
                f"{src}: {path} adapts a fused module as one block; only adapters written by "
                "hsplitlora (with hsplitlora.json) can be split into their q/k/v parts"
            )
        col = 0
        for part in parts_doc[path]:
            target, rank = Target.parse(part["target"]), part["rank"]
            lo, hi = lora_layer(model, target).slices[target.proj]
            # B was stored with the part's scale folded in: undo it so rank and alpha round-trip.
            scale = part["alpha"] / rank
            loaded[target] = (a[col:col + rank], b[lo:hi, col:col + rank] / scale, part["alpha"])
            col += rank
    ranks = {t: a.shape[0] for t, (a, _, _) in loaded.items()}
    alphas = {t: alpha for t, (_, _, alpha) in loaded.items()}
    created = apply_lora(model, ranks, alphas)
    with torch.no_grad():
        for target, (a, b, _) in loaded.items():
            created[target].A.copy_(a)
            created[target].B.copy_(b)
    return created


def _targets_at(model: PreTrainedModel, path: str) -> list[Target]:
    family = family_of(model)
    n = len(family.blocks(model))
    found = [Target(i, p) for i in range(n) for p in family.projections if module_path(model, Target(i, p)) == path]
    if not found:
        raise ValueError(f"adapter module {path!r} is not an adaptable projection of this model")
    return found


def save_merged(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """Write a plain model directory with every adapter merged in; transformers loads it as is."""
    out = Path(out_dir)
    merged = copy.deepcopy(model)
    merge_adapters(merged, reinit=False)
    remove_lora(merged)
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out
