"""The whole federation in one process: HSplitLoRA and its baselines on one machine, same data.

One frozen base model serves every client; each client owns its adapter modules (device side and
server side of its cut) and its optimizer, swapped in for its steps. A split step is run as on two
machines: the device segment's output is detached, the server segment computes the loss and the
gradient at the cut, and the device backpropagates that gradient.

Methods:
- hsplitlora: per-client split + ranks from importance and budget (planner), the client's own
  server-side adapters, noise-free aggregation (naa) every round, merge + re-init, re-plan.
- splitlora: one split and one rank for all (the largest the weakest client fits), q/v, fedavg.
- hetlora / flexlora: federated LoRA (each client the whole model), q/v, per-client ranks by budget.
- cenlora: all data in one place, one LoRA on q/v (the upper bound), as many steps as all clients.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from hsplitlora.adapters import save_adapter, save_merged
from hsplitlora.aggregation import AGGREGATORS, ClientUpdate, LowRank
from hsplitlora.cost import ModelDims, StepShape, device_memory
from hsplitlora.data import (
    Batch,
    Example,
    batches,
    default_e2e_dir,
    endless_batches,
    load_examples,
    shard,
)
from hsplitlora.finetune import EvalConfig, evaluate, split_eval, spread
from hsplitlora.importance import (
    ImportanceTracker,
    SensitivityProbe,
    all_targets,
    fill_unscored,
    mean_scores,
    resource_normalised,
)
from hsplitlora.lora import (
    LoRAFactors,
    Target,
    adapters_from_factors,
    apply_lora,
    install_adapters,
    lora_layer,
)
from hsplitlora.metrics import perplexity
from hsplitlora.models import DEFAULT_MODEL, load_model
from hsplitlora.planner import (
    Budget,
    Plan,
    PlannerConfig,
    minimum_budget,
    plan_device,
    server_ranks,
    should_replan,
    uniform_importance,
)
from hsplitlora.report import jsonable
from hsplitlora.split import Segment, split_model, whole_model
from hsplitlora.train import make_optimizer, mean_loss

log = logging.getLogger(__name__)

METHODS = ("hsplitlora", "splitlora", "hetlora", "flexlora", "cenlora")
AGGREGATOR_OF = {"hsplitlora": "naa", "splitlora": "fedavg", "hetlora": "hetlora", "flexlora": "flexlora"}
BASELINE_PROJECTIONS = ("q", "v")  # where SplitLoRA's code puts LoRA


@dataclass
class SimConfig:
    """One simulated federation (`hsplitlora simulate`)."""

    method: str = "hsplitlora"
    model: str = DEFAULT_MODEL
    data: Path = field(default_factory=default_e2e_dir)
    clients: int = 5
    rounds: int = 3
    local_steps: int = 4
    batch_size: int = 4
    max_len: int = 128
    lr: float = 1e-3
    alpha: float = 16.0
    seed: int = 0
    iid: bool = False
    device_scores: bool = True  # devices score their blocks' importance (not when they run exported segments)
    budget_spread: float = 4.0  # strongest / weakest device budget, as in the paper's setting
    server_speed: float = 2.0  # the server's compute per client, relative to the weakest device
    baseline_rank: int = 8  # cenlora's rank
    val_pairs: int = 32  # held-out dev pairs for the per-round validation PPL
    eval: EvalConfig = field(default_factory=EvalConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("clients", "rounds", "local_steps", "batch_size", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.budget_spread < 1:
            raise ValueError(f"--budget-spread must be >= 1, got {self.budget_spread}")


@dataclass
class SimClient:
    """A simulated device with its data, budget, plan and its own adapters + optimizer."""

    name: str
    index: int  # registration order; seeds the client's data order and adapter initialisation
    data: list[Example]
    budget: Budget
    speed: float  # relative compute speed (1 = the weakest)
    stream: Iterator[Batch]
    split: int | None = None  # None: the whole model runs on the device (federated LoRA)
    plan: Plan | None = None
    factors: dict[Target, LoRAFactors] = field(default_factory=dict)
    optimizer: torch.optim.Optimizer | None = None


def device_budgets(dims: ModelDims, shape: StepShape, k: int, spread: float, cfg: PlannerConfig) -> list[Budget]:
    """k memory budgets evenly spread from 1.5x the smallest workable one to `spread` times that."""
    low = 1.5 * minimum_budget(dims, shape, cfg).memory_bytes
    return [Budget(low * (1 + (spread - 1) * i / max(k - 1, 1))) for i in range(k)]


class Federation:
    """State and steps of one simulated run; `run()` returns the results dict."""

    def __init__(self, cfg: SimConfig):
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.model, self.tokenizer = load_model(cfg.model)
        self.dims = ModelDims.from_config(self.model.config)
        self.shape = StepShape(cfg.batch_size, cfg.max_len)
        pool, self.test_items = split_eval(Path(cfg.data), load_examples(cfg.data), cfg.seed)
        train, self.val = self._hold_out(pool)
        n_shards = 1 if cfg.method == "cenlora" else cfg.clients
        shards = shard(train, n_shards, iid=cfg.iid or n_shards == 1, seed=cfg.seed)
        budgets = device_budgets(self.dims, self.shape, n_shards, cfg.budget_spread, cfg.planner)
        self.clients = [
            SimClient(f"client{i}", i, s, budgets[i], speed=budgets[i].memory_bytes / budgets[0].memory_bytes,
                      stream=endless_batches(self.tokenizer, s, cfg.batch_size, cfg.max_len, seed=cfg.seed + i))
            for i, s in enumerate(shards)
        ]
        self.tracker = ImportanceTracker()
        self.importance = uniform_importance(self.dims, cfg.planner)
        self.segments: dict[int, tuple[Segment, Segment]] = {}
        # cenlora's one client sees as many batches per round as all federated clients together.
        self.local_steps = cfg.local_steps * (cfg.clients if cfg.method == "cenlora" else 1)
        self.global_factors: dict[Target, LowRank] = {}  # non-merging methods: the global adapter
        self.bytes_up = self.bytes_down = 0
        self.round = 1  # the round being trained, numbered as the server does; seeds fresh adapters

    def _hold_out(self, pool: list[Example]) -> tuple[list[Example], list[Example]]:
        # Validation pairs come from whole MRs spread over the pool, so no MR is both trained and validated.
        prompts = sorted({ex.prompt for ex in pool})
        held = set(prompts[:: max(len(prompts) // 20, 1)][:max(self.cfg.val_pairs, 1)])
        val = [ex for ex in pool if ex.prompt in held][: self.cfg.val_pairs]
        return [ex for ex in pool if ex.prompt not in held], val

    # ----- plans -------------------------------------------------------------------------------
    def _ranks_for(self, client: SimClient) -> dict[Target, int]:
        cfg, m = self.cfg, self.cfg.method
        n = self.dims.layers
        if m == "hsplitlora":
            # The device takes at most its share of this client's pipeline compute (device + server).
            compute_share = client.speed / (client.speed + cfg.server_speed)
            new = plan_device(self.dims, self.importance, client.budget, self.shape, cfg.planner, compute_share)
            if client.plan is None or should_replan(client.plan, new, False, cfg.planner, self.importance):
                client.plan = new
            client.split = client.plan.split
            return {**client.plan.ranks, **server_ranks(self.dims, client.split, self.importance, cfg.planner)}
        if m == "splitlora":
            client.split, rank = self._common_split_and_rank()
            return {Target(i, p): rank for i in range(n) for p in BASELINE_PROJECTIONS}
        if m == "cenlora":
            return {Target(i, p): cfg.baseline_rank for i in range(n) for p in BASELINE_PROJECTIONS}
        # hetlora / flexlora: ranks by budget tier, weakest -> smallest rank of Q.
        order = sorted(range(len(self.clients)), key=lambda i: self.clients[i].budget.memory_bytes)
        tier = order.index(self.clients.index(client))
        q = cfg.planner.rank_set
        rank = q[min(tier * len(q) // len(self.clients), len(q) - 1)]
        return {Target(i, p): rank for i in range(n) for p in BASELINE_PROJECTIONS}

    def _common_split_and_rank(self) -> tuple[int, int]:
        """SplitLoRA: the deepest split and the largest rank that the weakest client fits."""
        weakest = min(self.clients, key=lambda c: c.budget.memory_bytes)
        for split in range(self.dims.layers - 1, 0, -1):
            for rank in reversed(self.cfg.planner.rank_set):
                ranks = {Target(i, p): rank for i in range(split) for p in BASELINE_PROJECTIONS}
                if device_memory(self.dims, split, ranks, self.shape).total <= weakest.budget.memory_bytes:
                    return split, rank
        raise ValueError("the weakest client fits no split")

    def _reset_adapters(self, client: SimClient, start: dict[Target, tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        """Fresh adapters at the client's ranks (or given starting factors) and a fresh optimizer."""
        ranks = self._ranks_for(client)
        install_adapters(self.model, {})
        if start is not None:
            client.factors = adapters_from_factors(self.model, start, self.cfg.alpha)
        else:
            client.factors = apply_lora(self.model, ranks, self.cfg.alpha,
                                        seed=(self.cfg.seed, client.index, self.round))
        client.optimizer = make_optimizer((p for f in client.factors.values() for p in f.parameters()), self.cfg.lr)

    # ----- training ----------------------------------------------------------------------------
    def _segments(self, split: int) -> tuple[Segment, Segment]:
        if split not in self.segments:
            self.segments[split] = split_model(self.model, split)
        return self.segments[split]

    def _step(self, client: SimClient, batch: Batch) -> float:
        """One local step; a split step when the client has a cut."""
        if client.split is None:
            loss = whole_model(self.model).loss(batch.input_ids, batch.attention_mask, batch.labels)
            loss.backward()
        else:
            device, server = self._segments(client.split)
            h = device(batch.input_ids, batch.attention_mask)
            sent = h.detach().requires_grad_(True)  # what crosses the network, fp32 here
            loss = server.loss(sent, batch.attention_mask, batch.labels)
            loss.backward()
            h.backward(sent.grad)
            self.bytes_up += sent.numel() * 4 + batch.attention_mask.numel() + batch.labels.numel() * 8
            self.bytes_down += sent.grad.numel() * 4
        client.optimizer.step()
        client.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def _local_round(self, client: SimClient, probe_targets: list[Target] | None) -> tuple[list[float], dict]:
        install_adapters(self.model, client.factors)
        self.model.train()
        losses, scores = [], {}
        for step in range(self.local_steps):
            batch = next(client.stream)
            if step == 0 and probe_targets:
                # Importance rides on the round's first real step: only the weight-gradient matmuls are extra.
                with SensitivityProbe(self.model, probe_targets) as probe:
                    losses.append(self._step(client, batch))
                scores = probe.scores
                if not self.cfg.device_scores and client.split is not None:
                    scores = {t: v for t, v in scores.items() if t.layer >= client.split}
            else:
                losses.append(self._step(client, batch))
        self.model.eval()
        return losses, scores

    def _aggregate(self) -> None:
        """One aggregation over every adapted weight, then each client's next adapters."""
        aggregate = AGGREGATORS[AGGREGATOR_OF[self.cfg.method]]
        merged = self.cfg.method == "hsplitlora"
        targets = sorted({t for c in self.clients for t in c.factors})
        per_client: dict[str, dict[Target, tuple[torch.Tensor, torch.Tensor]]] = {c.name: {} for c in self.clients}
        for target in targets:
            updates = [
                ClientUpdate(c.name, c.factors[target].A.detach(), c.factors[target].B.detach(),
                             c.factors[target].scale, float(len(c.data)))
                for c in self.clients if target in c.factors
            ]
            self.bytes_up += sum((u.A.numel() + u.B.numel()) * 4 for u in updates if self._device_side(u, target))
            result = aggregate(updates)
            if merged:
                update = result.global_update
                lora_layer(self.model, target).add_to_weight(target.proj, update.dense())
                # Every device holding W gets the update, as factors while they are the smaller form.
                size = update.numel if update.cheaper_than_dense() else update.B.shape[0] * update.A.shape[1]
                self.bytes_down += size * 4 * sum(1 for c in self.clients if self._device_side(c.name, target))
            else:
                self.global_factors[target] = result.global_update
                for name, ab in result.client_factors.items():
                    per_client[name][target] = ab
                    self.bytes_down += (ab[0].numel() + ab[1].numel()) * 4 if self._device_side(name, target) else 0
        for c in self.clients:
            self._reset_adapters(c, None if merged else per_client[c.name])

    def _device_side(self, who, target: Target) -> bool:
        name = who.client if isinstance(who, ClientUpdate) else who
        client = next(c for c in self.clients if c.name == name)
        return client.split is None or target.layer < client.split

    # ----- evaluation --------------------------------------------------------------------------
    def _install_global(self) -> None:
        """The global model: W (merged) alone, or W + the global adapter of a non-merging method."""
        if self.cfg.method == "cenlora":
            install_adapters(self.model, self.clients[0].factors)
            return
        install_adapters(self.model, adapters_from_factors(
            self.model, {t: (u.A, u.B) for t, u in self.global_factors.items()}))

    def validation_loss(self) -> float:
        self._install_global()
        return mean_loss(whole_model(self.model), batches(self.tokenizer, self.val, self.cfg.batch_size * 4,
                                                          self.cfg.max_len))

    def run(self) -> dict:
        cfg = self.cfg
        log.info("%s: %d client(s), %d rounds x %d local steps, model %s", cfg.method, len(self.clients),
                 cfg.rounds, cfg.local_steps, cfg.model)
        self._install_global()
        before = evaluate(self.model, self.tokenizer, self.test_items, cfg.eval, cfg.max_len)
        for c in self.clients:
            self._reset_adapters(c, None)
        plans = [self._plan_row(c) for c in self.clients]
        rounds = []
        probe = all_targets(self.model) if cfg.method == "hsplitlora" else None
        for r in range(cfg.rounds):
            start = time.perf_counter()
            up0, down0 = self.bytes_up, self.bytes_down
            losses, scores = [], []
            with tqdm(self.clients, desc=f"round {r + 1}/{cfg.rounds}", unit="client", leave=False) as bar:
                for c in bar:
                    client_losses, client_scores = self._local_round(c, probe)
                    losses += client_losses
                    if client_scores:
                        scores.append(resource_normalised(self.model, client_scores))
                    bar.set_postfix(client=c.name, loss=f"{client_losses[-1]:.3f}")
            if scores:
                mean = mean_scores(scores)
                smoothed = self.tracker.update(mean, progress=r / max(cfg.rounds - 1, 1))
                self.importance = fill_unscored(smoothed, all_targets(self.model))
                log.info("round %d: most important weights %s", r + 1,
                         ", ".join(f"{t} {self.importance[t]:.3g}" for t in self.tracker.ranking()[:5]))
            self.round += 1
            if cfg.method != "cenlora":
                self._aggregate()
            val = self.validation_loss()
            row = {
                "round": r + 1, "train_loss": sum(losses) / len(losses), "val_loss": val, "val_ppl": perplexity(val),
                "seconds": time.perf_counter() - start, "bytes_up": self.bytes_up - up0,
                "bytes_down": self.bytes_down - down0,
                "importance": {str(t): v for t, v in sorted(self.importance.items())} if scores else {},
            }
            rounds.append(row)
            log.info("round %d: train loss %.3f, validation PPL %.2f, %.0f s, %.1f MB up, %.1f MB down", r + 1,
                     row["train_loss"], row["val_ppl"], row["seconds"], row["bytes_up"] / 1e6, row["bytes_down"] / 1e6)
        self._install_global()
        after = evaluate(self.model, self.tokenizer, self.test_items, cfg.eval, cfg.max_len)
        return {
            "method": cfg.method,
            "config": jsonable(asdict(cfg)),
            "plans": plans,
            "final_plans": [self._plan_row(c) for c in self.clients],
            "rounds": rounds,
            "before": before.summary(),
            "test": after.summary(),
            "top_importance": [str(t) for t in self.tracker.ranking()[:10]],
            "samples": [
                {"prompt": it.prompt, "before": b, "after": a, "reference": it.references[0]}
                for it, b, a in zip(spread(self.test_items, cfg.eval.generate_items), before.outputs, after.outputs)
            ],
        }

    def _plan_row(self, c: SimClient) -> dict:
        device_ranks = {t: f.rank for t, f in c.factors.items() if c.split is None or t.layer < c.split}
        split = c.split if c.split is not None else self.dims.layers
        return {
            "client": c.name, "examples": len(c.data), "budget_mb": c.budget.memory_bytes / 2**20,
            "split": c.split, "device_adapters": len(device_ranks),
            "device_rank_sum": sum(device_ranks.values()),
            "server_adapters": len(c.factors) - len(device_ranks),
            "predicted_memory_mb": device_memory(self.dims, split, device_ranks, self.shape).total / 2**20
            if c.split is not None else None,
        }

    def save(self, merged_dir: Path | None, adapter_dir: Path | None, adapter_rank: int,
             initial: dict[Target, torch.Tensor] | None) -> None:
        """Write the global model merged, and/or as a PEFT adapter (exact, or an SVD at a rank)."""
        self._install_global()
        if merged_dir:
            save_merged(self.model, self.tokenizer, merged_dir)
        if not adapter_dir:
            return
        if self.cfg.method != "hsplitlora":  # the global model is W + a low-rank adapter: exact
            save_adapter(self.model, adapter_dir)
            return
        # Merging methods: the adapter is an SVD of the total update W_now - W_start.
        factors, err_num, err_den = {}, 0.0, 0.0
        for t, w0 in initial.items():
            delta = lora_layer(self.model, t).weight_slice(t.proj).detach() - w0
            if delta.abs().max() == 0:
                continue
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            r = min(adapter_rank, s.shape[0])
            err_num += float(s[r:].square().sum())
            err_den += float(s.square().sum())
            factors[t] = (vh[:r], u[:, :r] * s[:r])
        base = copy.deepcopy(self.model)  # the adapter applies to the starting weights
        for t, w0 in initial.items():
            with torch.no_grad():
                lora_layer(base, t).weight_slice(t.proj).copy_(w0)
        install_adapters(base, adapters_from_factors(base, factors))
        save_adapter(base, adapter_dir, base_model_name_or_path=self.model.name_or_path)
        rel = math.sqrt(err_num / err_den) if err_den else 0.0
        Path(adapter_dir, "README.md").write_text(
            f"# Adapter from an hsplitlora run ({self.cfg.method})\n\nThe run merged its updates into the "
            f"weights; this adapter is a rank-{adapter_rank} SVD of the total update of each weight.\n"
            f"Relative Frobenius error of that approximation over all weights: {rel:.4g}.\n")


def simulate(cfg: SimConfig, merged_dir: Path | None = None, adapter_dir: Path | None = None,
             adapter_rank: int = 16) -> dict:
    """Run one simulated federation and return its results (see `Federation.run`)."""
    fed = Federation(cfg)
    initial = None
    if adapter_dir and cfg.method == "hsplitlora":
        initial = {t: lora_layer(fed.model, t).weight_slice(t.proj).detach().clone() for t in all_targets(fed.model)}
    results = fed.run()
    fed.save(merged_dir, adapter_dir, adapter_rank, initial)
    return results
