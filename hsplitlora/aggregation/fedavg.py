"""FedAvg of A and B separately (SplitLoRA, FedIT): the baseline whose cross terms NAA removes.

(sum_k p_k B_k)(sum_j p_j A_j) = sum_k p_k^2 B_k A_k + sum_{k != j} p_k p_j B_k A_j, which is not
sum_k p_k B_k A_k unless all clients hold the same factors. Needs equal ranks.
"""

from __future__ import annotations

from hsplitlora.aggregation.base import AggregationResult, ClientUpdate, LowRank, normalised_weights


def aggregate(updates: list[ClientUpdate]) -> AggregationResult:
    p = normalised_weights(updates)
    ranks = {u.rank for u in updates}
    scales = {u.scale for u in updates}
    if len(ranks) != 1 or len(scales) != 1:
        raise ValueError(f"fedavg needs one rank and one alpha for all clients, got ranks {sorted(ranks)}")
    a = sum(pk * u.A for pk, u in zip(p, updates))
    b = sum(pk * u.B for pk, u in zip(p, updates))
    scale = updates[0].scale
    return AggregationResult(
        global_update=LowRank(B=scale * b, A=a),
        client_factors={u.client: (a.clone(), b.clone()) for u in updates},
    )
