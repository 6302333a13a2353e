"""Device side of hsplitlora: the client an app embeds (`Client`, `AsyncClient`) and its runtimes."""

from edge_sdk.client import AsyncClient, Client, RoundReport, ServerError
from edge_sdk.fit import DeviceBudget, PlanDoesNotFit

__all__ = ["AsyncClient", "Client", "DeviceBudget", "PlanDoesNotFit", "RoundReport", "ServerError"]
