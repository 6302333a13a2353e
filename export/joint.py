"""The front end both back ends share: a device segment as one joint forward-backward graph.

The device needs, per step, h = segment(tokens) and the vector-Jacobian product of h with the
server's dL/dh with respect to its LoRA factors. With loss = sum(h * dL/dh) that product is
exactly d loss / d LoRA, so one joint graph (loss, h, grads) is the whole device step:

    (input_ids, attention_mask, upstream_grad) + LoRA factors  ->  h, d loss / d LoRA

Everything but the LoRA factors is frozen; they are the only parameters the graph differentiates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.export.experimental import _export_forward_backward
from torch.export.graph_signature import InputKind, OutputKind
from torch.nn.attention import SDPBackend, sdpa_kernel

from export.passes import prepare_joint
from hsplitlora.lora import LoRALinear, Target
from hsplitlora.split import Segment

USER_INPUTS = ("input_ids", "attention_mask", "upstream_grad")


class DeviceStep(nn.Module):
    """The segment as a training step: loss (output 0, what is differentiated) and h."""

    def __init__(self, segment: Segment):
        super().__init__()
        self.segment = segment

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, upstream_grad: torch.Tensor):
        h = self.segment(input_ids, attention_mask)
        return (h * upstream_grad).sum(), h.detach()


def lora_parameters(segment: Segment) -> dict[str, tuple[str, nn.Parameter]]:
    """The segment's LoRA factors: project key ('0.q.A') -> (FQN inside the segment, parameter).

    Ordered as `hsplitlora.lora.lora_state_dict` orders them (by target, then A before B).
    """
    found: dict[tuple, tuple[str, str, nn.Parameter]] = {}
    for offset, block in enumerate(segment.blocks):
        layer = segment.start + offset
        for name, module in block.named_modules():
            if not isinstance(module, LoRALinear):
                continue
            for proj, factors in module.adapters.items():
                for which in ("A", "B"):
                    fqn = f"blocks.{offset}.{name}.adapters.{proj}.{which}"
                    found[(layer, proj, which)] = (Target(layer, proj).key(which), fqn, getattr(factors, which))
    return {key: (fqn, p) for key, fqn, p in (found[k] for k in sorted(found))}


def hidden_size(segment: Segment) -> int:
    config = segment.config
    return getattr(config, "hidden_size", None) or config.n_embd


def eager_step(segment: Segment, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               upstream_grad: torch.Tensor, lora: dict[str, torch.Tensor]
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reference: h and d sum(h * upstream_grad) / d LoRA by PyTorch eager autograd.

    The LoRA values are given, not read from the segment, and the segment is left unchanged.
    """
    params = lora_parameters(segment)
    missing = set(params) - set(lora)
    if missing:
        raise KeyError(f"LoRA tensors missing: {sorted(missing)}")
    leaves = {key: lora[key].detach().clone().requires_grad_(True) for key in params}
    with torch.enable_grad():
        h = torch.func.functional_call(segment, {params[k][0]: leaves[k] for k in params},
                                       (input_ids, attention_mask))
        grads = torch.autograd.grad((h * upstream_grad).sum(), list(leaves.values()))
    return h.detach(), dict(zip(leaves, grads))


