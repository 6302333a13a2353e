"""Adaptive rank and split configuration (design §3.3; method notes §3.2, "our formulation").

For one device with a memory budget (and optionally a FLOPs or step-time budget), choose the split
point s (blocks[0:s] run on the device) and a LoRA rank r in {0} U Q for every candidate weight
of those blocks, maximising  sum_W I(W) * phi(r_W),  phi(r) = log2(1 + r),  within the budget.

1. Split: the deepest s whose rank-0 cost (frozen weights, saved activations, cut buffers)
   fits in the budget less a reserve, optionally capped so the device's share of the global
   importance mass does not exceed its share of the compute. Deep cuts unload the shared server,
   which serves every client's remaining blocks in turn; the traffic is the same for any cut.
2. Ranks: greedy, raising to the next level of Q the weight with the best importance gain per
   added byte, while the whole plan stays within the budget. phi is concave, so each weight's
   gain per byte falls as its rank rises and the greedy spreads ranks by importance.
3. Stability: `should_replan` says when a new plan is worth the disruption of switching.

Everything is exact integer byte and FLOP arithmetic from hsplitlora.cost, so a returned plan
never exceeds its budget. A device that measured itself (`hsplitlora profile`) is planned by what
its measurements predict instead (`hsplitlora.predict`): its memory budget then bounds the peak
resident memory of its whole process and a step-time budget the seconds of one split step, and
every candidate plan is checked by its full prediction, so that too never exceeds the budget. More memory never gives a shallower split; it can, rarely, give a
slightly lower objective, when the deeper split it allows leaves less room for adapters than
the shallower one had (seen only at a few tokens per step, where adapters rival a block's cost).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from hsplitlora.configs import option
from hsplitlora.cost import (
    MemoryBreakdown,
    ModelDims,
    StepShape,
    adapter_flops,
    adapter_memory,
    device_flops,
    device_memory,
)
from hsplitlora.lora import Target
from hsplitlora.predict import DeviceRates, StepPrediction, predict_step


class PlanError(ValueError):
    """No plan fits the budget (the message says the minimum needed)."""


@dataclass(frozen=True)
class Budget:
    """What one device can spend on a training step: bytes of memory, optionally FLOPs and seconds.

    `memory_bytes` bounds the analytic training memory (`cost.device_memory`), or, for a device
    planned from its measurements, its process's predicted peak RSS. `step_seconds` needs those
    measurements: seconds cannot be predicted from FLOPs without a measured rate.
    """

    memory_bytes: float
    flops_per_step: float | None = None
    step_seconds: float | None = None


@dataclass(frozen=True)
class PlannerConfig:
    """Knobs of the planner; the defaults follow the method notes §3.2."""

    # Q: SplitLoRA swept 1..8, 16 leaves headroom.
    rank_set: tuple[int, ...] = option((2, 4, 8, 16), help="the ranks Q the planner chooses from")
    reserve: float = option(0.25, help="share of a budget the split leaves for adapters, slack and transients")
    candidates: tuple[str, ...] | None = option(
        None, flag="--projections", metavar="PROJ,...",
        help="the only projections adapted, on devices and server, e.g. q,v (default: every projection of the "
             "model's family; the importance scores choose)")
    replan_threshold: float = option(0.05, help="re-plan a client if the objective improves by more than this share")
    jaccard_threshold: float = option(0.8, help="... or if the adapted set changes (Jaccard index below this)")
    bytes_per_param: int = option(4, cli=False, help="bytes of a frozen weight and an activation (fp32)")

    def __post_init__(self):
        if not self.rank_set or list(self.rank_set) != sorted(set(self.rank_set)) or self.rank_set[0] < 1:
            raise ValueError(f"rank_set must be increasing positive ranks, got {self.rank_set}")
        if not 0 <= self.reserve < 1:
            raise ValueError(f"reserve must be in [0, 1), got {self.reserve}")

    def projections(self, dims: ModelDims) -> tuple[str, ...]:
        if self.candidates is None:
            return dims.projections
        for proj in self.candidates:
            dims.weight_shape(proj)  # raises for a projection this family does not have
        return tuple(self.candidates)


@dataclass(frozen=True)
class Plan:
    """A device's configuration: split point, ranks of its adapters (all > 0) and predictions."""

    split: int
    ranks: dict[Target, int]
    predicted_memory: MemoryBreakdown
    predicted_flops: float
    objective: float
    predicted_step: StepPrediction | None = None  # for a device planned from its measurements

    def to_dict(self) -> dict:
        """JSON-safe form; targets are written as '<layer>.<proj>', e.g. '3.q'."""
        out = {
            "split": self.split,
            "ranks": {str(t): r for t, r in sorted(self.ranks.items())},
            "predicted_memory": self.predicted_memory.to_dict(),
            "predicted_flops": self.predicted_flops,
            "objective": self.objective,
        }
        if self.predicted_step is not None:
            out["predicted_step"] = self.predicted_step.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        step = data.get("predicted_step")
        return cls(
            split=int(data["split"]),
            ranks={Target.parse(t): int(r) for t, r in data["ranks"].items()},
            predicted_memory=MemoryBreakdown.from_dict(data["predicted_memory"]),
            predicted_flops=float(data["predicted_flops"]),
            objective=float(data["objective"]),
            predicted_step=StepPrediction.from_dict(step) if step else None,
        )


