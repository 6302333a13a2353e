"""The device side of a federation: what an app embeds to fine-tune with a server.

    from edge_sdk import Client
    client = Client("http://127.0.0.1:8080", examples, memory_budget=2e9)
    client.run(rounds=3)                      # blocking facade; AsyncClient underneath
    client.save("my-device-state")

Tokenisation and raw text stay on the device. What leaves it: the activations at the cut, the
attention mask and the labels (token ids of the completion, as in SplitLoRA: the server computes
the loss), the device-side adapters at the end of each round, importance scores and losses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import aiohttp
import torch

from hsplitlora.data import Example, endless_batches
from hsplitlora.importance import SensitivityProbe, all_targets, resource_normalised
from hsplitlora.lora import Target, apply_lora, install_adapters, lora_layer
from hsplitlora.models import load_model
from hsplitlora.planner import Plan
from hsplitlora.split import Segment
from hsplitlora.train import make_optimizer
from hsplitlora.wire import TensorSpec, decode, encode

log = logging.getLogger(__name__)
MAX_REPLY_BYTES = 1 << 31


class ServerError(RuntimeError):
    """The server refused a request (4xx); the message is the server's."""


class _Retry(Exception):
    pass


@dataclass
class RoundReport:
    """What one round did on this device."""

    round: int
    losses: list[float]
    seconds: float
    bytes_up: int
    bytes_down: int
    split: int


