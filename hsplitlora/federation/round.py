"""Closing a round: the one function the simulation and the server both call.

From what the participants trained (each client's device-side and server-side adapters, its data
size and its importance scores) it aggregates every adapted weight with the strategy's
aggregator, merges the result into W or keeps it as the global adapter, and folds the scores into
the smoothed importance. Re-planning and the next round's adapters follow from the strategy
(`Strategy.next_plan`, `Strategy.server_ranks`); the caller adds only what is its own: the
server its lock, persistence and replies, the simulation its traffic count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from hsplitlora.aggregation import ClientUpdate, LowRank
from hsplitlora.federation.strategies import Strategy
from hsplitlora.importance import ImportanceTracker, fill_unscored, mean_scores
from hsplitlora.lora import Target, lora_layer


@dataclass
class Contribution:
    """What one client brings to the end of a round."""

    client: str
    examples: float  # its aggregation weight before normalisation
    adapters: dict[Target, tuple[torch.Tensor, torch.Tensor, float]]  # (A, B, alpha / r), both sides of its cut
    scores: dict[Target, float] = field(default_factory=dict)  # resource-normalised importance, if it scored


@dataclass
class RoundResult:
    """What a round changed."""

    updates: dict[Target, list[ClientUpdate]]  # every adapted weight's inputs to the aggregator
    merged: dict[Target, LowRank] = field(default_factory=dict)  # merging strategies: what W gained
    global_adapter: dict[Target, LowRank] = field(default_factory=dict)  # the others: W + this is the model
    starts: dict[str, dict[Target, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)  # the others
    importance: dict[Target, float] | None = None  # the new importance, if any client scored
    dropped: dict[str, str] = field(default_factory=dict)  # clients left out of the round, and why


def contribution_problem(c: Contribution, limits: dict[Target, float] | None) -> str | None:
    """Why a contribution must not reach a shared weight, or None: a non-finite adapter or score,
    or an update (||scale * B @ A||_F) over its weight's limit."""
    for t, (a, b, scale) in sorted(c.adapters.items()):
        norm = ClientUpdate(c.client, a, b, scale, 1.0).norm()
        if not math.isfinite(norm):
            return f"its adapter of {t} is not finite"
        if limits is not None and norm > limits[t]:
            return f"its update of {t} has norm {norm:.3g}, over the limit of {limits[t]:.3g}"
    if not all(math.isfinite(v) for v in c.scores.values()):
        return "its importance scores are not finite"
    return None


def close_round(strategy: Strategy, model: PreTrainedModel, contributions: list[Contribution],
                tracker: ImportanceTracker, targets: list[Target], progress: float,
                limits: dict[Target, float] | None = None) -> RoundResult:
    """Aggregate the round into `model` (merging strategies) or a global adapter, and update the
    importance (`progress` in [0, 1]: how far the run is, which sets the smoothing).

    A contribution that is not finite, or whose update of a weight is over `limits` (Frobenius
    norm per target), is dropped whole (`RoundResult.dropped`): one client never fails the round
    nor reaches the others' weights. A round with no contribution left changes nothing."""
    result = RoundResult({})
    kept = []
    for c in contributions:
        problem = contribution_problem(c, limits)
        if problem:
            result.dropped[c.client] = problem
        else:
            kept.append(c)
    for c in kept:
        for t, (a, b, scale) in c.adapters.items():
            result.updates.setdefault(t, []).append(ClientUpdate(c.client, a, b, scale, float(c.examples)))
    result.starts = {c.client: {} for c in kept}
    updates = result.updates
    for t, ups in sorted(updates.items()):
        aggregated = strategy.aggregate(ups)
        if strategy.merges:
            result.merged[t] = aggregated.global_update
            lora_layer(model, t).add_to_weight(t.proj, aggregated.global_update.dense())
        else:
            result.global_adapter[t] = aggregated.global_update
            for client, ab in aggregated.client_factors.items():
                result.starts[client][t] = ab
    mean = mean_scores([c.scores for c in kept if c.scores])
    if mean:
        result.importance = fill_unscored(tracker.update(mean, progress), targets)
    return result


def run_progress(completed_round: int, rounds: int) -> float:
    """How far a run of `rounds` rounds is after round `completed_round` (counted from 1)."""
    return (completed_round - 1) / max(rounds - 1, 1)