def phi(rank: int) -> float:
    """Value of an adapter of this rank: log2(1 + r), 0 for no adapter; concave (diminishing returns)."""
    return math.log2(1 + rank)


def objective(ranks: dict[Target, int], importance: dict[Target, float]) -> float:
    """sum over adapted weights of importance * phi(rank) (negative scores count as 0)."""
    return math.fsum(max(importance.get(t, 0.0), 0.0) * phi(r) for t, r in sorted(ranks.items()))


def uniform_importance(dims: ModelDims, cfg: PlannerConfig | None = None) -> dict[Target, float]:
    """Equal scores (summing to 1) for every candidate, for the first round before any profiling.

    Simply equal, not divided by the adapter's cost: the greedy already ranks by gain per byte,
    so cheap weights (k, v under GQA) go first; dividing here as well would count cost twice.
    """
    projs = (cfg or PlannerConfig()).projections(dims)
    targets = [Target(layer, p) for layer in range(dims.layers) for p in projs]
    return {t: 1.0 / len(targets) for t in targets}


def minimum_budget(dims: ModelDims, shape: StepShape, cfg: PlannerConfig | None = None) -> Budget:
    """The smallest budget `plan_device` accepts: one block on the device, reserve included."""
    cfg = cfg or PlannerConfig()
    memory = device_memory(dims, 1, {}, shape, cfg.bytes_per_param).total
    return Budget(memory / (1 - cfg.reserve), device_flops(dims, 1, {}, shape) / (1 - cfg.reserve))


def _within(budget: Budget, memory: float, flops: float, share: float = 1.0) -> bool:
    """Whether memory and FLOPs fit `share` of the budget (FLOPs only when it has a FLOPs limit)."""
    if memory > share * budget.memory_bytes:
        return False
    return budget.flops_per_step is None or flops <= share * budget.flops_per_step


@dataclass(frozen=True)
class MeasuredDevice:
    """A device planned from its measurements: its rates and the wire's bytes per activation."""

    rates: DeviceRates
    wire_bytes: int = 2

    def predict(self, dims: ModelDims, split: int, ranks: dict[Target, int], shape: StepShape,
                cfg: PlannerConfig) -> StepPrediction:
        return predict_step(self.rates, dims, split, ranks, shape, self.wire_bytes, cfg.bytes_per_param)

    @staticmethod
    def within(budget: Budget, pred: StepPrediction, flops: float, share: float = 1.0) -> bool:
        """Whether a prediction's step seconds, FLOPs and peak RSS fit `share` of the budget; of the
        memory, `share` is of what the budget leaves beyond the runtime's baseline, which the
        process holds whatever the plan (a reserve is for what training adds)."""
        if budget.step_seconds is not None and pred.seconds > share * budget.step_seconds:
            return False
        if budget.flops_per_step is not None and flops > share * budget.flops_per_step:
            return False
        base = pred.baseline_bytes
        return pred.peak_rss_bytes - base <= share * (budget.memory_bytes - base)

    def fits(self, budget: Budget, dims: ModelDims, split: int, ranks: dict[Target, int], shape: StepShape,
             cfg: PlannerConfig, share: float = 1.0) -> bool:
        """`within` for the prediction of this split and these ranks."""
        pred = self.predict(dims, split, ranks, shape, cfg)
        return self.within(budget, pred, device_flops(dims, split, ranks, shape), share)


