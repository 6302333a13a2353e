"""How a device reaches the server: the protocol's calls over HTTP(S), with retries.

`HttpTransport` is the only place the SDK speaks HTTP. Everything it sends and reads is defined in
`hsplitlora.federation.protocol` (routes, headers, tensor specs, the round update); the device's
training logic (`edge_sdk.client`) calls these methods and never sees a URL or a header.

Server errors (5xx), lost connections and timeouts are retried with exponential backoff; a refusal
(4xx) raises `ServerError` with the server's message at once. A split step retried after a lost
reply is answered by the server from its cache and not trained twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Protocol

import aiohttp
import torch

from hsplitlora.federation import protocol
from hsplitlora.federation.protocol import MERGE, REDO_ROUND, REJOIN, Header, Route, Update
from hsplitlora.hashing import sha256_file
from hsplitlora.lora import Target
from hsplitlora.planner import Plan
from hsplitlora.wire import decode, encode

log = logging.getLogger(__name__)
MAX_REPLY_BYTES = 1 << 31
OCTETS = {"Content-Type": "application/octet-stream"}


class ServerError(RuntimeError):
    """The server refused a request (4xx); the message is the server's."""


class RedoRound(ServerError):
    """Train again: the round from step 0 (`redo` is REDO_ROUND: the server restarted and lost its
    earlier steps), or the open round `open_round` (REJOIN: the round closed without this client)."""

    def __init__(self, message: str, redo: str, open_round: int | None = None):
        super().__init__(message)
        self.redo, self.open_round = redo, open_round


class _Retry(Exception):
    def __init__(self, message: str, delay: float | None = None):
        super().__init__(message)
        self.delay = delay  # seconds the server asked us to wait, if it did


def retry_after(headers) -> float:
    """A 429's Retry-After in seconds (at most a minute; 1 s if it gives none we can read)."""
    try:
        return min(max(float(headers.get("Retry-After", "1")), 0.0), 60.0)
    except ValueError:
        return 1.0


class Transport(Protocol):
    """What the device logic needs of a way to the server. `HttpTransport` is the network's; any
    object with these methods serves (e.g. one calling a server in the same process)."""

    token: str | None

    async def register(self, profile: dict, examples: int, join_code: str | None = None) -> dict: ...
    async def merged_deltas(self) -> dict[Target, torch.Tensor]: ...
    async def artifact(self, fmt: str) -> dict: ...
    async def download(self, url: str, dest: Path, size: int, sha256: str) -> None: ...
    async def step(self, round_number: int, step: int, tensors: dict[str, torch.Tensor], wire: str
                   ) -> tuple[torch.Tensor, float, int, int]: ...
    async def upload(self, round_number: int, adapters: dict[str, torch.Tensor], scores: dict[Target, float]
                     ) -> int: ...
    async def wait_update(self, round_number: int) -> tuple[Update, Plan, int, int]: ...
    async def close(self) -> None: ...