@dataclass
class JointProgram:
    """A joint forward-backward ExportedProgram plus what the back ends need to name its tensors."""

    program: ExportedProgram
    lora_fqns: dict[str, str]  # '0.q.A' -> parameter FQN in `program` ('segment.blocks.0...')
    lora_shapes: dict[str, tuple[int, ...]]
    batch: int
    seq: int
    hidden: int
    vocab: int

    @property
    def gradient_outputs(self) -> dict[str, int]:
        """'0.q.A' -> index of its gradient among the program's outputs."""
        by_fqn = {fqn: key for key, fqn in self.lora_fqns.items()}
        out = {}
        for i, spec in enumerate(self.program.graph_signature.output_specs):
            if spec.kind == OutputKind.GRADIENT_TO_PARAMETER:
                out[by_fqn[spec.target]] = i
        return out

    def input_roles(self) -> list[tuple]:
        """Per placeholder of the graph, in order: ("user", i) for the i-th of USER_INPUTS,
        ("lora", key), or ("frozen", buffer name, tensor) for a frozen parameter, buffer or constant."""
        ep = self.program
        key_of = {fqn: key for key, fqn in self.lora_fqns.items()}
        roles, users = [], 0
        for spec in ep.graph_signature.input_specs:
            if spec.kind == InputKind.USER_INPUT:
                roles.append(("user", users))
                users += 1
            elif spec.target in key_of:
                roles.append(("lora", key_of[spec.target]))
            else:
                value = ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants[spec.target]
                roles.append(("frozen", spec.target.replace(".", "__"), value.detach()))
        if users != len(USER_INPUTS):
            raise RuntimeError(f"the joint graph takes {users} user inputs, expected {len(USER_INPUTS)}")
        return roles

    @property
    def h_output(self) -> int:
        kinds = (OutputKind.LOSS_OUTPUT, OutputKind.USER_OUTPUT)
        users = [i for i, s in enumerate(self.program.graph_signature.output_specs) if s.kind in kinds]
        return users[1]  # (loss, h)


class GraphCall(nn.Module):
    """A graph module called with positional arguments, its frozen tensors held as buffers (so the
    back ends see them as weights: ONNX initializers, ExecuTorch constants).

    `sources` gives, per placeholder of the graph, ("arg", position) or ("buffer", name);
    `outputs`, when given, picks and orders the graph's outputs.
    """

    def __init__(self, graph: torch.fx.GraphModule, sources: list[tuple[str, object]],
                 frozen: dict[str, torch.Tensor], outputs: list[int] | None = None):
        super().__init__()
        self.graph = graph
        self._sources = sources
        self._outputs = outputs
        for name, value in frozen.items():
            self.register_buffer(name, value)

    def forward(self, *args):
        outs = self.graph(*(args[i] if kind == "arg" else getattr(self, i) for kind, i in self._sources))
        return outs if self._outputs is None else tuple(outs[i] for i in self._outputs)


def example_inputs(batch: int, seq: int, hidden: int, vocab: int, seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, vocab, (batch, seq), generator=gen),
            torch.ones(batch, seq, dtype=torch.long),
            torch.randn(batch, seq, hidden, generator=gen))


def export_joint(segment: Segment, batch: int, seq: int) -> JointProgram:
    """Trace the segment's training step at a fixed (batch, seq) into a joint graph.

    Only LoRA factors may require grad; the segment must be in eval mode (no dropout: the graph
    would bake one random mask in).
    """
    params = lora_parameters(segment)
    if not params:
        raise ValueError("the device segment has no LoRA adapters: nothing to train (check --ranks and --split)")
    lora_ids = {id(p) for _, p in params.values()}
    stray = [n for n, p in segment.named_parameters() if p.requires_grad and id(p) not in lora_ids]
    if stray:
        raise ValueError(f"only LoRA factors may require grad in an exported segment; also trainable: {stray[:5]}")
    for _, p in params.values():
        p.requires_grad_(True)
    if segment.training:
        raise ValueError("put the segment in eval mode before export (dropout would be traced as a fixed mask)")
    hidden = hidden_size(segment)
    vocab = segment.config.vocab_size
    step = DeviceStep(segment)
    args = example_inputs(batch, seq, hidden, vocab)
    with sdpa_kernel([SDPBackend.MATH]):
        ep = torch.export.export(step, args, strict=False)
        joint = _export_forward_backward(ep)
    prepare_joint(joint)
    return JointProgram(
        program=joint,
        lora_fqns={key: f"segment.{fqn}" for key, (fqn, _) in params.items()},
        lora_shapes={key: tuple(p.shape) for key, (_, p) in params.items()},
        batch=batch, seq=seq, hidden=hidden, vocab=vocab,
    )
