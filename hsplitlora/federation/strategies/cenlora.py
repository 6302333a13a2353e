"""CenLoRA: all data in one place, one LoRA on q and v (the upper bound of the federated methods)."""

from __future__ import annotations

from dataclasses import dataclass

from hsplitlora.federation.strategies.base import Participant, PlanContext, Strategy, fixed_plan
from hsplitlora.lora import Target
from hsplitlora.planner import Plan


@dataclass
class CenLoRA(Strategy):
    name = "cenlora"
    aggregator = "fedavg"  # one client: nothing is ever aggregated
    merges = False
    whole_model = True
    federated = False
    rank: int = 8

    def device_plan(self, ctx: PlanContext, who: Participant) -> Plan:
        return fixed_plan(ctx, ctx.dims.layers, self.rank)

    def server_ranks(self, ctx: PlanContext, split: int) -> dict[Target, int]:
        return {}
