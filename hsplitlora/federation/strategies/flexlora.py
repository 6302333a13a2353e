"""FlexLoRA: federated LoRA as HetLoRA plans it, aggregated as the dense weighted sum of the
clients' products, cut back to each client's rank by SVD."""

from __future__ import annotations

from dataclasses import dataclass

from hsplitlora.federation.strategies.hetlora import HetLoRA


@dataclass
class FlexLoRA(HetLoRA):
    name = "flexlora"
    aggregator = "flexlora"
