"""FlexLoRA (Bai et al., NeurIPS 2024): the weighted sum of full updates, SVD back to each rank.

The global update is the exact sum (kept as stacked factors); client k continues from its best
rank-r_k approximation, U_r S_r as B and V_r^T as A. The SVD is taken of the small core of the
stacked factors (QR of each side), never of a dense d_out x d_in matrix.
"""

from __future__ import annotations

import torch

from hsplitlora.aggregation.base import AggregationResult, ClientUpdate, LowRank, exact_update


def truncated_svd(update: LowRank) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of update.B @ update.A (rank <= R), through QR of the factors: O((d_in + d_out) R^2)."""
    qb, rb = torch.linalg.qr(update.B)
    qa, ra = torch.linalg.qr(update.A.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return qb @ u, s, vh @ qa.T


def aggregate(updates: list[ClientUpdate]) -> AggregationResult:
    total = exact_update(updates)
    u, s, vh = truncated_svd(total)
    factors = {}
    for upd in updates:
        r = min(upd.rank, s.shape[0])
        a = torch.zeros_like(upd.A)
        b = torch.zeros_like(upd.B)
        a[:r] = vh[:r]
        b[:, :r] = u[:, :r] * s[:r] / upd.scale
        factors[upd.client] = (a, b)
    return AggregationResult(global_update=total, client_factors=factors)
