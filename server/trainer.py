"""The server's model work: each client's server segment and adapters, aggregation, plans.

One frozen base model serves every client; each client has its own server-side adapters and
optimizer, swapped in for its steps (design §3.1). All model work runs under one lock, off the
event loop. The merged weights are kept as cumulative deltas against the base checkpoint, so a
restarted server rebuilds them exactly and a device that takes over new blocks can be sent them.
"""

from __future__ import annotations

import logging
import threading
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
from server.store import GLOBAL_ADAPTER, IMPORTANCE, MERGED_DELTAS, ClientRecord, Store, server_snapshot, start_factors

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
    factors: dict[Target, LoRAFactors] = field(default_factory=dict)
    optimizer: torch.optim.Optimizer | None = None
    scores: dict[Target, float] = field(default_factory=dict)
    last_step: tuple[int, int] | None = None  # (round, step) of the last trained step
    last_reply: tuple[torch.Tensor, float] | None = None  # its gradient and loss, for a retry
    digests: dict[int, str] = field(default_factory=dict)  # this round's trained steps: the digest of each body


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
                self.restore_server_state(client_id, saved)

    # ----- clients and plans -------------------------------------------------------------------
    def _context(self, newcomer: Budget | None = None) -> PlanContext:
        """What the strategy plans with: every registered client's budget by registration order
        (and a newcomer's, last)."""
        budgets = [c.budget for c in sorted(self.clients.values(), key=lambda c: c.number)]
        return PlanContext(self.dims, self.shape, self.cfg.planner, self.importance,
                           budgets + ([newcomer] if newcomer else []), self.cfg.server_speed)

    def _adopt(self, record: ClientRecord, plan: Plan) -> ServerClient:
        profile = record.profile
        client = ServerClient(record.id, record.number, record.examples, budget_of(profile),
                              profile.get("relative_speed"), plan, measured_device(profile, self.cfg.wire))
        self.clients[record.id] = client
        self._fresh_adapters(client, self.store.current_round(), self._context())
        return client

    def plan_for(self, profile: dict) -> Plan:
        """The plan a device with this profile would get now (PlanError if none fits, ValueError if its
        measurements are malformed)."""
        device = measured_device(profile, self.cfg.wire)
        budget = budget_of(profile)
        with self.lock:
            ctx = self._context(newcomer=budget)
            who = Participant(len(ctx.budgets) - 1, budget, profile.get("relative_speed"), device)
            return self.strategy.device_plan(ctx, who)

    def add_client(self, record: ClientRecord, plan: Plan) -> None:
        with self.lock:
            self._adopt(record, plan)

    def _fresh_adapters(self, client: ServerClient, round_number: int, ctx: PlanContext) -> None:
        """The client's server-side adapters for a round: fresh (ranks by the strategy in `ctx`), or
        (non-merging strategies) where the last aggregation left them."""
        install_adapters(self.model, {})
        saved = None if self.strategy.merges else self.store.load_tensors(start_factors(client.id))
        if saved is not None:
            start = {t: ab for t, ab in tensors_to_factors(saved).items() if t.layer >= client.plan.split}
            client.factors = adapters_from_factors(self.model, start, self.cfg.alpha)
        else:
            ranks = self.strategy.server_ranks(ctx, client.plan.split)
            client.factors = apply_lora(self.model, ranks, self.cfg.alpha,
                                        seed=(self.cfg.seed, client.number, round_number))
        # A strategy that trains every block on the device leaves the server only the head: no adapters.
        client.optimizer = (make_optimizer((p for f in client.factors.values() for p in f.parameters()), self.cfg.lr)
                            if client.factors else None)
        client.scores, client.last_step, client.last_reply, client.digests = {}, None, None, {}

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
            if step > 0 and not client.digests:
                raise RedoRound(f"the server has no record of this round's earlier steps (it restarted, or step 0 "
                                f"was never sent): train round {round_number} again from step 0")
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

    def upload_problem(self, client_id: str, tensors: dict[str, torch.Tensor]) -> str | None:
        """Why a client's uploaded device adapters must be refused, or None."""
        adapters = {t: (a, b, self.cfg.alpha / a.shape[0]) for t, (a, b) in tensors_to_factors(tensors).items()}
        return contribution_problem(Contribution(client_id, 1.0, adapters), self.limits)

    def server_state(self, client_id: str) -> dict[str, torch.Tensor]:
        """The client's server-side adapters ('<t>.A', '<t>.B'), to persist with its upload."""
        with self.lock:
            return factors_to_tensors({t: (f.A.detach().clone(), f.B.detach().clone())
                                       for t, f in self.clients[client_id].factors.items()})

    def restore_server_state(self, client_id: str, tensors: dict[str, torch.Tensor]) -> None:
        """Put back a client's server-side adapters exactly as persisted (their set and ranks too)."""
        with self.lock:
            client = self.clients[client_id]
            client.factors = adapters_from_factors(self.model, tensors_to_factors(tensors), self.cfg.alpha)

    # ----- aggregation -------------------------------------------------------------------------
    def aggregate(self, uploads: dict[str, dict[str, torch.Tensor]], device_scores: dict[str, dict[Target, float]],
                  round_number: int) -> dict[str, Update]:
        """Close one round (`hsplitlora.federation.round`) over the uploading clients' device and
        server adapters; persist what it changed; every client's update and next adapters.

        A merging strategy re-plans every client; its update holds, for each changed weight of
        its device blocks, the stacked factors to add, and for blocks a new plan moves onto the
        device the merged delta against the base checkpoint. The others keep W frozen and a
        global adapter; the update holds the factors the client's device adapters start the next
        round from (a client that missed the round starts where it started this one).
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
            ctx = self._context()  # one context for every client: budgets by registration order
            replies = {}
            for index, client in enumerate(sorted(self.clients.values(), key=lambda c: c.number)):
                old_split = client.plan.split
                who = Participant(index, client.budget, client.speed, client.device, client.plan)
                client.plan = self.strategy.next_plan(ctx, who)
                if self.strategy.merges:
                    factors = {t: (u.A, u.B) for t, u in result.merged.items() if t.layer < old_split}
                    replies[client.id] = Update(MERGE, factors, self._new_blocks(old_split, client.plan.split))
                else:
                    saved = tensors_to_factors(self.store.load_tensors(start_factors(client.id)) or {})
                    replies[client.id] = Update(START, {t: ab for t, ab in saved.items() if t.layer < client.plan.split})
                self._fresh_adapters(client, round_number + 1, ctx)
            if self.strategy.merges:
                self.store.save_tensors(MERGED_DELTAS, self.deltas())
            else:
                self.store.save_tensors(GLOBAL_ADAPTER, factors_to_tensors(
                    {t: (u.A, u.B) for t, u in self.global_adapter.items()}))
            self.store.save_tensors(IMPORTANCE, {str(t): torch.tensor(v, dtype=torch.float64)
                                                 for t, v in self.tracker.smoothed.items()})
            return replies

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