def _block_mass(dims: ModelDims, importance: dict[Target, float], projs: tuple[str, ...]) -> list[float]:
    mass = [0.0] * dims.layers
    for t, score in importance.items():
        if t.proj in projs and 0 <= t.layer < dims.layers:
            mass[t.layer] += max(score, 0.0)
    # No scores yet: every block weighs the same, so the cap becomes a share of the blocks.
    return mass if sum(mass) > 0 else [1.0] * dims.layers


def choose_split(dims: ModelDims, importance: dict[Target, float], budget: Budget, shape: StepShape,
                 cfg: PlannerConfig, compute_share: float | None = None, device: MeasuredDevice | None = None) -> int:
    """Step 1: the deepest split whose rank-0 cost fits (1 - reserve) of the budget, then the cap."""
    if dims.layers < 2:
        raise PlanError(f"a model of {dims.layers} block(s) cannot be split")

    def fits(s: int) -> bool:
        if device is not None:
            return device.fits(budget, dims, s, {}, shape, cfg, 1 - cfg.reserve)
        memory = device_memory(dims, s, {}, shape, cfg.bytes_per_param).total
        return _within(budget, memory, device_flops(dims, s, {}, shape), 1 - cfg.reserve)

    if not fits(1):
        if device is not None:
            pred = device.predict(dims, 1, {}, shape, cfg)
            seconds = "" if budget.step_seconds is None else (
                f" and {pred.seconds:.3g} s per step (budget {budget.step_seconds:.3g} s)")
            raise PlanError(
                f"budget too small for even one block on this device at batch {shape.batch} x seq {shape.seq}: "
                f"its measurements predict a peak of {pred.peak_rss_bytes / 2**20:.0f} MiB resident "
                f"(budget {budget.memory_bytes / 2**20:.0f} MiB, of which {pred.baseline_bytes / 2**20:.0f} MiB "
                f"is the runtime's baseline){seconds}; {cfg.reserve:.0%} of the rest is kept in reserve")
        need = minimum_budget(dims, shape, cfg)
        flops = "" if budget.flops_per_step is None else (
            f" and {need.flops_per_step:.3g} FLOPs per step (budget {budget.flops_per_step:.3g})")
        raise PlanError(
            f"budget too small for even one block on the device at batch {shape.batch} x seq {shape.seq}: "
            f"needs at least {need.memory_bytes / 2**20:.1f} MiB "
            f"(budget {budget.memory_bytes / 2**20:.1f} MiB)"
            f"{flops}, with {cfg.reserve:.0%} kept in reserve")
    split = max(s for s in range(1, dims.layers) if fits(s))  # costs grow with s: the fitting s are 1..max
    if compute_share is not None:
        mass = _block_mass(dims, importance, cfg.projections(dims))
        total, cap, running = sum(mass), 1, 0.0
        for s in range(1, dims.layers):
            running += mass[s - 1]
            if running / total <= compute_share + 1e-12:
                cap = s
        split = min(split, cap)
    return split


def _greedy_ranks(dims: ModelDims, importance: dict[Target, float], budget: Budget, shape: StepShape,
                  cfg: PlannerConfig, split: int, device: MeasuredDevice | None = None) -> dict[Target, int]:
    """Step 2: raise ranks one level at a time, best importance gain per added byte first.

    The analytic budget is tracked by exact increments; a measured device's prediction is not
    additive (inputs shared by adapters, the allocator's factor), so each step is re-predicted.
    """
    levels = (0, *cfg.rank_set)
    bpp = cfg.bytes_per_param
    memory = device_memory(dims, split, {}, shape, bpp).total
    flops = int(device_flops(dims, split, {}, shape))
    level = {Target(layer, p): 0 for layer in range(split) for p in cfg.projections(dims)}

    def step(t: Target) -> tuple[float, Target, int, int]:
        old, new = levels[level[t]], levels[level[t] + 1]
        d_mem = adapter_memory(dims, t, new, shape, bpp) - adapter_memory(dims, t, old, shape, bpp)
        d_flops = adapter_flops(dims, t, new, shape) - adapter_flops(dims, t, old, shape)
        gain = max(importance.get(t, 0.0), 0.0) * (phi(new) - phi(old))
        return -gain / d_mem, t, d_mem, d_flops  # heap order: best ratio, then Target order

    heap = [step(t) for t in level if importance.get(t, 0.0) > 0]  # no gain, no adapter
    heapq.heapify(heap)
    while heap:
        _, t, d_mem, d_flops = heapq.heappop(heap)
        if device is not None:
            ranks = {u: levels[i] for u, i in level.items() if i > 0} | {t: levels[level[t] + 1]}
            fits = device.fits(budget, dims, split, ranks, shape, cfg)
        else:
            fits = _within(budget, memory + d_mem, flops + d_flops)
        if not fits:
            # Later steps of this weight cost more and the totals only grow: drop it, try the rest.
            continue
        memory, flops, level[t] = memory + d_mem, flops + d_flops, level[t] + 1
        if level[t] + 1 < len(levels):
            heapq.heappush(heap, step(t))
    return {t: levels[i] for t, i in level.items() if i > 0}


