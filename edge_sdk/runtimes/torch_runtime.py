"""Eager PyTorch: the device segment itself, always available, and the reference the others match."""

from __future__ import annotations

import torch

from edge_sdk.runtimes.base import DeviceRuntime
from hsplitlora.importance import SensitivityProbe, all_targets
from hsplitlora.lora import LoRALinear, Target, apply_lora, install_adapters, lora_layer, parse_ranks
from hsplitlora.split import Segment, split_model


class TorchRuntime(DeviceRuntime):
    """A `Segment` (embeddings + blocks[0:k]) whose LoRA factors are the only trainable tensors."""

    name = "torch"

    def __init__(self, segment: Segment, model=None):
        self.segment = segment.eval()
        self.model = model  # the whole model the segment is cut from, when known: it can score importance
        self._params: dict[str, torch.nn.Parameter] = {}
        for offset, block in enumerate(segment.blocks):
            for _, module in block.named_modules():
                if isinstance(module, LoRALinear):
                    for proj, factors in module.adapters.items():
                        target = Target(segment.start + offset, proj)
                        self._params[target.key("A")], self._params[target.key("B")] = factors.A, factors.B
        if not self._params:
            raise ValueError("the segment has no LoRA adapters: nothing to train")
        self._params = dict(sorted(self._params.items(), key=lambda kv: Target.from_key(kv[0])))

    @classmethod
    def from_model(cls, model, split: int, ranks: str | dict[Target, int], alpha: float = 16.0) -> TorchRuntime:
        """Fresh adapters of the given ranks on the model's device-side blocks (the model is changed).

        Every projection of those blocks is wrapped, adapted or not, so that any can take a merge.
        """
        n = len(segment_blocks(model))
        if isinstance(ranks, str):
            ranks = parse_ranks(ranks, n)
        install_adapters(model, {})  # an earlier plan's adapters go
        for target in all_targets(model, range(split)):
            lora_layer(model, target)
        apply_lora(model, {t: r for t, r in ranks.items() if t.layer < split}, alpha)
        return cls(split_model(model, split)[0], model)

    def step(self, input_ids, attention_mask, upstream_grad):
        params = list(self._params.values())
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            h = self.segment(torch.as_tensor(input_ids), torch.as_tensor(attention_mask))
            grads = torch.autograd.grad((h * torch.as_tensor(upstream_grad)).sum(), params)
        return h.detach(), dict(zip(self._params, grads))

    def forward(self, input_ids, attention_mask, *, keep=False):
        self._keep(None)
        with torch.set_grad_enabled(keep):
            if keep:
                for p in self._params.values():
                    p.requires_grad_(True)
            h = self.segment(torch.as_tensor(input_ids), torch.as_tensor(attention_mask))
        if keep:
            self._keep(h)  # autograd's graph holds the activations
        return h.detach()

    def backward(self, upstream_grad):
        h = self._take_kept()
        # A full backward (not autograd.grad over the LoRA tensors alone), so that an importance
        # probe's hooks see the gradient at every weight's output, adapted or not.
        params = self._params.values()
        for p in params:
            p.grad = None
        h.backward(torch.as_tensor(upstream_grad))
        grads = {k: p.grad for k, p in self._params.items()}
        for p in params:
            p.grad = None
        return grads

    def importance_probe(self):
        if self.model is None:
            return None
        return SensitivityProbe(self.model, all_targets(self.model, range(self.segment.start, self.segment.stop)))

    def lora_tensors(self):
        return {k: p.data for k, p in self._params.items()}

    def _merge(self, deltas):
        family = self.segment.family
        for key, delta in deltas.items():
            target = Target.parse(key)
            offset = target.layer - self.segment.start
            if not 0 <= offset < len(self.segment.blocks) or target.proj not in family.projections:
                raise KeyError(f"{key} is not a weight of this segment (blocks {self.segment.start}-{self.segment.stop - 1})")
            module = self.segment.blocks[offset].get_submodule(family.projections[target.proj].path)
            if not isinstance(module, LoRALinear) or target.proj not in module.slices:
                raise KeyError(f"{key} is not wrapped for updates in this segment (TorchRuntime.from_model wraps all)")
            module.add_to_weight(target.proj, delta)


def segment_blocks(model):
    from hsplitlora.family import family_of

    return family_of(model).blocks(model)
