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

from hsplitlora.aggregation import AGGREGATORS, ClientUpdate, LowRank
from hsplitlora.cost import ModelDims, StepShape
from hsplitlora.importance import (
    ImportanceTracker,
    SensitivityProbe,
    all_targets,
    fill_unscored,
    mean_scores,
    resource_normalised,
)
from hsplitlora.lora import LoRAFactors, Target, adapters_from_factors, apply_lora, install_adapters, lora_layer
from hsplitlora.models import load_model
from hsplitlora.planner import (
    Budget,
    MeasuredDevice,
    Plan,
    plan_device,
    server_ranks,
    should_replan,
    uniform_importance,
)
from hsplitlora.predict import DeviceRates
from hsplitlora.split import Segment
from hsplitlora.train import make_optimizer
from hsplitlora.wire import BYTES_PER_ELEMENT
from server.config import ServerConfig
from server.store import ClientRecord, Store

log = logging.getLogger(__name__)
DELTAS = "deltas/merged.safetensors"
GLOBAL_ADAPTER = "deltas/global-adapter.safetensors"  # methods that keep W frozen: W + this adapter
IMPORTANCE = "importance.safetensors"
MERGING = {"naa"}  # aggregators whose update is merged into W (the others keep a global adapter)


def start_factors(client_id: str) -> str:
    """Where the factors a client starts its next round from are kept (non-merging methods)."""
    return f"starts/{client_id}.safetensors"