class HttpTransport:
    """The protocol over aiohttp: one session, a bearer token once registered, retries."""

    def __init__(self, server: str, token: str | None = None, *, retries: int = 6, backoff_s: float = 0.5,
                 poll_s: float = 0.5, ssl=None):
        self.server = server.rstrip("/")
        self.token = token
        self.retries, self.backoff_s, self.poll_s, self.ssl = retries, backoff_s, poll_s, ssl
        self.session: aiohttp.ClientSession | None = None

    async def request(self, method: str, path: str, expect: tuple[int, ...] = (200,), **kw):
        """(status, headers, body) of one request, retried on 5xx and connection errors."""
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600))
        headers = dict(kw.pop("headers", {}))
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        for attempt in range(self.retries + 1):
            try:
                async with self.session.request(method, self.server + path, headers=headers, ssl=self.ssl,
                                                **kw) as resp:
                    body = await resp.read()
                    if resp.status in expect:
                        return resp.status, resp.headers, body
                    if resp.status >= 500:
                        raise _Retry(f"server error {resp.status}")
                    if resp.status == 429:  # over the server's rate: wait as long as it says
                        raise _Retry("rate limited", retry_after(resp.headers))
                    try:
                        reply = json.loads(body)
                        message = reply["error"]
                    except (ValueError, KeyError, TypeError):
                        reply, message = {}, body[:200].decode(errors="replace")
                    message = f"{method} {path}: {resp.status} {message}"
                    redo = reply.get("redo") if resp.status == 409 else None
                    if redo == REDO_ROUND:
                        raise RedoRound(message, redo)
                    if redo == REJOIN and isinstance(reply.get("open_round"), int):
                        raise RedoRound(message, redo, reply["open_round"])
                    raise ServerError(message)
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError, _Retry) as e:
                if attempt == self.retries:
                    raise ConnectionError(f"{method} {path} failed after {attempt + 1} tries: {e}") from e
                delay = e.delay if isinstance(e, _Retry) and e.delay is not None else self.backoff_s * 2**attempt
                log.warning("%s %s: %s; retrying in %.1f s", method, path, e, delay)
                await asyncio.sleep(delay)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    # ----- the protocol's calls ----------------------------------------------------------------
    async def register(self, profile: dict, examples: int, join_code: str | None = None) -> dict:
        """Join (`POST /v1/register`, with the operator's join code where the server wants one), or
        resume with the token (`GET /v1/me`): the reply's JSON."""
        if self.token:
            _, _, body = await self.request("GET", Route.ME)
        else:
            message = {"profile": profile, "examples": examples, **({"join_code": join_code} if join_code else {})}
            _, _, body = await self.request("POST", Route.REGISTER, json=message)
        reply = json.loads(body)
        self.token = reply.get("token", self.token)
        return reply

    async def merged_deltas(self) -> dict[Target, torch.Tensor]:
        """The run's merged deltas of this client's device blocks (`GET /v1/deltas`)."""
        _, _, body = await self.request("GET", Route.DELTAS)
        return Update.from_tensors(MERGE, decode(body, None, MAX_REPLY_BYTES)).deltas

    async def artifact(self, fmt: str) -> dict:
        """The description of the exported segment of this client's plan (`GET /v1/artifact`)."""
        _, _, body = await self.request("GET", f"{Route.ARTIFACT}?format={fmt}")
        return json.loads(body)

    async def step(self, round_number: int, step: int, tensors: dict[str, torch.Tensor], wire: str
                   ) -> tuple[torch.Tensor, float, int, int]:
        """One split step (`POST /v1/steps`): (dL/dh, loss, bytes up, bytes down)."""
        body = encode(tensors, wire)
        _, headers, reply = await self.request("POST", protocol.steps_path(round_number, step), data=body,
                                               headers=OCTETS)
        grad = decode(reply, protocol.grad_specs(tuple(tensors["h"].shape)), MAX_REPLY_BYTES)["grad"]
        return grad, float(headers[Header.LOSS]), len(body), len(reply)

    async def upload(self, round_number: int, adapters: dict[str, torch.Tensor], scores: dict[Target, float]) -> int:
        """The round's device adapters and importance scores (`PUT /v1/rounds/{R}/adapters`): bytes sent."""
        body = encode(adapters, "fp32")
        await self.request("PUT", protocol.adapters_path(round_number), expect=(202,), data=body,
                           headers={**OCTETS, Header.IMPORTANCE: protocol.encode_scores(scores)})
        return len(body)

    async def wait_update(self, round_number: int) -> tuple[Update, Plan, int, int]:
        """Poll `GET /v1/rounds/{R}/update` until the round closed: (update, next plan, open round,
        bytes received)."""
        while True:
            status, headers, reply = await self.request("GET", protocol.update_path(round_number), expect=(200, 202))
            if status == 200:
                break
            await asyncio.sleep(self.poll_s)
        update = Update.from_tensors(headers.get(Header.UPDATE, MERGE), decode(reply, None, MAX_REPLY_BYTES))
        return update, Plan.from_dict(json.loads(headers[Header.PLAN])), int(headers[Header.ROUND]), len(reply)

    async def download(self, url: str, dest: Path, size: int, sha256: str) -> None:
        """One artifact file, resumed from a partial download (HTTP Range), checked by size and sha256."""
        if dest.is_file() and dest.stat().st_size == size and sha256_file(dest) == sha256:
            return
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600))
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        for attempt in range(self.retries + 1):
            have = part.stat().st_size if part.is_file() else 0
            headers = {"Authorization": f"Bearer {self.token}"}
            if have:
                headers["Range"] = f"bytes={have}-"
            try:
                async with self.session.get(self.server + url, headers=headers, ssl=self.ssl) as resp:
                    if resp.status not in (200, 206):
                        raise ServerError(f"GET {url}: {resp.status} {(await resp.text())[:200]}")
                    with open(part, "ab" if resp.status == 206 else "wb") as out:
                        async for chunk in resp.content.iter_chunked(1 << 20):
                            out.write(chunk)
                break
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as e:
                if attempt == self.retries:
                    raise ConnectionError(f"GET {url} failed after {attempt + 1} tries: {e}") from e
                log.warning("download of %s interrupted (%s); resuming", dest.name, e)
                await asyncio.sleep(self.backoff_s * 2**attempt)
        if part.stat().st_size != size or sha256_file(part) != sha256:
            part.unlink()
            raise ConnectionError(f"{dest.name}: the download does not match its size and sha256; try again")
        part.replace(dest)
