"""HSplitLoRA (arXiv 2505.02795): importance-guided adapters, a split and ranks per device budget,
noise-free aggregation merged into the weights every round, re-planning between rounds."""

from __future__ import annotations

from dataclasses import dataclass

from hsplitlora import planner
from hsplitlora.federation.strategies.base import Participant, PlanContext, Strategy
from hsplitlora.lora import Target
from hsplitlora.planner import Plan, plan_device, should_replan


@dataclass
class HSplitLoRA(Strategy):
    name = "hsplitlora"
    aggregator = "naa"
    merges = True
    scores_importance = True

    def device_plan(self, ctx: PlanContext, who: Participant) -> Plan:
        # A device of known speed takes at most its share of its pipeline's compute (device + server).
        share = who.speed / (who.speed + ctx.server_speed) if who.speed else None
        return plan_device(ctx.dims, ctx.importance, who.budget, ctx.shape, ctx.planner, share, who.device)

    def server_ranks(self, ctx: PlanContext, split: int) -> dict[Target, int]:
        return planner.server_ranks(ctx.dims, split, ctx.importance, ctx.planner)

    def replan(self, ctx: PlanContext, who: Participant) -> Plan:
        new = self.device_plan(ctx, who)
        return new if should_replan(who.plan, new, False, ctx.planner, ctx.importance) else who.plan