def factors_to_tensors(factors: dict[Target, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {}
    for t, (a, b) in factors.items():
        out[f"{t}.A"], out[f"{t}.B"] = a, b
    return out


def tensors_to_factors(tensors: dict[str, torch.Tensor]) -> dict[Target, tuple[torch.Tensor, torch.Tensor]]:
    return {Target.parse(k[:-2]): (v, tensors[k[:-2] + ".B"]) for k, v in tensors.items() if k.endswith(".A")}


def server_snapshot(round_number: int, client_id: str) -> str:
    """Where a client's server-side adapters of a round are kept once it uploaded."""
    return f"rounds/{round_number}/{client_id}-server.safetensors"


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
    except (TypeError, AttributeError) as e:  # e.g. a number where a mapping belongs
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


class ServerTrainer:
    """Server segments, adapters, aggregation and planning for every client."""

    def __init__(self, cfg: ServerConfig, store: Store):
        if cfg.method not in AGGREGATORS:
            raise ValueError(f"unknown aggregation method {cfg.method!r}; choose from {', '.join(AGGREGATORS)}")
        self.cfg, self.store = cfg, store
        self.merging = cfg.method in MERGING
        self.model, _ = load_model(cfg.model)
        self.dims = ModelDims.from_config(self.model.config)
        cfg.planner.projections(self.dims)  # a projection this model lacks: refuse to start, not at registration
        self.shape = StepShape(cfg.batch_size, cfg.max_len)
        self.lock = threading.Lock()
        self.targets = all_targets(self.model)
        self.base = {t: lora_layer(self.model, t).weight_slice(t.proj).detach().clone() for t in self.targets}
        deltas = store.load_tensors(DELTAS) or {}
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
    def _plan(self, budget: Budget, speed: float | None, device: MeasuredDevice | None) -> Plan:
        # A device given a relative speed takes at most its share of its pipeline's compute, the
        # server counting as two of the weakest devices per client (as in the simulation).
        share = speed / (speed + 2.0) if speed else None
        return plan_device(self.dims, self.importance, budget, self.shape, self.cfg.planner, share, device)

    def _adopt(self, record: ClientRecord, plan: Plan) -> ServerClient:
        profile = record.profile
        client = ServerClient(record.id, record.number, record.examples, budget_of(profile),
                              profile.get("relative_speed"), plan, measured_device(profile, self.cfg.wire))
        self.clients[record.id] = client
        self._fresh_adapters(client, self.store.current_round())
        return client

    def plan_for(self, profile: dict) -> Plan:
        """The plan a device with this profile would get now (PlanError if none fits, ValueError if its
        measurements are malformed)."""
        device = measured_device(profile, self.cfg.wire)
        with self.lock:
            return self._plan(budget_of(profile), profile.get("relative_speed"), device)

    def add_client(self, record: ClientRecord, plan: Plan) -> None:
        with self.lock:
            self._adopt(record, plan)

    def _fresh_adapters(self, client: ServerClient, round_number: int) -> None:
        """The client's server-side adapters for a round: fresh, or (non-merging methods) where
        the last aggregation left them."""
        install_adapters(self.model, {})
        saved = None if self.merging else self.store.load_tensors(start_factors(client.id))
        if saved is not None:
            start = {t: ab for t, ab in tensors_to_factors(saved).items() if t.layer >= client.plan.split}
            client.factors = adapters_from_factors(self.model, start, self.cfg.alpha)
        else:
            ranks = server_ranks(self.dims, client.plan.split, self.importance, self.cfg.planner)
            client.factors = apply_lora(self.model, ranks, self.cfg.alpha,
                                        seed=(self.cfg.seed, client.number, round_number))
        client.optimizer = make_optimizer((p for f in client.factors.values() for p in f.parameters()), self.cfg.lr)
        client.scores, client.last_step, client.last_reply = {}, None, None

    def _segment(self, split: int) -> Segment:
        if split not in self.segments:
            self.segments[split] = Segment(self.model, split, self.dims.layers, embed=False, head=True)
        return self.segments[split]

    # ----- the split step ----------------------------------------------------------------------
    def step(self, client_id: str, round_number: int, step: int, h: torch.Tensor, mask: torch.Tensor,
             labels: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
        """Train client's server side on one batch: (dL/dh, loss, trained). A retry is answered again."""
        with self.lock:
            client = self.clients[client_id]
            if client.last_step == (round_number, step):
                grad, loss = client.last_reply
                return grad, loss, False
            install_adapters(self.model, client.factors)
            self.model.train()
            h = h.detach().requires_grad_(True)
            server = self._segment(client.plan.split)
            probe_targets = [t for t in self.targets if t.layer >= client.plan.split] if not client.scores else []
            with SensitivityProbe(self.model, probe_targets) as probe:
                loss = server.loss(h, mask, labels)
                loss.backward()
            if probe_targets:
                client.scores = resource_normalised(self.model, probe.scores)
            client.optimizer.step()
            client.optimizer.zero_grad(set_to_none=True)
            self.model.eval()
            client.last_step, client.last_reply = (round_number, step), (h.grad.detach(), loss.item())
            return h.grad.detach(), loss.item(), True

    def server_state(self, client_id: str) -> dict[str, torch.Tensor]:
        """The client's server-side adapters ('<t>.A', '<t>.B'), to persist with its upload."""
        with self.lock:
            out = {}
            for t, f in self.clients[client_id].factors.items():
                out[f"{t}.A"], out[f"{t}.B"] = f.A.detach().clone(), f.B.detach().clone()
            return out

    def restore_server_state(self, client_id: str, tensors: dict[str, torch.Tensor]) -> None:
        """Put back a client's server-side adapters exactly as persisted (their set and ranks too)."""
        with self.lock:
            client = self.clients[client_id]
            pairs = {Target.parse(k[:-2]): (tensors[k], tensors[k[:-2] + ".B"]) for k in tensors if k.endswith(".A")}
            client.factors = adapters_from_factors(self.model, pairs, self.cfg.alpha)

    # ----- aggregation -------------------------------------------------------------------------
    def aggregate(self, uploads: dict[str, dict[str, torch.Tensor]], device_scores: dict[str, dict[Target, float]],
                  round_number: int) -> dict[str, dict[str, torch.Tensor]]:
        """Aggregate one round (the uploading clients' device + server adapters).

        naa merges into the weights and re-plans everyone; the reply to each client holds, for
        each changed weight of its device blocks, the stacked factors to add ('<t>.A', '<t>.B',
        scale folded in), and for blocks a new plan moves onto the device the merged delta
        against the base checkpoint ('<t>.delta'). The other methods keep W frozen and a global
        adapter; the reply holds the factors the client's device adapters start the next round
        from ('<t>.A', '<t>.B' at its ranks, its alpha / r applies).
        """
        with self.lock:
            updates: dict[Target, list[ClientUpdate]] = {}
            for client_id, tensors in uploads.items():
                client = self.clients[client_id]
                for key in tensors:
                    if key.endswith(".A"):
                        t = Target.parse(key[:-2])
                        a, b = tensors[key], tensors[key[:-2] + ".B"]
                        updates.setdefault(t, []).append(
                            ClientUpdate(client_id, a, b, self.cfg.alpha / a.shape[0], float(client.examples)))
                for t, f in client.factors.items():
                    updates.setdefault(t, []).append(
                        ClientUpdate(client_id, f.A.detach(), f.B.detach(), f.scale, float(client.examples)))
            merged: dict[Target, LowRank] = {}
            starts: dict[str, dict[Target, tuple[torch.Tensor, torch.Tensor]]] = {cid: {} for cid in uploads}
            for t, ups in sorted(updates.items()):
                result = AGGREGATORS[self.cfg.method](ups)
                if self.merging:
                    merged[t] = result.global_update
                    lora_layer(self.model, t).add_to_weight(t.proj, merged[t].dense())
                else:
                    self.global_adapter[t] = result.global_update
                    for cid, ab in result.client_factors.items():
                        starts[cid][t] = ab
            self._update_importance(uploads, device_scores, round_number)
            replies = {}
            for client in self.clients.values():
                if self.merging:
                    old_split = client.plan.split
                    new = self._plan(client.budget, client.speed, client.device)
                    if should_replan(client.plan, new, False, self.cfg.planner, self.importance):
                        client.plan = new
                    replies[client.id] = self._update_payload(merged, old_split, client.plan.split)
                else:
                    # The client's own factors at its own ranks; plans stay (a new rank has no factors).
                    # A client that missed the round starts the next one where it started this one.
                    if client.id in starts:
                        self.store.save_tensors(start_factors(client.id), factors_to_tensors(starts[client.id]))
                    saved = tensors_to_factors(self.store.load_tensors(start_factors(client.id)) or {})
                    replies[client.id] = factors_to_tensors(
                        {t: ab for t, ab in saved.items() if t.layer < client.plan.split})
                self._fresh_adapters(client, round_number + 1)
            if self.merging:
                self.store.save_tensors(DELTAS, self.deltas())
            else:
                self.store.save_tensors(GLOBAL_ADAPTER, factors_to_tensors(
                    {t: (u.A, u.B) for t, u in self.global_adapter.items()}))
            self.store.save_tensors(IMPORTANCE, {str(t): torch.tensor(v, dtype=torch.float64)
                                                 for t, v in self.tracker.smoothed.items()})
            return replies

    def _update_importance(self, uploads, device_scores, round_number: int) -> None:
        """Average the round's scores over the clients (each scored its device and its server
        blocks) and fold them into the smoothed importance, as the simulation does."""
        rows = [{**device_scores.get(cid, {}), **self.clients[cid].scores} for cid in uploads]
        mean = mean_scores([r for r in rows if r])
        if mean:
            progress = (round_number - 1) / max(self.cfg.rounds - 1, 1)  # rounds count from 1
            self.importance = fill_unscored(self.tracker.update(mean, progress), self.targets)

    def _update_payload(self, merged: dict[Target, LowRank], old_split: int, new_split: int) -> dict[str, torch.Tensor]:
        out = {}
        for t, update in merged.items():
            if t.layer < old_split:
                out[f"{t}.A"], out[f"{t}.B"] = update.A, update.B
        for t in self.targets:
            if old_split <= t.layer < new_split:
                delta = lora_layer(self.model, t).weight_slice(t.proj).detach() - self.base[t]
                if delta.abs().max() > 0:
                    out[f"{t}.delta"] = delta
        return out

    def deltas(self) -> dict[str, torch.Tensor]:
        """Merged weights as deltas against the base checkpoint (only weights that changed)."""
        out = {}
        for t in self.targets:
            delta = lora_layer(self.model, t).weight_slice(t.proj).detach() - self.base[t]
            if delta.abs().max() > 0:
                out[str(t)] = delta.clone()
        return out