class AsyncClient:
    """Register with a server, train rounds of split steps, apply the merged updates."""

    def __init__(self, server: str, examples: Sequence[Example], memory_budget: float, *,
                 relative_speed: float | None = None, token: str | None = None, retries: int = 6,
                 backoff_s: float = 0.5, poll_s: float = 0.5, ssl=None):
        if not examples:
            raise ValueError("a client needs at least one training example")
        self.server = server.rstrip("/")
        self.examples = list(examples)
        self.profile = {"memory_bytes": float(memory_budget)}
        if relative_speed:
            self.profile["relative_speed"] = float(relative_speed)
        self.token = token
        self.retries, self.backoff_s, self.poll_s, self.ssl = retries, backoff_s, poll_s, ssl
        self.session: aiohttp.ClientSession | None = None
        self.client_id: str | None = None
        self.number = 0  # registration order, from the server
        self.round = 0
        self.plan: Plan | None = None
        self.settings: dict = {}
        self.model = self.tokenizer = None
        self.base: dict[Target, torch.Tensor] = {}

    # ----- HTTP with retries -------------------------------------------------------------------
    async def _request(self, method: str, path: str, expect: tuple[int, ...] = (200,), **kw):
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
                    try:
                        message = json.loads(body)["error"]
                    except (ValueError, KeyError, TypeError):
                        message = body[:200].decode(errors="replace")
                    raise ServerError(f"{method} {path}: {resp.status} {message}")
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError, _Retry) as e:
                if attempt == self.retries:
                    raise ConnectionError(f"{method} {path} failed after {attempt + 1} tries: {e}") from e
                delay = self.backoff_s * 2**attempt
                log.warning("%s %s: %s; retrying in %.1f s", method, path, e, delay)
                await asyncio.sleep(delay)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    # ----- set-up ------------------------------------------------------------------------------
    async def register(self) -> Plan:
        """Join the federation (or resume, with a token) and load the base model for the plan."""
        if self.token:
            _, _, body = await self._request("GET", "/v1/me")
        else:
            _, _, body = await self._request("POST", "/v1/register",
                                             json={"profile": self.profile, "examples": len(self.examples)})
        reply = json.loads(body)
        self.client_id, self.number, self.round = reply["client_id"], reply["number"], reply["round"]
        self.token = reply.get("token", self.token)
        self.plan, self.settings = Plan.from_dict(reply["plan"]), reply["settings"]
        self.model, self.tokenizer = load_model(self.settings["model"])
        self.base = {t: lora_layer(self.model, t).weight_slice(t.proj).detach().clone()
                     for t in all_targets(self.model, range(self.plan.split))}
        _, _, body = await self._request("GET", "/v1/deltas")
        self._apply_update(decode(body, None, MAX_REPLY_BYTES))
        s = self.settings
        # Seeded as the simulation seeds client `number`, so the same data trains in the same order.
        self.stream = endless_batches(self.tokenizer, self.examples, s["batch_size"], s["max_len"],
                                      seed=s["seed"] + self.number)
        log.info("client %s: round %d, split %d, %d device adapters", self.client_id, self.round,
                 self.plan.split, len(self.plan.ranks))
        return self.plan

    # ----- one round ---------------------------------------------------------------------------
    async def train_round(self, progress: Callable[[int, float], None] | None = None) -> RoundReport:
        """Local split steps, adapter upload, then wait for and apply the merged update."""
        if self.plan is None:
            await self.register()
        s, start, up, down = self.settings, time.perf_counter(), 0, 0
        install_adapters(self.model, {})
        factors = apply_lora(self.model, self.plan.ranks, s["alpha"], seed=(s["seed"], self.number, self.round))
        optimizer = make_optimizer((p for f in factors.values() for p in f.parameters()), s["lr"])
        device = Segment(self.model, 0, self.plan.split, embed=True, head=False)
        self.model.train()
        losses, scores = [], {}
        for step in range(s["local_steps"]):
            batch = next(self.stream)
            probe_targets = all_targets(self.model, range(self.plan.split)) if step == 0 else []
            with SensitivityProbe(self.model, probe_targets) as probe:
                h = device(batch.input_ids, batch.attention_mask)
                body = encode({"h": h, "attention_mask": batch.attention_mask, "labels": batch.labels}, s["wire"])
                _, headers, reply = await self._request(
                    "POST", f"/v1/steps?round={self.round}&step={step}", data=body,
                    headers={"Content-Type": "application/octet-stream"})
                grad = decode(reply, {"grad": TensorSpec(tuple(h.shape))}, MAX_REPLY_BYTES)["grad"]
                h.backward(grad)
            if probe_targets:
                scores = resource_normalised(self.model, probe.scores)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            up, down = up + len(body), down + len(reply)
            losses.append(float(headers["X-Loss"]))
            if progress:
                progress(step, losses[-1])
        self.model.eval()
        adapters = {}
        for t, f in factors.items():
            adapters[f"{t}.A"], adapters[f"{t}.B"] = f.A.detach(), f.B.detach()
        body = encode(adapters, "fp32")
        await self._request("PUT", f"/v1/rounds/{self.round}/adapters", expect=(202,), data=body,
                            headers={"Content-Type": "application/octet-stream",
                                     "X-Importance": json.dumps({str(t): v for t, v in scores.items()})})
        up += len(body)
        while True:
            status, headers, reply = await self._request("GET", f"/v1/rounds/{self.round}/update", expect=(200, 202))
            if status == 200:
                break
            await asyncio.sleep(self.poll_s)
        down += len(reply)
        install_adapters(self.model, {})
        new_plan = Plan.from_dict(json.loads(headers["X-Plan"]))
        # Blocks a deeper split brings onto the device arrive as deltas against the base weights,
        # which these blocks still hold unless the device had them before (then base is kept).
        for t in all_targets(self.model, range(self.plan.split, new_plan.split)):
            self.base.setdefault(t, lora_layer(self.model, t).weight_slice(t.proj).detach().clone())
        self._apply_update(decode(reply, None, MAX_REPLY_BYTES))
        report = RoundReport(self.round, losses, time.perf_counter() - start, up, down, self.plan.split)
        self.plan, self.round = new_plan, int(headers["X-Round"])
        return report

    def _apply_update(self, tensors: dict[str, torch.Tensor]) -> None:
        """Merge stacked factors ('<t>.A', '<t>.B') and set blocks new to this device ('<t>.delta')."""
        for key, value in tensors.items():
            name, _, kind = key.rpartition(".")
            if kind == "A":
                t = Target.parse(name)
                lora_layer(self.model, t).add_to_weight(t.proj, tensors[f"{name}.B"] @ value)
            elif kind == "delta":
                t = Target.parse(name)
                with torch.no_grad():
                    lora_layer(self.model, t).weight_slice(t.proj).copy_(self.base[t] + value)
            elif kind != "B":
                raise ValueError(f"unexpected tensor {key!r} in an update")

    async def run(self, rounds: int, progress: Callable[[int, int, float], None] | None = None) -> list[RoundReport]:
        """Train `rounds` rounds; `progress(round, step, loss)` after every step."""
        reports = []
        try:
            for _ in range(rounds):
                r = self.round
                reports.append(await self.train_round(lambda step, loss: progress and progress(r, step, loss)))
        finally:
            await self.close()
        return reports

    def save(self, out_dir: str | Path) -> Path:
        """The device's merged weights (deltas against the base checkpoint) and its plan."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        deltas = {str(t): (lora_layer(self.model, t).weight_slice(t.proj).detach() - b).contiguous()
                  for t, b in self.base.items()}
        save_file(deltas, str(out / "device_deltas.safetensors"))
        (out / "plan.json").write_text(json.dumps({"client_id": self.client_id, "round": self.round,
                                                   "plan": self.plan.to_dict()}, indent=1))
        return out


class Client:
    """Blocking facade over AsyncClient, for apps and scripts without an event loop."""

    def __init__(self, *args, **kwargs):
        self.inner = AsyncClient(*args, **kwargs)

    def register(self) -> Plan:
        return asyncio.run(self._closing(self.inner.register()))

    def run(self, rounds: int, progress=None) -> list[RoundReport]:
        return asyncio.run(self.inner.run(rounds, progress))

    def save(self, out_dir: str | Path) -> Path:
        return self.inner.save(out_dir)

    async def _closing(self, coro):
        try:
            return await coro
        finally:
            await self.inner.close()
