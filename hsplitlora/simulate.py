"""The whole federation in one process: HSplitLoRA and its baselines on one machine, same data.

One frozen base model serves every client; each client owns its adapter modules (device side and
server side of its cut) and its optimizer, swapped in for its steps. A split step is run as on two
machines: the device segment's output is detached, the server segment computes the loss and the
gradient at the cut, and the device backpropagates that gradient.

Each method is a strategy (`hsplitlora.federation.strategies`: hsplitlora, splitlora, hetlora,
flexlora, cenlora) and a round ends in `hsplitlora.federation.round.close_round`, as on the server.
A centralised strategy (cenlora) trains one client on all the data, as many steps as all clients.
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
from hsplitlora.aggregation import LowRank
from hsplitlora.configs import ALPHA_HELP, LR_HELP, SEED_HELP, option
from hsplitlora.cost import ModelDims, StepShape, device_memory
from hsplitlora.data import (
    DATA_HELP,
    Batch,
    Example,
    batches,
    default_e2e_dir,
    endless_batches,
    load_examples,
    shard,
)
from hsplitlora.federation.protocol import DEFAULT_BATCH_SIZE, DEFAULT_MAX_LEN
from hsplitlora.federation.round import Contribution, close_round, run_progress
from hsplitlora.federation.strategies import METHODS, SERVER_SPEED, Participant, PlanContext, Strategy, strategy
from hsplitlora.finetune import EvalConfig, evaluate, split_eval, spread
from hsplitlora.importance import ImportanceTracker, SensitivityProbe, all_targets, resource_normalised
from hsplitlora.lora import (
    LoRAFactors,
    Target,
    adapters_from_factors,
    apply_lora,
    install_adapters,
    lora_layer,
)
from hsplitlora.metrics import perplexity
from hsplitlora.models import DEFAULT_MODEL, MODEL_HELP, load_model
from hsplitlora.planner import Budget, Plan, PlannerConfig, minimum_budget, uniform_importance
from hsplitlora.report import jsonable
from hsplitlora.split import Segment, split_model, whole_model
from hsplitlora.train import make_optimizer, mean_loss

log = logging.getLogger(__name__)


@dataclass
class FederationConfig:
    """A federation's model, data and size (what the simulation and `hsplitlora demo` share)."""

    model: str = option(DEFAULT_MODEL, help=MODEL_HELP)
    data: Path = option(default_factory=default_e2e_dir, help=DATA_HELP)
    clients: int = option(5, help="number of clients (devices)")
    rounds: int = option(3, help="aggregation rounds")
    local_steps: int = option(4, help="local steps per client per round")
    batch_size: int = option(DEFAULT_BATCH_SIZE, help="examples per step")
    max_len: int = option(DEFAULT_MAX_LEN, help="max tokens per example")
    budget_spread: float = option(4.0, help="strongest / weakest device memory budget, as in the paper's setting")
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        for name in ("clients", "rounds", "local_steps", "batch_size", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.budget_spread < 1:
            raise ValueError(f"--budget-spread must be >= 1, got {self.budget_spread}")


@dataclass
class SimConfig(FederationConfig):
    """One simulated federation (`hsplitlora simulate`)."""

    method: str = option("hsplitlora", choices=METHODS,
                         help="hsplitlora (ours), splitlora, hetlora, flexlora, or cenlora (centralised upper bound)")
    lr: float = option(1e-3, help=LR_HELP)
    alpha: float = option(16.0, help=ALPHA_HELP)
    seed: int = option(0, help=SEED_HELP)
    iid: bool = option(False, help="IID shards (off: non-IID, by restaurant)")
    device_scores: bool = option(True, help="devices score their blocks' importance (off: as with exported segments)")
    server_speed: float = option(SERVER_SPEED, help="the server's compute per client, relative to the weakest device")
    val_pairs: int = option(32, help="held-out dev pairs for the per-round validation perplexity")
    planner: PlannerConfig = field(default_factory=PlannerConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.strategy()  # an unknown method is refused here

    def strategy(self) -> Strategy:
        return strategy(self.method)


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
        self.strategy = cfg.strategy()
        torch.manual_seed(cfg.seed)
        self.model, self.tokenizer = load_model(cfg.model)
        self.dims = ModelDims.from_config(self.model.config)
        self.shape = StepShape(cfg.batch_size, cfg.max_len)
        self.targets = all_targets(self.model)
        pool, self.test_items = split_eval(Path(cfg.data), load_examples(cfg.data), cfg.seed)
        train, self.val = self._hold_out(pool)
        n_shards = cfg.clients if self.strategy.federated else 1
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
        # A centralised run's one client sees as many batches per round as all federated clients together.
        self.local_steps = cfg.local_steps * (1 if self.strategy.federated else cfg.clients)
        self.global_factors: dict[Target, LowRank] = {}  # non-merging strategies: the global adapter
        self.bytes_up = self.bytes_down = 0
        self.round = 1  # the round being trained, numbered as the server does; seeds fresh adapters

    def _hold_out(self, pool: list[Example]) -> tuple[list[Example], list[Example]]:
        # Validation pairs come from whole MRs spread over the pool, so no MR is both trained and validated.
        prompts = sorted({ex.prompt for ex in pool})
        held = set(prompts[:: max(len(prompts) // 20, 1)][:max(self.cfg.val_pairs, 1)])
        val = [ex for ex in pool if ex.prompt in held][: self.cfg.val_pairs]
        return [ex for ex in pool if ex.prompt not in held], val

    # ----- plans -------------------------------------------------------------------------------
    def _context(self) -> PlanContext:
        return PlanContext(self.dims, self.shape, self.cfg.planner, self.importance,
                           [c.budget for c in self.clients], self.cfg.server_speed)

    def _reset_adapters(self, client: SimClient, start: dict[Target, tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        """The client's plan for the next round (the strategy's), fresh adapters at its ranks (or
        given starting factors) and a fresh optimizer."""
        ctx = self._context()
        client.plan = self.strategy.next_plan(ctx, Participant(client.index, client.budget, client.speed,
                                                               plan=client.plan))
        client.split = None if self.strategy.whole_model else client.plan.split
        install_adapters(self.model, {})
        if start is not None:
            client.factors = adapters_from_factors(self.model, start, self.cfg.alpha)
        else:
            ranks = {**client.plan.ranks, **self.strategy.server_ranks(ctx, client.plan.split)}
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

    def _end_round(self, completed: int, scores: dict[str, dict[Target, float]]) -> None:
        """Close the round (`hsplitlora.federation.round`), count its adapter traffic, then give every
        client its next plan and adapters."""
        contributions = [
            Contribution(c.name, len(c.data), {t: (f.A.detach(), f.B.detach(), f.scale) for t, f in c.factors.items()},
                         scores.get(c.name, {}))
            for c in self.clients
        ]
        result = close_round(self.strategy, self.model, contributions, self.tracker, self.targets,
                             run_progress(completed, self.cfg.rounds))
        if result.importance is not None:
            self.importance = result.importance
            log.info("round %d: most important weights %s", completed,
                     ", ".join(f"{t} {self.importance[t]:.3g}" for t in self.tracker.ranking()[:5]))
        by_name = {c.name: c for c in self.clients}
        for t, ups in result.updates.items():
            self.bytes_up += sum((u.A.numel() + u.B.numel()) * 4 for u in ups if self._device_side(by_name[u.client], t))
        for t, update in result.merged.items():
            # Every device holding W gets the update, as factors while they are the smaller form.
            size = update.numel if update.cheaper_than_dense() else update.B.shape[0] * update.A.shape[1]
            self.bytes_down += size * 4 * sum(1 for c in self.clients if self._device_side(c, t))
        self.global_factors.update(result.global_adapter)
        for name, starts in result.starts.items():
            self.bytes_down += sum((a.numel() + b.numel()) * 4 for t, (a, b) in starts.items()
                                   if self._device_side(by_name[name], t))
        for c in self.clients:
            self._reset_adapters(c, None if self.strategy.merges else result.starts[c.name])

    @staticmethod
    def _device_side(client: SimClient, target: Target) -> bool:
        return client.split is None or target.layer < client.split

    # ----- evaluation --------------------------------------------------------------------------
    def _install_global(self) -> None:
        """The global model: W (merged) alone, W + the global adapter of a non-merging strategy, or
        the one client's adapters of a centralised run."""
        if not self.strategy.federated:
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
        probe = self.targets if self.strategy.scores_importance else None
        for r in range(cfg.rounds):
            start = time.perf_counter()
            up0, down0 = self.bytes_up, self.bytes_down
            losses, scores = [], {}
            with tqdm(self.clients, desc=f"round {r + 1}/{cfg.rounds}", unit="client", leave=False) as bar:
                for c in bar:
                    client_losses, client_scores = self._local_round(c, probe)
                    losses += client_losses
                    if client_scores:
                        scores[c.name] = resource_normalised(self.model, client_scores)
                    bar.set_postfix(client=c.name, loss=f"{client_losses[-1]:.3f}")
            self.round += 1
            if self.strategy.federated:
                self._end_round(r + 1, scores)
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
        if not self.strategy.merges:  # the global model is W + a low-rank adapter: exact
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
    if adapter_dir and fed.strategy.merges:
        initial = {t: lora_layer(fed.model, t).weight_slice(t.proj).detach().clone() for t in all_targets(fed.model)}
    results = fed.run()
    fed.save(merged_dir, adapter_dir, adapter_rank, initial)
    return results
