"""HetLoRA (Cho et al., arXiv 2401.06432): zero-pad to the largest rank, average, truncate back.

The scale of each client is folded into B before padding so clients of different ranks add up on
one footing; client k gets the first r_k rank components of the average (its scale unfolded
again). Both the average (cross terms) and the truncation lose information.
"""

from __future__ import annotations

import torch

from hsplitlora.aggregation.base import AggregationResult, ClientUpdate, LowRank, normalised_weights


def aggregate(updates: list[ClientUpdate]) -> AggregationResult:
    p = normalised_weights(updates)
    r_max = max(u.rank for u in updates)
    d_out, d_in = updates[0].B.shape[0], updates[0].A.shape[1]
    a = torch.zeros(r_max, d_in, dtype=updates[0].A.dtype)
    b = torch.zeros(d_out, r_max, dtype=updates[0].B.dtype)
    for pk, u in zip(p, updates):
        a[: u.rank] += pk * u.A
        b[:, : u.rank] += pk * u.scale * u.B
    return AggregationResult(
        global_update=LowRank(B=b, A=a),
        client_factors={u.client: (a[: u.rank].clone(), b[:, : u.rank] / u.scale) for u in updates},
    )