def plan_device(dims: ModelDims, importance: dict[Target, float], budget: Budget, shape: StepShape,
                cfg: PlannerConfig | None = None, compute_share: float | None = None,
                device: MeasuredDevice | None = None) -> Plan:
    """The device's split and ranks for this budget (module docstring); raises PlanError if none fits.

    `importance` scores targets of any block (missing = 0); `compute_share` is the device's share
    of the total compute of the clients and the server, if the split should be capped by it;
    `device`, a device's measurements, to plan by predicted peak RSS and step seconds.
    """
    cfg = cfg or PlannerConfig()
    if budget.step_seconds is not None and device is None:
        raise PlanError("a step-time budget needs the device's measurements (`hsplitlora profile`) to predict "
                        "seconds; without them only memory and FLOPs can be budgeted")
    split = choose_split(dims, importance, budget, shape, cfg, compute_share, device)
    ranks = _greedy_ranks(dims, importance, budget, shape, cfg, split, device)
    memory = device_memory(dims, split, ranks, shape, cfg.bytes_per_param)
    flops = device_flops(dims, split, ranks, shape)
    # The greedy adds the same integer terms device_memory sums (or re-predicts every step), so
    # this holds exactly; keep the check anyway: a plan over budget would crash a device mid-round.
    predicted = device.predict(dims, split, ranks, shape, cfg) if device else None
    fits = device.within(budget, predicted, flops) if device else _within(budget, memory.total, flops)
    if not fits:
        raise AssertionError(f"planner bug: plan exceeds its budget ({memory}, {flops} FLOPs, {budget})")
    return Plan(split, ranks, memory, flops, objective(ranks, importance), predicted)


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b|; two empty sets are identical (1.0)."""
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def should_replan(old: Plan, new: Plan, budget_changed: bool, cfg: PlannerConfig | None = None,
                  importance: dict[Target, float] | None = None) -> bool:
    """Step 3: switch to `new` (at an aggregation boundary) only when it is worth it.

    True when the budget changed, the objective improves by more than `replan_threshold`, or the
    adapted sets differ (Jaccard < `jaccard_threshold`). Pass the current `importance` to rescore
    `old` with it: objectives computed under different scores are not comparable.
    """
    cfg = cfg or PlannerConfig()
    if budget_changed:
        return True
    old_objective = objective(old.ranks, importance) if importance is not None else old.objective
    if new.objective > old_objective * (1 + cfg.replan_threshold):
        return True
    return jaccard(set(old.ranks), set(new.ranks)) < cfg.jaccard_threshold


def server_ranks(dims: ModelDims, split: int, importance: dict[Target, float],
                 cfg: PlannerConfig | None = None, top_fraction: float = 0.5) -> dict[Target, int]:
    """The server-side adapters of one client: max(Q) on the selected weights of blocks >= split.

    The server is not memory-bound, but every adapter costs it compute per client and step, so it
    adapts only the important half (top_fraction) of its candidates: those scoring at least the
    score of the ceil(top_fraction * n)-th best. Ties are all kept, so equal scores (or no
    scores at all) select every candidate rather than an arbitrary subset.
    """
    cfg = cfg or PlannerConfig()
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    targets = [Target(layer, p) for layer in range(split, dims.layers) for p in cfg.projections(dims)]
    if not targets:
        return {}
    if importance:
        scores = sorted((importance.get(t, 0.0) for t in targets), reverse=True)
        threshold = scores[math.ceil(top_fraction * len(scores)) - 1]
        targets = [t for t in targets if importance.get(t, 0.0) >= threshold]
    return {t: cfg.rank_set[-1] for t in targets}
