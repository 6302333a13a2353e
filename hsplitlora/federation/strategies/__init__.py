"""One module per method; `STRATEGIES[name]()` makes one. A new method is a new module here and
one line below (docs/architecture.md)."""

from hsplitlora.federation.strategies.base import SERVER_SPEED, Participant, PlanContext, Strategy
from hsplitlora.federation.strategies.cenlora import CenLoRA
from hsplitlora.federation.strategies.flexlora import FlexLoRA
from hsplitlora.federation.strategies.hetlora import HetLoRA
from hsplitlora.federation.strategies.hsplitlora import HSplitLoRA
from hsplitlora.federation.strategies.splitlora import SplitLoRA

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (HSplitLoRA, SplitLoRA, HetLoRA, FlexLoRA, CenLoRA)}
METHODS = tuple(STRATEGIES)


def strategy(name: str, **options) -> Strategy:
    """The strategy of a method by name (ValueError, listing them, for another name)."""
    if name not in STRATEGIES:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {name!r}")
    return STRATEGIES[name](**options)


__all__ = ["METHODS", "SERVER_SPEED", "STRATEGIES", "Participant", "PlanContext", "Strategy", "strategy"]
