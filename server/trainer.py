"""The server's model work: each client's server segment and adapters, aggregation, plans.

One frozen base model serves every client; each client has its own server-side adapters and
optimizer, made at its first step of a round and swapped in for its steps (design §3.1), so a
registered client that is not training costs its plan and little else. All model work runs
under one lock, off the event loop. The merged weights are kept as cumulative deltas against the base checkpoint, so a
restarted server rebuilds them exactly and a device that takes over new blocks can be sent them.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from hsplitlora.aggregation import LowRank
from hsplitlora.cost import ModelDims, StepShape
from hsplitlora.federation.protocol import MERGE, START, Update, factors_to_tensors, tensors_to_factors
from hsplitlora.federation.round import Contribution, close_round, contribution_problem, run_progress
from hsplitlora.federation.strategies import Participant, PlanContext
from hsplitlora.importance import ImportanceTracker, SensitivityProbe, all_targets, fill_unscored, resource_normalised
from hsplitlora.lora import LoRAFactors, Target, adapters_from_factors, apply_lora, install_adapters, lora_layer
from hsplitlora.models import load_model
from hsplitlora.planner import Budget, MeasuredDevice, Plan, uniform_importance
from hsplitlora.predict import DeviceRates
from hsplitlora.split import Segment
from hsplitlora.train import make_optimizer
from hsplitlora.wire import BYTES_PER_ELEMENT, WireError
from server.config import ServerConfig
from server.store import (GLOBAL_ADAPTER, IMPORTANCE, MERGED_DELTAS, ClientRecord, Store, round_update_file,
                          server_snapshot, start_factors)

log = logging.getLogger(__name__)


def budget_of(profile: dict) -> Budget:
    """The budget a device gave in its profile (memory; optionally FLOPs and seconds per step)."""
    return Budget(float(profile["memory_bytes"]), profile.get("flops_per_step"), profile.get("step_seconds"))


def measured_device(profile: dict, wire: str) -> MeasuredDevice | None:
    """A profile written by `hsplitlora profile` (it has flops_fp32) is planned by its predictions;
    a declared one (memory, FLOPs) by the analytic counts. Raises ValueError for a malformed one."""
    if profile.get("flops_fp32") is None:
        return None
    try:
        rates = DeviceRates.from_profile(profile)
    except (TypeError, AttributeError, OverflowError) as e:  # a number where a mapping belongs, int(Infinity)
        raise ValueError(f"malformed device profile: {e}") from None
    return MeasuredDevice(rates, BYTES_PER_ELEMENT[wire])


@dataclass
class ServerClient:
    """What the server keeps in memory for one client during a round."""

    id: str
    number: int  # registration order: with the run's seed and the round, seeds fresh adapters
    examples: int
    budget: Budget
    speed: float | None
    plan: Plan
    device: MeasuredDevice | None = None  # its measurements, when it profiled itself
    last_seen: float = field(default_factory=time.monotonic)  # its last authenticated request
    round: int | None = None  # the round its server-side adapters below are of (None: it is in none)
    factors: dict[Target, LoRAFactors] = field(default_factory=dict)
    optimizer: torch.optim.Optimizer | None = None
    scores: dict[Target, float] = field(default_factory=dict)
    last_step: tuple[int, int] | None = None  # (round, step) of the last trained step
    last_reply: tuple[torch.Tensor, float] | None = None  # its gradient and loss, for a retry
    digests: dict[int, str] = field(default_factory=dict)  # this round's trained steps: the digest of each body

    def leave_round(self) -> None:
        """Drop the round's server-side state (the round closed, with or without this client)."""
        self.round, self.factors, self.optimizer, self.scores = None, {}, None, {}
        self.last_step, self.last_reply, self.digests = None, None, {}


class StepConflict(RuntimeError):
    """A split step that must not be trained: the ids of one already trained, with another body
    or out of order (the server answers 409)."""


class RedoRound(StepConflict):
    """The client's earlier steps of the round are not on this server (it restarted): the client
    must train the round again from step 0 (409 with `"redo": "round"`)."""


