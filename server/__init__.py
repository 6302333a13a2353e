"""The aiohttp backend of hsplitlora: routes (`app`), model work (`trainer`), state (`store`)."""
