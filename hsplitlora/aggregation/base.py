"""The one small interface every aggregator shares: client adapters of one weight in, a result out.

An aggregator is a pure function `aggregate(updates) -> AggregationResult` over the adapters that
the participating clients trained on one weight W. Scales are folded into B everywhere
(`B' = (alpha / r) * B`) so clients of different ranks are never mis-scaled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ClientUpdate:
    """One client's adapter on one weight after its local steps."""

    client: str
    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    scale: float  # alpha / r of the client's adapter
    weight: float  # aggregation weight before normalisation (the client's data size)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        """The dense update this adapter stands for: scale * B @ A."""
        return self.scale * (self.B @ self.A)

    def norm(self) -> float:
        """||scale * B @ A||_F without forming the product: sqrt(trace(B^T B A A^T)) (r x r work);
        NaN or infinite when a factor is."""
        a, b = self.A.double(), self.B.double()
        return abs(self.scale) * float(torch.trace((b.T @ b) @ (a @ a.T)).clamp(min=0).sqrt())


@dataclass(frozen=True)
class LowRank:
    """A weight update kept as factors: B @ A, scale already folded into B."""

    B: torch.Tensor  # (d_out, R)
    A: torch.Tensor  # (R, d_in)

    def dense(self) -> torch.Tensor:
        return self.B @ self.A

    @property
    def numel(self) -> int:
        return self.B.numel() + self.A.numel()

    def cheaper_than_dense(self) -> bool:
        """Send the factors while they are smaller than the dense matrix (design §3.4)."""
        return self.numel < self.B.shape[0] * self.A.shape[1]


@dataclass(frozen=True)
class AggregationResult:
    """What an aggregation round produces for one weight.

    `global_update` is the update of the global model relative to the frozen W it started the
    round with. Whether it is merged into W is the strategy's choice
    (`hsplitlora.federation.strategies`): merged, the clients restart from fresh adapters and
    `client_factors` is None (naa); kept apart, W stays frozen, the global model is
    W + global_update, and each client continues from its own `client_factors[client] = (A, B)`
    (unscaled: the client keeps its alpha / r).
    """

    global_update: LowRank
    client_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None


def normalised_weights(updates: list[ClientUpdate]) -> list[float]:
    """Aggregation weights p_k over the clients that adapted this weight (they sum to one).

    Normalising over the participants only keeps a weight that few clients adapted from having its
    update shrunk by the clients that did not adapt it.
    """
    if not updates:
        raise ValueError("nothing to aggregate: no client adapted this weight")
    total = sum(u.weight for u in updates)
    if total <= 0 or any(u.weight < 0 for u in updates):
        raise ValueError(f"aggregation weights must be non-negative with a positive sum, got "
                         f"{[u.weight for u in updates]}")
    shapes = {(u.B.shape[0], u.A.shape[1]) for u in updates}
    if len(shapes) != 1:
        raise ValueError(f"clients' adapters disagree on the weight's shape: {sorted(shapes)}")
    return [u.weight / total for u in updates]


def exact_update(updates: list[ClientUpdate]) -> LowRank:
    """sum_k p_k * scale_k * B_k @ A_k as stacked factors: the noise-free target of every method."""
    p = normalised_weights(updates)
    return LowRank(
        B=torch.cat([pk * u.scale * u.B for pk, u in zip(p, updates)], dim=1),
        A=torch.cat([u.A for u in updates], dim=0),
    )


def aggregation_error(result: AggregationResult, updates: list[ClientUpdate]) -> dict[str, float]:
    """Relative Frobenius error against the exact weighted sum of B_k A_k.

    "global": of the global model's update; "clients": the mean over clients of the error of the
    point each client continues from (for merging methods, the merged W with a zero adapter).
    """
    target = exact_update(updates).dense()
    norm = float(target.norm()) or 1.0
    global_err = float((result.global_update.dense() - target).norm()) / norm
    if result.client_factors is None:
        return {"global": global_err, "clients": global_err}
    by_client = {u.client: u for u in updates}
    errs = [
        float((by_client[c].scale * (b @ a) - target).norm()) / norm
        for c, (a, b) in result.client_factors.items()
    ]
    return {"global": global_err, "clients": sum(errs) / len(errs)}
