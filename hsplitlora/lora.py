"""LoRA with a rank per weight: a tiny, traceable layer the export pipeline can lower as it is.

A `Target` names one adaptable weight, e.g. `Target(3, "q")` for block 3's query projection.
`LoRALinear` wraps a frozen linear (an `nn.Linear` or GPT-2's Conv1D) and adds, for each target it
holds, `scale * B @ A` to that target's slice of the output; GPT-2's fused `c_attn` therefore holds
up to three adapters (q, k, v) of independent ranks. Numbers match `peft` (tested).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from hsplitlora.family import family_of, num_layers


def initial_A(shape: tuple[int, int] | torch.Size, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh (r x d_in) A: Kaiming-uniform with a = sqrt(5) as peft, i.e. U(+-1/sqrt(d_in)), fp32."""
    a = torch.empty(tuple(shape))
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return a


def init_generator(*parts) -> torch.Generator:
    """A generator seeded from `parts` (numbers, names) by a stable hash.

    Seeding each adapter by (run seed, client, round, target) rather than drawing from the
    process's global RNG makes its initial value the same wherever it is made: on the device, on
    the server, in the one-process simulation, under any runtime.
    """
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


TENSOR_KINDS = ("A", "B", "delta")  # the tensors of a target that travel and rest: factors, dense change


@dataclass(frozen=True, order=True)
class Target:
    """One adaptable weight: a block index and a projection name (q, k, v, o, gate, up, down)."""

    layer: int
    proj: str

    def __str__(self) -> str:
        return f"{self.layer}.{self.proj}"

    @classmethod
    def parse(cls, text: str) -> Target:
        match = re.fullmatch(r"(\d+)\.([a-z]+)", text)
        if not match:
            raise ValueError(f"bad target {text!r}: expected '<layer>.<projection>', e.g. '3.q'")
        return cls(int(match[1]), match[2])

    def key(self, kind: str) -> str:
        """The name of one of its tensors, as files and the wire carry them: '3.q.A', '3.q.B'
        (LoRA factors), '3.q.delta' (a dense change of the weight)."""
        if kind not in TENSOR_KINDS:
            raise ValueError(f"tensor kind must be one of {', '.join(TENSOR_KINDS)}, got {kind!r}")
        return f"{self}.{kind}"

    @classmethod
    def from_key(cls, key: str) -> tuple[Target, str]:
        """'3.q.A' -> (Target(3, 'q'), 'A'); ValueError for a name that is no tensor of a target."""
        head, _, kind = key.rpartition(".")
        if kind not in TENSOR_KINDS:
            raise ValueError(f"bad tensor name {key!r}: expected '<layer>.<projection>.<{'|'.join(TENSOR_KINDS)}>'")
        return cls.parse(head), kind


