"""What every method decides, in one place per method (as Flower's strategies own their round).

A strategy is told what the federation knows (`PlanContext`: the model's dimensions, the step
shape, the planner's knobs, the importance scores, every client's budget) and about one client
(`Participant`), and answers: that client's plan (its split and device ranks), the ranks of its
server-side adapters, the plan it keeps after a round, and how a round's adapters aggregate.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from hsplitlora.aggregation import AGGREGATORS, AggregationResult, ClientUpdate
from hsplitlora.cost import ModelDims, StepShape, device_flops, device_memory
from hsplitlora.lora import Target
from hsplitlora.planner import Budget, MeasuredDevice, Plan, PlannerConfig, objective

BASELINE_PROJECTIONS = ("q", "v")  # where SplitLoRA's and the federated LoRA baselines' code put LoRA
SERVER_SPEED = 2.0  # the server's compute per client, relative to the weakest device (simulation and server)


@dataclass(frozen=True)
class PlanContext:
    """What the federation knows when it plans a client."""

    dims: ModelDims
    shape: StepShape
    planner: PlannerConfig
    importance: dict[Target, float]
    budgets: list[Budget]  # every client's budget, by registration order
    server_speed: float = SERVER_SPEED  # the server's compute per client, relative to the weakest device


@dataclass(frozen=True)
class Participant:
    """One client as a strategy sees it."""

    index: int  # its registration order: its position in `PlanContext.budgets`
    budget: Budget
    speed: float | None = None  # its compute relative to the weakest device, when known
    device: MeasuredDevice | None = None  # its measurements, when it profiled itself
    plan: Plan | None = None  # the plan it trains with now


class Strategy(ABC):
    """One federated fine-tuning method."""

    name: ClassVar[str]
    aggregator: ClassVar[str]  # a key of `hsplitlora.aggregation.AGGREGATORS`
    # True: each round's update is merged into W and clients restart from fresh adapters, so a
    # client may be re-planned. False: W stays frozen, the global model is W + a global adapter,
    # each client continues from its own aggregated factors, so its plan (its ranks) stays.
    merges: ClassVar[bool]
    whole_model: ClassVar[bool] = False  # every block trains on the device (no server segment)
    federated: ClassVar[bool] = True  # False: all data in one place, nothing aggregates
    scores_importance: ClassVar[bool] = False  # the round's first step scores every weight's importance

    @abstractmethod
    def device_plan(self, ctx: PlanContext, who: Participant) -> Plan:
        """The client's plan now: its split and the ranks of its device-side adapters."""

    @abstractmethod
    def server_ranks(self, ctx: PlanContext, split: int) -> dict[Target, int]:
        """The ranks of a client's server-side adapters (blocks >= split)."""

    def next_plan(self, ctx: PlanContext, who: Participant) -> Plan:
        """The plan after a round: the current one unless the strategy re-plans (only merging
        strategies can: a new rank has no aggregated factors to start from)."""
        if who.plan is None or not self.merges:
            return who.plan or self.device_plan(ctx, who)
        return self.replan(ctx, who)

    def replan(self, ctx: PlanContext, who: Participant) -> Plan:
        return self.device_plan(ctx, who)

    def aggregate(self, updates: list[ClientUpdate]) -> AggregationResult:
        """One weight's aggregation over the clients that adapted it."""
        return AGGREGATORS[self.aggregator](updates)


def baseline_ranks(layers: range, rank: int) -> dict[Target, int]:
    """One rank on the baselines' projections of these blocks."""
    return {Target(i, p): rank for i in layers for p in BASELINE_PROJECTIONS}


def fixed_plan(ctx: PlanContext, split: int, rank: int) -> Plan:
    """A plan of one rank on the baselines' projections of every device block, with its predictions."""
    ranks = baseline_ranks(range(split), rank)
    return Plan(split, ranks, device_memory(ctx.dims, split, ranks, ctx.shape, ctx.planner.bytes_per_param),
                device_flops(ctx.dims, split, ranks, ctx.shape), objective(ranks, ctx.importance))


def baseline_server_ranks(ctx: PlanContext, split: int, rank: int) -> dict[Target, int]:
    return baseline_ranks(range(split, ctx.dims.layers), rank)
