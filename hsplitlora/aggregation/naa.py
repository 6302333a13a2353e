"""Noise-free adapter aggregation (HSplitLoRA's NAA, our formulation; the same stacking as FLoRA).

A = [A_1; ...; A_K] and B = [p_1 s_1 B_1, ..., p_K s_K B_K], so B @ A = sum_k p_k s_k B_k A_k exactly,
whatever the ranks. The update is merged into W on every holder and each client restarts from a
fresh adapter at its (possibly new) rank, so nothing has to be truncated back to a client's rank.
"""

from __future__ import annotations

from hsplitlora.aggregation.base import AggregationResult, ClientUpdate, exact_update


def aggregate(updates: list[ClientUpdate]) -> AggregationResult:
    return AggregationResult(global_update=exact_update(updates))
