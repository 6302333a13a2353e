"""The device side of a federation: what an app embeds to fine-tune with a server.

    from edge_sdk import Client
    client = Client("http://127.0.0.1:8080", examples, memory_budget=2e9, join_code="...")
    client.run(rounds=3)                      # blocking facade; AsyncClient underneath
    client.save("my-device-state")

A device that measured itself (`hsplitlora profile`, `edge_sdk.profile.profile_device`) passes
`profile=` instead of, or besides, a memory budget (default: the share of free memory the profile
offers), and may give `step_time_budget=` seconds; the server then plans by what those
measurements predict. Every plan the client is given is checked against its budget first
(`edge_sdk.fit`): one that does not fit raises `PlanDoesNotFit` before any training.

The device segment runs behind one interface (`edge_sdk.runtimes.DeviceRuntime`): eager PyTorch
(`runtime="torch"`, the default) or an exported artifact the server builds for the device's plan
(`runtime="onnxruntime"` or `"executorch"`, docs/export.md), downloaded once per plan (resumable,
checked by sha256) and brought up to date by merging the run's deltas into it. One training loop
serves all three, with the SDK's AdamW. Artifact runtimes cannot score their weights' importance
(no weight gradients), so only the server's blocks are scored then. The server is reached through
a transport (`edge_sdk.transport.HttpTransport`); this module holds no HTTP.

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
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import torch

from edge_sdk.fit import DeviceBudget, PlanDoesNotFit, plan_problem
from edge_sdk.runtimes import FORMAT_OF, AdamW, DeviceRuntime, TorchRuntime, choose_runtime, fresh_lora, open_runtime
from edge_sdk.transport import HttpTransport, RedoRound, ServerError, Transport
from hsplitlora.configs import option, parse_bytes
from hsplitlora.cost import ModelDims, StepShape
from hsplitlora.data import Example, endless_batches, pad_batch
from hsplitlora.federation.manifest import MANIFEST
from hsplitlora.federation.protocol import REJOIN, START, Settings, Update, factors_to_tensors
from hsplitlora.lora import Target, lora_layer
from hsplitlora.models import cache_dir, load_dims, load_model, load_tokenizer
from hsplitlora.planner import Plan

log = logging.getLogger(__name__)
__all__ = ["AsyncClient", "Client", "ClientConfig", "RoundReport", "ServerError"]


@dataclass
class ClientConfig:
    """How this device takes part (`hsplitlora client` builds one from its flags)."""

    memory_budget: float | None = option(
        None, parse=parse_bytes, metavar="BYTES",
        help="memory this device gives training, e.g. 2GB or 512MiB: with a profile, the peak resident memory of "
             "this whole process (default: the profile's share of the free memory); without, the training memory "
             "of the cost model (`hsplitlora client` default: 2GB)")
    profile: dict | None = option(None, cli=False, help="this device's measurements (`hsplitlora profile`'s JSON)")
    step_time_budget: float | None = option(
        None, metavar="SECONDS", help="longest device step (forward, transfers, backward) accepted; needs a profile")
    relative_speed: float | None = option(None, help="this device's compute relative to the weakest (optional)")
    token: str | None = option(None, secret=True,
                               help="resume as the client holding this token (printed at first registration)")
    join_code: str | None = option(None, secret=True, help="the join code the server's operator gave (`hsplitlora enroll`)")
    retries: int = option(6, help="tries of a request beyond the first, on server errors and lost connections")
    backoff_s: float = option(0.5, flag="--backoff", metavar="SECONDS",
                              help="the first retry's wait; it doubles with each further try")
    poll_s: float = option(0.5, flag="--poll", metavar="SECONDS", help="how often to ask whether the round closed")
    runtime: str = option("torch", choices=("torch", "onnxruntime", "executorch", "auto"),
                          help="what runs the device segment: eager torch, or an exported artifact the server builds "
                               "for this plan, in onnxruntime or ExecuTorch; auto = the first installed of "
                               "onnxruntime, torch, executorch")
    artifact_dir: Path | None = option(None, help="where downloaded artifacts are kept "
                                                  "(default: ~/.cache/hsplitlora/artifacts)")
    threads: int | None = option(None, help="threads on this device: torch's, and an onnxruntime session's "
                                            "(default: torch's choice; every core for onnxruntime)")

    def __post_init__(self) -> None:
        if self.memory_budget is None and self.profile is None:
            raise ValueError("give a memory budget, a device profile (`hsplitlora profile`), or both")


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
    """Register with a server, train rounds of split steps, apply the merged updates.

    `AsyncClient(server, examples, memory_budget, **options)`: `server` is a URL (or a `Transport`);
    the options are `ClientConfig`'s fields (or `config=` one), plus `ssl` (an `ssl.SSLContext` for
    HTTPS)."""

    def __init__(self, server: str | Transport, examples: Sequence[Example], memory_budget: float | None = None,
                 *, ssl=None, config: ClientConfig | None = None, **options):
        if not examples:
            raise ValueError("a client needs at least one training example")
        unknown = set(options) - {f.name for f in fields(ClientConfig)}
        if unknown:
            raise TypeError(f"unknown client options {sorted(unknown)}; see ClientConfig")
        if config is not None and (options or memory_budget is not None):
            raise TypeError("give a ClientConfig or its options, not both")
        self.config = cfg = config or ClientConfig(memory_budget=memory_budget, **options)
        memory = cfg.memory_budget if cfg.memory_budget is not None else float(cfg.profile["memory_bytes"])
        self.budget = DeviceBudget(memory, cfg.step_time_budget, cfg.profile)
        self.profile = self.budget.registration()
        if cfg.relative_speed:
            self.profile["relative_speed"] = float(cfg.relative_speed)
        self.transport: Transport = HttpTransport(
            server, cfg.token, retries=cfg.retries, backoff_s=cfg.backoff_s, poll_s=cfg.poll_s, ssl=ssl
        ) if isinstance(server, str) else server
        self.runtime_name = choose_runtime(None if cfg.runtime == "auto" else cfg.runtime)
        self.artifact_dir = Path(cfg.artifact_dir) if cfg.artifact_dir else cache_dir() / "artifacts"
        self.examples = list(examples)
        self.client_id: str | None = None
        self.number = 0  # registration order, from the server
        self.round = 0
        self.plan: Plan | None = None
        self.settings: Settings | None = None
        self.dims: ModelDims | None = None
        self.rt: DeviceRuntime | None = None
        self.optimizer: AdamW | None = None
        self.model = None  # eager torch: the whole model, whose first blocks are the device segment
        self.base: dict[Target, torch.Tensor] = {}  # eager torch: base weights of blocks the device holds
        self.applied: dict[Target, torch.Tensor] = {}  # every device weight's change against the base
        self.start: dict[str, torch.Tensor] = {}  # non-merging strategies: where the next round's adapters start

    @property
    def token(self) -> str | None:
        return self.transport.token

    async def close(self) -> None:
        await self.transport.close()

    # ----- set-up ------------------------------------------------------------------------------
    async def register(self) -> Plan:
        """Join the federation (or resume, with a token) and open the device segment for the plan."""
        reply = await self.transport.register(self.profile, len(self.examples), self.config.join_code)
        self.client_id, self.number, self.round = reply["client_id"], reply["number"], reply["round"]
        self.plan, self.settings = Plan.from_dict(reply["plan"]), Settings.from_dict(reply["settings"])
        self._check_plan(self.plan)
        s = self.settings
        self.tokenizer = load_tokenizer(s.model)
        await self._open_runtime(await self.transport.merged_deltas())
        self.optimizer = AdamW(lr=s.lr, weight_decay=0.01)  # as hsplitlora.train.make_optimizer
        # Seeded as the simulation seeds client `number`, so the same data trains in the same order.
        self.stream = endless_batches(self.tokenizer, self.examples, s.batch_size, s.max_len, seed=s.seed + self.number)
        log.info("client %s: round %d, split %d, %d device adapters, runtime %s", self.client_id, self.round,
                 self.plan.split, len(self.plan.ranks), self.runtime_name)
        return self.plan

    def _check_plan(self, plan: Plan) -> None:
        """Refuse (PlanDoesNotFit) a plan over this device's budget, before anything is loaded for it."""
        s = self.settings
        if self.dims is None:
            self.dims = load_dims(s.model)
        available = None
        if self.budget.profile is not None:
            from edge_sdk.cgroups import available_memory, process_memory

            try:  # what this process could reach now: what it holds and what the system has free
                available = available_memory() + process_memory()["VmRSS"]
            except (OSError, RuntimeError, KeyError):
                available = None  # no /proc here: the budget check still holds
        problem = plan_problem(plan, self.budget, self.dims, StepShape(s.batch_size, s.max_len), s.wire, available)
        if problem:
            raise PlanDoesNotFit(f"client {self.client_id} refuses its plan: {problem}")

    async def _open_runtime(self, deltas: dict[Target, torch.Tensor]) -> None:
        """The runtime of the current plan, its device blocks set to the base weights plus `deltas`
        (the run's merged changes of blocks new to this segment)."""
        if self.runtime_name == "torch":
            if self.model is None:
                self.model, _ = load_model(self.settings.model)
            for t, delta in deltas.items():
                weight = lora_layer(self.model, t).weight_slice(t.proj)
                # The base stays what it was when the block first came to the device.
                base = self.base.setdefault(t, weight.detach().clone())
                with torch.no_grad():
                    weight.copy_(base + delta)
            self.rt = TorchRuntime.from_model(self.model, self.plan.split, self.plan.ranks, self.settings.alpha)
        else:
            self.rt = await self._download_artifact()
            if deltas:
                self.rt.apply_merged_update({str(t): d for t, d in deltas.items()})
            self.applied = {}
        self.applied.update(deltas)

    async def _download_artifact(self) -> DeviceRuntime:
        """The artifact of the current plan, fetched (or found intact) and opened."""
        fmt = FORMAT_OF[self.runtime_name]
        desc = await self.transport.artifact(fmt)
        directory = self.artifact_dir / self.client_id / desc["id"]
        for old in directory.parent.glob("*"):  # merges patch files in place: a copy serves one plan only
            if old != directory:
                shutil.rmtree(old, ignore_errors=True)
        for f in desc["files"]:
            await self.transport.download(f["url"], directory / f["name"], f["bytes"], f["sha256"])
        (directory / MANIFEST).write_text(json.dumps(desc["manifest"], indent=2) + "\n")
        kwargs = {"threads": self.config.threads} if self.runtime_name == "onnxruntime" else {}
        return open_runtime(self.runtime_name, directory, **kwargs)

    # ----- one round ---------------------------------------------------------------------------
    async def train_round(self, progress: Callable[[int, float], None] | None = None) -> RoundReport:
        """Local split steps, adapter upload, then wait for and apply the round's update."""
        if self.plan is None:
            await self.register()
        start = time.perf_counter()
        losses, scores, up, down = await self._train_and_upload(progress)
        update, new_plan, open_round, received = await self.transport.wait_update(self.round)
        if new_plan != self.plan:
            self._check_plan(new_plan)
        report = RoundReport(self.round, losses, time.perf_counter() - start, up, down + received, self.plan.split)
        missed = open_round > self.round + 1  # rounds closed after ours, before we asked for our update
        old_plan, self.plan, self.round = self.plan, new_plan, open_round
        if missed and update.kind != START:
            # The server's merged weights now hold this update and the missed ones: take them instead
            # (a new plan's runtime is opened once, by the resync).
            log.warning("client %s missed round(s) %d-%d: taking the server's merged weights", self.client_id,
                        report.round + 1, open_round - 1)
            await self._resync()
        else:
            await self._apply(update, old_plan)
        return report

    async def _resync(self) -> None:
        """The device's blocks set to the server's merged weights now (after rounds it missed)."""
        deltas = await self.transport.merged_deltas()
        if self.runtime_name == "torch":  # weights the server has not changed go back to their base
            deltas = {**{t: torch.zeros_like(b) for t, b in self.base.items() if t.layer < self.plan.split}, **deltas}
        self.applied = {}
        await self._open_runtime(deltas)

    async def _train_and_upload(self, progress) -> tuple[list[float], dict[Target, float], int, int]:
        """The round's split steps through the runtime and the adapters' upload: (losses, importance
        scores, bytes up, down). Trained again from step 0 when the server lost the earlier steps
        (a restart mid-round), or in the open round when this one closed without us (its deadline)."""
        for attempt in range(self.config.retries + 1):
            try:
                losses, scores, up, down = await self._round_of_steps(progress)
                up += await self.transport.upload(self.round, {k: v.clone() for k, v in self.rt.lora_tensors().items()},
                                                  scores)
                return losses, scores, up, down
            except RedoRound as e:
                if attempt == self.config.retries:
                    raise
                if e.redo == REJOIN:
                    log.warning("client %s: round %d closed without it; training round %d", self.client_id,
                                self.round, e.open_round)
                    self.round = e.open_round
                    await self._resync()  # W as the rounds it missed left it (unchanged where W stays frozen)
                else:
                    log.warning("client %s: %s; training round %d again", self.client_id, e, self.round)

    async def _round_of_steps(self, progress) -> tuple[list[float], dict[Target, float], int, int]:
        s, rt = self.settings, self.rt
        rt.set_lora_tensors(fresh_lora(rt.lora_shapes(), seed=(s.seed, self.number, self.round)))
        rt.set_lora_tensors(self.start)
        self.optimizer.reset()
        shape = rt.batch_shape()
        losses, scores, up, down = [], {}, 0, 0
        for step in range(s.local_steps):
            batch = next(self.stream)
            if shape:
                batch = pad_batch(batch, *shape, self.tokenizer.pad_token_id)
            probe = rt.importance_probe() if step == 0 else None  # importance rides on the first step
            with probe or nullcontext():
                h = rt.forward(batch.input_ids, batch.attention_mask, keep=True)
                grad, loss, sent, received = await self.transport.step(
                    self.round, step, {"h": h, "attention_mask": batch.attention_mask, "labels": batch.labels}, s.wire)
                grads = rt.backward(grad)
            if probe is not None:
                scores = probe.normalised()
            self.optimizer.step(rt.lora_tensors(), grads)
            up, down = up + sent, down + received
            losses.append(loss)
            if progress:
                progress(step, loss)
        return losses, scores, up, down

    async def _apply(self, update: Update, old_plan: Plan) -> None:
        """A merge into the frozen weights (and the runtime of a new plan), or the next round's start."""
        if update.kind == START:  # strategies that keep W frozen: the adapters carry on
            self.start = factors_to_tensors(update.factors)
            return
        changes = {t: d for t, d in update.dense().items() if t.layer < old_plan.split}
        if self.model is not None:  # eager torch: a weight's base is what it held before its first change
            for t in changes:
                self.base.setdefault(t, lora_layer(self.model, t).weight_slice(t.proj).detach().clone())
        self.rt.apply_merged_update({str(t): d for t, d in changes.items()})
        for t, d in changes.items():
            self.applied[t] = self.applied.get(t, 0) + d
        if (self.plan.split, self.plan.ranks) != (old_plan.split, old_plan.ranks):
            # Another segment: eager torch gets the blocks new to it from the update; an artifact is
            # another download, brought up to the run's deltas so far.
            deltas = update.deltas if self.runtime_name == "torch" else await self.transport.merged_deltas()
            await self._open_runtime(deltas)

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

    def device_deltas(self) -> dict[Target, torch.Tensor]:
        """The merged change of every weight of the device's blocks against the base checkpoint."""
        return {t: torch.as_tensor(d) for t, d in self.applied.items() if t.layer < self.plan.split}

    def save(self, out_dir: str | Path) -> Path:
        """The device's merged weights (deltas against the base checkpoint) and its plan."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({str(t): d.contiguous() for t, d in self.device_deltas().items()},
                  str(out / "device_deltas.safetensors"))
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
