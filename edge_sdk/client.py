"""The device side of a federation: what an app embeds to fine-tune with a server.

    from edge_sdk import Client
    client = Client("http://127.0.0.1:8080", examples, memory_budget=2e9)
    client.run(rounds=3)                      # blocking facade; AsyncClient underneath
    client.save("my-device-state")

A device that measured itself (`hsplitlora profile`, `edge_sdk.profile.profile_device`) passes
`profile=` instead of, or besides, a memory budget (default: the share of free memory the profile
offers), and may give `step_time_budget=` seconds; the server then plans by what those
measurements predict. Every plan the client is given is checked against its budget first
(`edge_sdk.fit`): one that does not fit raises `PlanDoesNotFit` before any training.

The device segment runs in eager PyTorch (`runtime="torch"`, the default) or as an exported
artifact the server builds for the device's plan (`runtime="onnxruntime"` or `"executorch"`,
docs/export.md): downloaded once per plan (resumable, checked by sha256), brought up to date by
merging the run's deltas into it, then trained with the SDK's AdamW. Artifact runtimes cannot
score their weights' importance (no weight gradients), so only the server's blocks are scored.

Tokenisation and raw text stay on the device. What leaves it: the activations at the cut, the
attention mask and the labels (token ids of the completion, as in SplitLoRA: the server computes
the loss), the device-side adapters at the end of each round, importance scores and losses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import aiohttp
import torch

from edge_sdk.fit import DeviceBudget, PlanDoesNotFit, plan_problem
from edge_sdk.runtimes import FORMAT_OF, AdamW, DeviceRuntime, choose_runtime, dense_updates, fresh_lora, open_runtime
from edge_sdk.runtimes.base import MANIFEST
from hsplitlora.cost import ModelDims, StepShape
from hsplitlora.data import Example, endless_batches, pad_batch
from hsplitlora.hashing import sha256_file
from hsplitlora.importance import SensitivityProbe, all_targets, resource_normalised
from hsplitlora.lora import Target, apply_lora, install_adapters, lora_layer
from hsplitlora.models import cache_dir, load_dims, load_model, load_tokenizer
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

    def __init__(self, server: str, examples: Sequence[Example], memory_budget: float | None = None, *,
                 profile: dict | None = None, step_time_budget: float | None = None,
                 relative_speed: float | None = None, token: str | None = None, retries: int = 6,
                 backoff_s: float = 0.5, poll_s: float = 0.5, ssl=None, runtime: str = "torch",
                 artifact_dir: str | Path | None = None, threads: int | None = None):
        if not examples:
            raise ValueError("a client needs at least one training example")
        if memory_budget is None and profile is None:
            raise ValueError("give a memory budget, a device profile (`hsplitlora profile`), or both")
        memory = memory_budget if memory_budget is not None else float(profile["memory_bytes"])
        self.budget = DeviceBudget(memory, step_time_budget, profile)
        # "auto" picks the first installed of onnxruntime, torch, executorch.
        self.runtime_name = choose_runtime(None if runtime == "auto" else runtime)
        self.artifact_dir = Path(artifact_dir) if artifact_dir else cache_dir() / "artifacts"
        self.threads = threads
        self.rt: DeviceRuntime | None = None  # an artifact runtime, when not eager
        self.optimizer: AdamW | None = None
        self.applied: dict[str, torch.Tensor] = {}  # artifact runtimes: merged deltas of the device blocks
        self.start: dict[str, torch.Tensor] = {}  # non-merging methods: where the next round's adapters start
        self.server = server.rstrip("/")
        self.examples = list(examples)
        self.profile = self.budget.registration()
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
        self.dims: ModelDims | None = None
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
        """Join the federation (or resume, with a token) and load the device segment for the plan."""
        if self.token:
            _, _, body = await self._request("GET", "/v1/me")
        else:
            _, _, body = await self._request("POST", "/v1/register",
                                             json={"profile": self.profile, "examples": len(self.examples)})
        reply = json.loads(body)
        self.client_id, self.number, self.round = reply["client_id"], reply["number"], reply["round"]
        self.token = reply.get("token", self.token)
        self.plan, self.settings = Plan.from_dict(reply["plan"]), reply["settings"]
        self._check_plan(self.plan)
        s = self.settings
        if self.runtime_name == "torch":
            self.model, self.tokenizer = load_model(s["model"])
            self.base = {t: lora_layer(self.model, t).weight_slice(t.proj).detach().clone()
                         for t in all_targets(self.model, range(self.plan.split))}
            _, _, body = await self._request("GET", "/v1/deltas")
            self._apply_update(decode(body, None, MAX_REPLY_BYTES))
        else:
            self.tokenizer = load_tokenizer(s["model"])
            await self._load_artifact()
        # Seeded as the simulation seeds client `number`, so the same data trains in the same order.
        self.stream = endless_batches(self.tokenizer, self.examples, s["batch_size"], s["max_len"],
                                      seed=s["seed"] + self.number)
        log.info("client %s: round %d, split %d, %d device adapters, runtime %s", self.client_id, self.round,
                 self.plan.split, len(self.plan.ranks), self.runtime_name)
        return self.plan

    def _check_plan(self, plan: Plan) -> None:
        """Refuse (PlanDoesNotFit) a plan over this device's budget, before anything is loaded for it."""
        s = self.settings
        if self.dims is None:
            self.dims = load_dims(s["model"])
        available = None
        if self.budget.profile is not None:
            from edge_sdk.profile import available_memory, process_memory

            try:  # what this process could reach now: what it holds and what the system has free
                available = available_memory() + process_memory()["VmRSS"]
            except (OSError, RuntimeError, KeyError):
                available = None  # no /proc here: the budget check still holds
        problem = plan_problem(plan, self.budget, self.dims, StepShape(s["batch_size"], s["max_len"]), s["wire"],
                               available)
        if problem:
            raise PlanDoesNotFit(f"client {self.client_id} refuses its plan: {problem}")

    async def _load_artifact(self) -> None:
        """Fetch the artifact of the current plan, merge the run's deltas so far into it, open it."""
        fmt = FORMAT_OF[self.runtime_name]
        _, _, body = await self._request("GET", f"/v1/artifact?format={fmt}")
        desc = json.loads(body)
        directory = self.artifact_dir / self.client_id / desc["id"]
        for old in directory.parent.glob("*"):  # merges patch files in place: a copy serves one plan only
            if old != directory:
                shutil.rmtree(old, ignore_errors=True)
        for f in desc["files"]:
            await self._download(f["url"], directory / f["name"], f["bytes"], f["sha256"])
        (directory / MANIFEST).write_text(json.dumps(desc["manifest"], indent=2) + "\n")
        kwargs = {"threads": self.threads} if self.runtime_name == "onnxruntime" else {}
        self.rt = open_runtime(self.runtime_name, directory, **kwargs)
        _, _, body = await self._request("GET", "/v1/deltas")
        self.applied = {k.removesuffix(".delta"): v for k, v in decode(body, None, MAX_REPLY_BYTES).items()}
        if self.applied:
            self.rt.apply_merged_update(self.applied)
        s = self.settings
        self.optimizer = AdamW(lr=s["lr"], weight_decay=0.01)  # as hsplitlora.train.make_optimizer

    async def _download(self, url: str, dest: Path, size: int, sha256: str) -> None:
        """One artifact file, resumed from a partial download (HTTP Range), checked by size and sha256."""
        if dest.is_file() and dest.stat().st_size == size and sha256_file(dest) == sha256:
            return
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

    # ----- one round ---------------------------------------------------------------------------
    async def train_round(self, progress: Callable[[int, float], None] | None = None) -> RoundReport:
        """Local split steps, adapter upload, then wait for and apply the merged update."""
        if self.plan is None:
            await self.register()
        start = time.perf_counter()
        train = self._train_artifact if self.rt is not None else self._train_eager
        losses, adapters, scores, up, down = await train(progress)
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
        new_plan = Plan.from_dict(json.loads(headers["X-Plan"]))
        if new_plan != self.plan:
            self._check_plan(new_plan)
        update = decode(reply, None, MAX_REPLY_BYTES)
        report = RoundReport(self.round, losses, time.perf_counter() - start, up, down, self.plan.split)
        old_plan, self.plan, self.round = self.plan, new_plan, int(headers["X-Round"])
        if headers.get("X-Update") == "start":  # fedavg / hetlora / flexlora: W stays, adapters carry on
            self.start = update
        elif self.rt is None:
            install_adapters(self.model, {})
            # Blocks a deeper split brings onto the device arrive as deltas against the base weights,
            # which these blocks still hold unless the device had them before (then base is kept).
            for t in all_targets(self.model, range(old_plan.split, new_plan.split)):
                self.base.setdefault(t, lora_layer(self.model, t).weight_slice(t.proj).detach().clone())
            self._apply_update(update)
        elif (new_plan.split, new_plan.ranks) != (old_plan.split, old_plan.ranks):
            await self._load_artifact()  # another segment: the server's new artifact, the deltas so far
        else:
            self.rt.apply_merged_update(update)
            for key, delta in dense_updates(update).items():
                self.applied[key] = self.applied.get(key, 0) + delta
        return report

    async def _step(self, step: int, h: torch.Tensor, batch) -> tuple[torch.Tensor, float, int, int]:
        """Send h (+ mask, labels) for one split step: (dL/dh, loss, bytes up, bytes down)."""
        body = encode({"h": h, "attention_mask": batch.attention_mask, "labels": batch.labels}, self.settings["wire"])
        _, headers, reply = await self._request("POST", f"/v1/steps?round={self.round}&step={step}", data=body,
                                                headers={"Content-Type": "application/octet-stream"})
        grad = decode(reply, {"grad": TensorSpec(tuple(h.shape))}, MAX_REPLY_BYTES)["grad"]
        return grad, float(headers["X-Loss"]), len(body), len(reply)

    async def _train_eager(self, progress):
        s, up, down = self.settings, 0, 0
        install_adapters(self.model, {})
        factors = apply_lora(self.model, self.plan.ranks, s["alpha"], seed=(s["seed"], self.number, self.round))
        with torch.no_grad():
            for t, f in factors.items():
                if f"{t}.A" in self.start:
                    f.A.copy_(self.start[f"{t}.A"])
                    f.B.copy_(self.start[f"{t}.B"])
        optimizer = make_optimizer((p for f in factors.values() for p in f.parameters()), s["lr"])
        device = Segment(self.model, 0, self.plan.split, embed=True, head=False)
        self.model.train()
        losses, scores = [], {}
        for step in range(s["local_steps"]):
            batch = next(self.stream)
            probe_targets = all_targets(self.model, range(self.plan.split)) if step == 0 else []
            with SensitivityProbe(self.model, probe_targets) as probe:
                h = device(batch.input_ids, batch.attention_mask)
                grad, loss, sent, received = await self._step(step, h, batch)
                h.backward(grad)
            if probe_targets:
                scores = resource_normalised(self.model, probe.scores)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            up, down = up + sent, down + received
            losses.append(loss)
            if progress:
                progress(step, loss)
        self.model.eval()
        adapters = {}
        for t, f in factors.items():
            adapters[f"{t}.A"], adapters[f"{t}.B"] = f.A.detach(), f.B.detach()
        return losses, adapters, scores, up, down

    async def _train_artifact(self, progress):
        s, up, down, losses = self.settings, 0, 0, []
        rt, manifest = self.rt, self.rt.manifest
        rt.set_lora_tensors(fresh_lora(rt.lora_shapes(), seed=(s["seed"], self.number, self.round)))
        rt.set_lora_tensors(self.start)
        self.optimizer.reset()
        for step in range(s["local_steps"]):
            batch = pad_batch(next(self.stream), manifest["batch"], manifest["seq"], self.tokenizer.pad_token_id)
            h = rt.forward(batch.input_ids, batch.attention_mask, keep=True)
            grad, loss, sent, received = await self._step(step, h, batch)
            grads = rt.backward(grad)
            self.optimizer.step(rt.lora_tensors(), grads)
            up, down = up + sent, down + received
            losses.append(loss)
            if progress:
                progress(step, loss)
        return losses, {k: v.clone() for k, v in rt.lora_tensors().items()}, {}, up, down

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
        if self.rt is None:
            deltas = {str(t): (lora_layer(self.model, t).weight_slice(t.proj).detach() - b).contiguous()
                      for t, b in self.base.items()}
        else:  # what was merged into the artifact since its download from the base checkpoint
            deltas = {k: torch.as_tensor(v).contiguous() for k, v in self.applied.items()}
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
