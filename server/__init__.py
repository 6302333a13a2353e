"""The aiohttp backend of hsplitlora: routes, rounds, server-side trainer, storage (being built)."""