class ServerTrainer:
    """Server segments, adapters, aggregation and planning for every client, by the run's strategy."""

    def __init__(self, cfg: ServerConfig, store: Store):
        self.cfg, self.store = cfg, store
        self.strategy = cfg.strategy()
        self.model, _ = load_model(cfg.model)
        self.dims = ModelDims.from_config(self.model.config)
        cfg.planner.projections(self.dims)  # a projection this model lacks: refuse to start, not at registration
        self.shape = StepShape(cfg.batch_size, cfg.max_len)
        self.lock = threading.Lock()
        self.targets = all_targets(self.model)
        self.base = {t: lora_layer(self.model, t).weight_slice(t.proj).detach().clone() for t in self.targets}
        # The largest update (||scale * B @ A||_F) accepted for each weight: max_update_ratio x its base norm.
        self.limits = {t: cfg.max_update_ratio * float(w.norm()) for t, w in self.base.items()}
        deltas = store.load_tensors(MERGED_DELTAS) or {}
        for t in self.targets:
            if str(t) in deltas:
                lora_layer(self.model, t).add_to_weight(t.proj, deltas[str(t)])
        self.global_adapter = {t: LowRank(a, b) for t, (a, b) in
                               tensors_to_factors(store.load_tensors(GLOBAL_ADAPTER) or {}).items()}
        self.tracker = ImportanceTracker()
        saved = store.load_tensors(IMPORTANCE) or {}
        self.tracker.smoothed = {Target.parse(k): float(v) for k, v in saved.items()}
        self.importance = fill_unscored(self.tracker.smoothed, self.targets) or uniform_importance(self.dims, cfg.planner)
        self.clients: dict[str, ServerClient] = {}
        self.segments: dict[int, Segment] = {}
        self.dropped = 0  # contributions left out of a round since the start (non-finite or over the limits)
        for record in store.clients():
            if record.plan:
                self._adopt(record, Plan.from_dict(record.plan))
        # Clients that uploaded in the open round before a restart keep their server-side part too.
        open_round = store.current_round()
        for client_id in store.uploaded(open_round):
            saved = store.load_tensors(server_snapshot(open_round, client_id))
            if saved is not None:
                self.restore_server_state(client_id, saved, open_round)

    # ----- clients and plans -------------------------------------------------------------------
    def touch(self, client_id: str) -> None:
        """The client was just heard from (it is active for --idle-expiry seconds more)."""
        self.clients[client_id].last_seen = time.monotonic()

    def active(self) -> list[ServerClient]:
        """The clients heard from within --idle-expiry seconds, by registration order: the ones
        planning counts and a round waits for."""
        since = time.monotonic() - self.cfg.idle_expiry_s
        return sorted((c for c in self.clients.values() if c.last_seen >= since), key=lambda c: c.number)

    def _context(self, active: list[ServerClient], newcomer: Budget | None = None) -> PlanContext:
        """What the strategy plans with: the active clients' budgets by registration order (and a
        newcomer's, last)."""
        budgets = [c.budget for c in active] + ([newcomer] if newcomer else [])
        return PlanContext(self.dims, self.shape, self.cfg.planner, self.importance, budgets, self.cfg.server_speed)

    def _adopt(self, record: ClientRecord, plan: Plan) -> ServerClient:
        profile = record.profile
        client = ServerClient(record.id, record.number, record.examples, budget_of(profile),
                              profile.get("relative_speed"), plan, measured_device(profile, self.cfg.wire))
        self.clients[record.id] = client
        return client

    def plan_for(self, profile: dict) -> Plan:
        """The plan a device with this profile would get now (PlanError if none fits, ValueError if its
        measurements are malformed)."""
        device = measured_device(profile, self.cfg.wire)
        budget = budget_of(profile)
        with self.lock:
            ctx = self._context(self.active(), newcomer=budget)
            who = Participant(len(ctx.budgets) - 1, budget, profile.get("relative_speed"), device)
            return self.strategy.device_plan(ctx, who)

    def add_client(self, record: ClientRecord, plan: Plan) -> None:
        with self.lock:
            self._adopt(record, plan)

    def server_ranks(self, client_id: str) -> dict[Target, int]:
        """The ranks the strategy gives the client's server-side adapters now (fresh ones)."""
        return self.strategy.server_ranks(self._context(self.active()), self.clients[client_id].plan.split)

    def _enter_round(self, client: ServerClient, round_number: int) -> None:
        """The client's server-side adapters for a round, made at its first step: fresh (ranks by
        the strategy), or (non-merging strategies) where the last aggregation left them."""
        install_adapters(self.model, {})
        saved = None if self.strategy.merges else self.store.load_tensors(start_factors(client.id))
        if saved is not None:
            start = {t: ab for t, ab in tensors_to_factors(saved).items() if t.layer >= client.plan.split}
            client.factors = adapters_from_factors(self.model, start, self.cfg.alpha)
        else:
            client.factors = apply_lora(self.model, self.server_ranks(client.id), self.cfg.alpha,
                                        seed=(self.cfg.seed, client.number, round_number))
        # A strategy that trains every block on the device leaves the server only the head: no adapters.
        client.optimizer = (make_optimizer((p for f in client.factors.values() for p in f.parameters()), self.cfg.lr)
                            if client.factors else None)
        client.round, client.scores, client.last_step, client.last_reply, client.digests = round_number, {}, None, None, {}

    def _segment(self, split: int) -> Segment:
        if split not in self.segments:
            self.segments[split] = Segment(self.model, split, self.dims.layers, embed=False, head=True)
        return self.segments[split]

    # ----- the split step ----------------------------------------------------------------------
    def step(self, client_id: str, round_number: int, step: int, h: torch.Tensor, mask: torch.Tensor,
             labels: torch.Tensor, digest: str) -> tuple[torch.Tensor, float, bool]:
        """Train client's server side on one batch: (dL/dh, loss, trained).

        The step's ids and its body's `digest` make it idempotent: the last step sent again with the
        same body is answered again, not trained twice; the same ids with another body, or a step
        this round already trained, raise StepConflict. A batch whose loss or gradients are not
        finite trains nothing (WireError)."""
        with self.lock:
            client = self.clients[client_id]
            if client.last_step == (round_number, step) and client.digests.get(step) == digest:
                grad, loss = client.last_reply
                return grad, loss, False
            if client.round != round_number or not client.digests:
                if step > 0:
                    raise RedoRound(f"the server has no record of this round's earlier steps (it restarted, or "
                                    f"step 0 was never sent): train round {round_number} again from step 0")
                self._enter_round(client, round_number)
            if step in client.digests:
                again = "with another body" if client.last_step == (round_number, step) else "again"
                raise StepConflict(f"step {step} of round {round_number} was already trained; it was sent {again} "
                                   f"(the last trained step is {client.last_step[1]}): a step is trained once")
            install_adapters(self.model, client.factors)
            self.model.train()
            h = h.detach().requires_grad_(True)
            server = self._segment(client.plan.split)
            # The round's first step scores the server's blocks, when the strategy uses importance.
            scoring = self.strategy.scores_importance and not client.scores
            probe_targets = [t for t in self.targets if t.layer >= client.plan.split] if scoring else []
            try:
                with SensitivityProbe(self.model, probe_targets) as probe:
                    loss = server.loss(h, mask, labels)
                    loss.backward()
                params = [p for f in client.factors.values() for p in f.parameters()]
                finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(h.grad).all()) and all(
                    p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)
                if not finite:
                    for p in params:
                        p.grad = None
                    raise WireError("this batch's loss or gradients are not finite: nothing was trained")
                if probe_targets:
                    client.scores = resource_normalised(self.model, probe.scores)
                if client.optimizer is not None:
                    client.optimizer.step()
                    client.optimizer.zero_grad(set_to_none=True)
            finally:
                self.model.eval()
            client.last_step, client.last_reply = (round_number, step), (h.grad.detach(), loss.item())
            client.digests[step] = digest
            return h.grad.detach(), loss.item(), True

    def steps_trained(self, client_id: str, round_number: int) -> int:
        """How many split steps of this round the client's server side trained."""
        client = self.clients[client_id]
        return len(client.digests) if client.round == round_number else 0

    def upload_problem(self, client_id: str, tensors: dict[str, torch.Tensor]) -> str | None:
        """Why a client's uploaded device adapters must be refused, or None."""
        adapters = {t: (a, b, self.cfg.alpha / a.shape[0]) for t, (a, b) in tensors_to_factors(tensors).items()}
        return contribution_problem(Contribution(client_id, 1.0, adapters), self.limits)

    def server_state(self, client_id: str) -> dict[str, torch.Tensor]:
        """The client's server-side adapters ('<t>.A', '<t>.B'), to persist with its upload."""
        with self.lock:
            return factors_to_tensors({t: (f.A.detach().clone(), f.B.detach().clone())
                                       for t, f in self.clients[client_id].factors.items()})

    def restore_server_state(self, client_id: str, tensors: dict[str, torch.Tensor], round_number: int) -> None:
        """Put back a client's server-side adapters of a round exactly as persisted (their set and ranks too)."""
        with self.lock:
            client = self.clients[client_id]
            client.factors = adapters_from_factors(self.model, tensors_to_factors(tensors), self.cfg.alpha)
            client.round = round_number

    # ----- aggregation -------------------------------------------------------------------------
    def aggregate(self, uploads: dict[str, dict[str, torch.Tensor]], device_scores: dict[str, dict[Target, float]],
                  round_number: int) -> tuple[dict[str, torch.Tensor] | None, dict[str, Plan]]:
        """Close one round (`hsplitlora.federation.round`) over the uploading clients' device and
        server adapters; persist what it changed: (the round's shared update, the participants'
        next plans).

        A merging strategy re-plans each participant, and the shared update holds, for every
        changed weight, the stacked factors to add (`reply` cuts each client's part from it). The
        others keep W frozen and a global adapter, and each participant's next start is kept by
        the store. The cost is in the participants: clients that did not take part keep their plan
        and are not touched, beyond dropping what they had begun of this round.
        """
        with self.lock:
            contributions = []
            for client_id, tensors in uploads.items():
                client = self.clients[client_id]
                adapters = {t: (a, b, self.cfg.alpha / a.shape[0]) for t, (a, b) in tensors_to_factors(tensors).items()}
                adapters.update({t: (f.A.detach(), f.B.detach(), f.scale) for t, f in client.factors.items()})
                contributions.append(Contribution(client_id, client.examples, adapters,
                                                  {**device_scores.get(client_id, {}), **client.scores}))
            result = close_round(self.strategy, self.model, contributions, self.tracker, self.targets,
                                 run_progress(round_number, self.cfg.rounds), self.limits)
            for client_id, why in result.dropped.items():
                log.warning("round %d: %s left out of the aggregation: %s", round_number, client_id, why)
            self.dropped += len(result.dropped)
            if result.importance is not None:
                self.importance = result.importance
            self.global_adapter.update(result.global_adapter)
            for client_id, starts in result.starts.items():
                if starts:
                    self.store.save_tensors(start_factors(client_id), factors_to_tensors(starts))
            active = self.active()
            ctx = self._context(active)  # one context for every participant: budgets by registration order
            order = {c.id: i for i, c in enumerate(active)}
            plans = {}
            for client_id in uploads:
                client = self.clients[client_id]
                who = Participant(order.get(client_id, len(active)), client.budget, client.speed, client.device,
                                  client.plan)
                client.plan = plans[client_id] = self.strategy.next_plan(ctx, who)
            for client in self.clients.values():
                if client.round == round_number:
                    client.leave_round()
            # Staged: they replace the files when the caller completes the round in the store.
            if self.strategy.merges:
                self.store.stage(MERGED_DELTAS, self.deltas(), round_number)
            else:
                self.store.stage(GLOBAL_ADAPTER, factors_to_tensors(
                    {t: (u.A, u.B) for t, u in self.global_adapter.items()}), round_number)
            self.store.stage(IMPORTANCE, {str(t): torch.tensor(v, dtype=torch.float64)
                                          for t, v in self.tracker.smoothed.items()}, round_number)
            shared = factors_to_tensors({t: (u.A, u.B) for t, u in result.merged.items()}) if self.strategy.merges else None
            return shared, plans

    def mid_round(self, round_number: int, uploaded: list[str]) -> list[str]:
        """Active clients that trained steps of this round and have not uploaded it yet."""
        done, since = set(uploaded), time.monotonic() - self.cfg.idle_expiry_s
        return [c.id for c in self.clients.values()
                if c.round == round_number and c.digests and c.id not in done and c.last_seen >= since]

    def reply(self, client_id: str, round_number: int, split_before: int) -> Update | None:
        """A client's update of a closed round, derived from what the round left (None: its files
        were pruned). `split_before`: the split the client trained the round with.

        Merge: the round's factors of the weights in its blocks then, and the merged deltas of
        blocks its new plan brings onto the device. Start: where its adapters start the next round
        (its own start unchanged if it did not take part)."""
        with self.lock:
            client = self.clients[client_id]
            if not self.strategy.merges:
                saved = tensors_to_factors(self.store.load_tensors(start_factors(client_id)) or {})
                return Update(START, {t: ab for t, ab in saved.items() if t.layer < client.plan.split})
            tensors = self.store.load_tensors(round_update_file(round_number),
                                              keep=lambda key: Target.from_key(key)[0].layer < split_before)
            if tensors is None:
                return None
            return Update(MERGE, tensors_to_factors(tensors), self._new_blocks(split_before, client.plan.split))

    def _new_blocks(self, old_split: int, new_split: int) -> dict[Target, torch.Tensor]:
        """The merged deltas of the blocks a deeper split brings onto a device."""
        out = {}
        for t in self.targets:
            if old_split <= t.layer < new_split:
                delta = lora_layer(self.model, t).weight_slice(t.proj).detach() - self.base[t]
                if bool(delta.ne(0).any()):
                    out[t] = delta
        return out

    def deltas(self) -> dict[str, torch.Tensor]:
        """Merged weights as deltas against the base checkpoint (only weights that changed)."""
        out = {}
        for t in self.targets:
            delta = lora_layer(self.model, t).weight_slice(t.proj).detach() - self.base[t]
            if bool(delta.ne(0).any()):  # a NaN counts as a change (`abs().max() > 0` is False for it)
                out[str(t)] = delta.clone()
        return out
