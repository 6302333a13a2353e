"""SplitLoRA: one split and one rank for every client, the deepest split and largest rank the
weakest client fits, LoRA on q and v, FedAvg of A and B on frozen weights."""

from __future__ import annotations

from dataclasses import dataclass

from hsplitlora.cost import device_memory
from hsplitlora.federation.strategies.base import (Participant, PlanContext, Strategy, baseline_ranks,
                                                   baseline_server_ranks, fixed_plan)
from hsplitlora.lora import Target
from hsplitlora.planner import Plan, PlanError


@dataclass
class SplitLoRA(Strategy):
    name = "splitlora"
    aggregator = "fedavg"
    merges = False

    def device_plan(self, ctx: PlanContext, who: Participant) -> Plan:
        split, rank = self.common_split_and_rank(ctx)
        return fixed_plan(ctx, split, rank)

    def server_ranks(self, ctx: PlanContext, split: int) -> dict[Target, int]:
        return baseline_server_ranks(ctx, split, self.common_split_and_rank(ctx)[1])

    @staticmethod
    def common_split_and_rank(ctx: PlanContext) -> tuple[int, int]:
        """The deepest split and the largest rank that the weakest client fits."""
        weakest = min(b.memory_bytes for b in ctx.budgets)
        for split in range(ctx.dims.layers - 1, 0, -1):
            for rank in reversed(ctx.planner.rank_set):
                if device_memory(ctx.dims, split, baseline_ranks(range(split), rank), ctx.shape).total <= weakest:
                    return split, rank
        raise PlanError("the weakest client fits no split")