class LoRAFactors(nn.Module):
    """A (r x d_in) and B (d_out x r) of one adapter; the update is (alpha / r) * B @ A."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank, self.alpha = rank, float(alpha)
        self.A = nn.Parameter(torch.empty(rank, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        self.reset(generator)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def reset(self, generator: torch.Generator | None = None) -> None:
        """Fresh adapter: A Kaiming-uniform as in peft, B zero, so the update starts at zero."""
        with torch.no_grad():
            self.A.copy_(initial_A(self.A.shape, generator))
        nn.init.zeros_(self.B)

    def delta(self) -> torch.Tensor:
        """The dense update (d_out x d_in) this adapter adds to its weight."""
        return self.scale * (self.B @ self.A)


class LoRALinear(nn.Module):
    """A frozen linear layer plus adapters on slices of its output (`adapters[proj]`)."""

    def __init__(self, base: nn.Module, slices: dict[str, tuple[int, int]]):
        super().__init__()
        self.base = base
        self.slices = slices  # proj -> (lo, hi) of the output it adapts
        self.adapters = nn.ModuleDict()
        self.transposed = isinstance(base, Conv1D)  # Conv1D stores its weight as (d_in, d_out)

    @property
    def d_in(self) -> int:
        return self.base.weight.shape[0 if self.transposed else 1]

    @property
    def d_out(self) -> int:
        return self.base.weight.shape[1 if self.transposed else 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for proj, factors in self.adapters.items():
            update = (x @ factors.A.t()) @ factors.B.t() * factors.scale
            lo, hi = self.slices[proj]
            if (lo, hi) != (0, self.d_out):
                update = F.pad(update, (lo, self.d_out - hi))
            y = y + update
        return y

    def weight_slice(self, proj: str) -> torch.Tensor:
        """A (d_out_slice x d_in) view of the frozen weight that `proj` adapts."""
        lo, hi = self.slices[proj]
        w = self.base.weight
        return w[:, lo:hi].t() if self.transposed else w[lo:hi]

    @torch.no_grad()
    def add_to_weight(self, proj: str, delta: torch.Tensor) -> None:
        """Merge a dense update (d_out_slice x d_in) into the frozen weight of `proj`."""
        view = self.weight_slice(proj)
        if delta.shape != view.shape:
            raise ValueError(f"update for {proj} has shape {tuple(delta.shape)}, expected {tuple(view.shape)}")
        view.add_(delta.to(view.dtype))


def _site(model: PreTrainedModel, target: Target) -> tuple[nn.Module, str, str, tuple[int, int]]:
    """(parent module, attribute name, module path, output slice) of a target's linear layer."""
    family = family_of(model)
    n = num_layers(model)
    if target.proj not in family.projections:
        raise ValueError(
            f"projection {target.proj!r} does not exist in {family.name} models; "
            f"choose from {', '.join(family.projections)}"
        )
    if not 0 <= target.layer < n:
        raise ValueError(f"layer {target.layer} is outside the model's {n} blocks")
    projection = family.projections[target.proj]
    block = family.blocks(model)[target.layer]
    parent_path, _, attr = projection.path.rpartition(".")
    parent = block.get_submodule(parent_path) if parent_path else block
    module = getattr(parent, attr)
    base = module.base if isinstance(module, LoRALinear) else module
    d_out = base.weight.shape[1] if isinstance(base, Conv1D) else base.weight.shape[0]
    if projection.part is None:
        out_slice = (0, d_out)
    else:
        third = d_out // 3
        out_slice = (projection.part * third, (projection.part + 1) * third)
    blocks_path = _blocks_path(model)
    return parent, attr, f"{blocks_path}.{target.layer}.{projection.path}", out_slice


def _blocks_path(model: PreTrainedModel) -> str:
    blocks = family_of(model).blocks(model)
    return next(name for name, mod in model.named_modules() if mod is blocks)


def lora_layer(model: PreTrainedModel, target: Target) -> LoRALinear:
    """The LoRALinear that holds (or will hold) a target's adapter, wrapping the linear on first use."""
    parent, attr, _, out_slice = _site(model, target)
    module = getattr(parent, attr)
    if not isinstance(module, LoRALinear):
        module = LoRALinear(module, {})
        setattr(parent, attr, module)
    module.slices[target.proj] = out_slice
    return module


def module_path(model: PreTrainedModel, target: Target) -> str:
    """The dotted path of the (unwrapped) linear layer a target lives in, as transformers names it."""
    return _site(model, target)[2]


def apply_lora(
    model: PreTrainedModel, ranks: dict[Target, int], alpha: float | dict[Target, float] = 16.0,
    seed: tuple | None = None,
) -> dict[Target, LoRAFactors]:
    """Give each target a fresh adapter of its rank (replacing any it had); freeze everything else.

    `alpha` is one number for all targets or one per target; the scale is alpha / rank as in peft.
    Targets with rank 0 lose their adapter. With `seed` (e.g. (run seed, client, round)), each
    target's A is drawn from `init_generator(*seed, target)`; without, from the global RNG.
    """
    model.requires_grad_(False)
    out: dict[Target, LoRAFactors] = {}
    for target, rank in sorted(ranks.items()):
        layer = lora_layer(model, target)
        if rank == 0:
            if target.proj in layer.adapters:
                del layer.adapters[target.proj]
            continue
        a = alpha[target] if isinstance(alpha, dict) else alpha
        lo, hi = layer.slices[target.proj]
        w = layer.base.weight
        generator = init_generator(*seed, target) if seed is not None else None
        factors = LoRAFactors(layer.d_in, hi - lo, rank, a, generator).to(dtype=w.dtype, device=w.device)
        layer.adapters[target.proj] = factors
        out[target] = factors
    return out


