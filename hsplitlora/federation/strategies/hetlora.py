"""HetLoRA: federated LoRA (each device trains the whole model), q and v, a rank per client by its
budget's tier, aggregated by zero-padding to the largest rank and truncating back."""

from __future__ import annotations

from dataclasses import dataclass

from hsplitlora.federation.strategies.base import Participant, PlanContext, Strategy, fixed_plan
from hsplitlora.lora import Target
from hsplitlora.planner import Plan


@dataclass
class HetLoRA(Strategy):
    name = "hetlora"
    aggregator = "hetlora"
    merges = False
    whole_model = True

    def device_plan(self, ctx: PlanContext, who: Participant) -> Plan:
        return fixed_plan(ctx, ctx.dims.layers, tier_rank(ctx, who))

    def server_ranks(self, ctx: PlanContext, split: int) -> dict[Target, int]:
        return {}  # the whole model is on the device


def tier_rank(ctx: PlanContext, who: Participant) -> int:
    """The weakest client gets the smallest rank of Q, the strongest the largest, by budget order."""
    order = sorted(range(len(ctx.budgets)), key=lambda i: ctx.budgets[i].memory_bytes)
    q = ctx.planner.rank_set
    return q[min(order.index(who.index) * len(q) // len(ctx.budgets), len(q) - 1)]
