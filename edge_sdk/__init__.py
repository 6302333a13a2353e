"""Device side of hsplitlora: the client an app embeds (`Client`, `AsyncClient`) and its runtimes."""

from edge_sdk.client import AsyncClient, Client, RoundReport, ServerError

__all__ = ["AsyncClient", "Client", "RoundReport", "ServerError"]
