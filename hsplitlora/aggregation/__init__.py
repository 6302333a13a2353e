"""Aggregators of heterogeneous LoRA adapters, one per module, one interface (`base.py`).

`AGGREGATORS[name](updates) -> AggregationResult` for name in naa (HSplitLoRA), fedavg (SplitLoRA),
hetlora and flexlora.
"""

from hsplitlora.aggregation import fedavg, flexlora, hetlora, naa
from hsplitlora.aggregation.base import (
    AggregationResult,
    ClientUpdate,
    LowRank,
    aggregation_error,
    exact_update,
    normalised_weights,
)

AGGREGATORS = {
    "naa": naa.aggregate,
    "fedavg": fedavg.aggregate,
    "hetlora": hetlora.aggregate,
    "flexlora": flexlora.aggregate,
}

__all__ = [
    "AGGREGATORS", "AggregationResult", "ClientUpdate", "LowRank", "aggregation_error", "exact_update",
    "normalised_weights",
]