def install_adapters(model: PreTrainedModel, factors: dict[Target, LoRAFactors]) -> None:
    """Make exactly these adapter modules the model's adapters (no copy: training them trains these).

    Swapping adapter sets is how one frozen model serves many clients, each with its own adapters.
    """
    for target in list(adapters(model)):
        del lora_layer(model, target).adapters[target.proj]
    for target, f in factors.items():
        lora_layer(model, target).adapters[target.proj] = f


def adapters_from_factors(model: PreTrainedModel, factors: dict[Target, tuple[torch.Tensor, torch.Tensor]],
                          alpha: float | None = None) -> dict[Target, LoRAFactors]:
    """Adapter modules holding given (A, B) pairs; alpha defaults to the rank (scale 1, for B with
    the scale already folded in)."""
    out = {}
    for target, (a, b) in factors.items():
        f = LoRAFactors(a.shape[1], b.shape[0], a.shape[0], alpha if alpha is not None else a.shape[0])
        with torch.no_grad():
            f.A.copy_(a)
            f.B.copy_(b)
        out[target] = f.to(lora_layer(model, target).base.weight.dtype)
    return out


def adapters(model: PreTrainedModel) -> dict[Target, LoRAFactors]:
    """Every adapter currently in the model, by target."""
    found: dict[Target, LoRAFactors] = {}
    family = family_of(model)
    for layer_index, block in enumerate(family.blocks(model)):
        for module in block.modules():
            if isinstance(module, LoRALinear):
                for proj, factors in module.adapters.items():
                    found[Target(layer_index, proj)] = factors
    return dict(sorted(found.items()))


def merge_adapters(model: PreTrainedModel, reinit: bool = True) -> None:
    """Fold every adapter's update into its frozen weight; then restart adapters from zero."""
    for target, factors in adapters(model).items():
        lora_layer(model, target).add_to_weight(target.proj, factors.delta().detach())
        if reinit:
            factors.reset()


def remove_lora(model: PreTrainedModel) -> None:
    """Unwrap every LoRALinear back to its plain linear layer (adapters are dropped, not merged)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, module.base)


def lora_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Adapter tensors keyed '<layer>.<proj>.A' / '.B' (the project's own wire and checkpoint names)."""
    state: dict[str, torch.Tensor] = {}
    for target, factors in adapters(model).items():
        state[target.key("A")] = factors.A.detach()
        state[target.key("B")] = factors.B.detach()
    return state


def parse_ranks(spec: str, n_layers: int) -> dict[Target, int]:
    """Parse a rank spec such as 'q=8,v=8' (every layer), '0-3:q=16' or '5.down=4'.

    Comma-separated items; each is `[layers:]proj=rank` where layers is 'a-b' or 'a' (default all),
    or `layer.proj=rank` for one weight. Later items override earlier ones.
    """
    ranks: dict[Target, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        match = re.fullmatch(r"(?:(\d+)(?:-(\d+))?[:.])?([a-z]+)=(\d+)", item)
        if not match:
            raise ValueError(f"bad rank spec item {item!r}: expected e.g. 'q=8', '0-3:v=4' or '5.down=2'")
        lo, hi, proj, rank = match.groups()
        first = int(lo) if lo is not None else 0
        last = int(hi) if hi is not None else (first if lo is not None else n_layers - 1)
        if not 0 <= first <= last < n_layers:
            raise ValueError(f"layers {first}-{last} in {item!r} are outside 0-{n_layers - 1}")
        for layer in range(first, last + 1):
            ranks[Target(layer, proj)] = int(rank)
    return ranks
