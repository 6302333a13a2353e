"""Centralised LoRA fine-tuning (CenLoRA): all data in one place, the upper-bound baseline.

Also the shared evaluation every method reports: test loss / perplexity, generation on test
inputs and the E2E metrics.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hsplitlora.adapters import save_adapter, save_merged
from hsplitlora.configs import ALPHA_HELP, LR_HELP, SEED_HELP, option
from hsplitlora.data import (
    DATA_HELP,
    EvalItem,
    Example,
    batches,
    default_e2e_dir,
    endless_batches,
    eval_pairs,
    load_e2e_test,
    load_examples,
)
from hsplitlora.family import num_layers
from hsplitlora.generate import generate
from hsplitlora.lora import apply_lora, parse_ranks
from hsplitlora.metrics import e2e_scores, perplexity
from hsplitlora.models import DEFAULT_MODEL, MODEL_HELP, load_model
from hsplitlora.report import jsonable
from hsplitlora.split import whole_model
from hsplitlora.train import make_optimizer, mean_loss

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """What the evaluation covers; small defaults keep a CPU run in minutes."""

    loss_items: int = option(20, flag="--eval-items", help="test inputs whose references give the test loss")
    generate_items: int = option(40, help="test inputs generated and scored with the E2E metrics")
    max_new_tokens: int = option(64, help="most tokens generated per test input")
    batch_size: int = option(16, flag="--eval-batch-size", help="test inputs per evaluation batch")
    coco: bool = option(True, help="METEOR, ROUGE-L and CIDEr too (Java, about 20 s to start)")


@dataclass
class FinetuneConfig:
    """A centralised LoRA fine-tune (`hsplitlora finetune`)."""

    model: str = option(DEFAULT_MODEL, help=MODEL_HELP)
    data: Path = option(default_factory=default_e2e_dir, help=DATA_HELP)
    ranks: str = option("q=8,v=8", help="LoRA ranks: 'q=8,v=8' for every layer, '0-3:up=16', '5.down=4'; "
                                         "comma-separated, later items win")
    alpha: float = option(16.0, help=ALPHA_HELP)
    steps: int = option(60, help="optimizer steps")
    batch_size: int = option(8, help="examples per step")
    lr: float = option(1e-3, help=LR_HELP)
    max_len: int = option(160, help="max tokens per example")
    seed: int = option(0, help=SEED_HELP)
    adapter_out: Path | None = option(None, flag="--save-adapter", help="write the trained adapter here (PEFT format)")
    merged_out: Path | None = option(None, flag="--save-merged", help="write a merged model directory here")
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")


@dataclass
class Evaluation:
    """Test loss, perplexity, metrics and the generated texts of one evaluation."""

    loss: float
    ppl: float
    scores: dict[str, float]
    outputs: list[str]

    def summary(self) -> dict:
        return {"loss": self.loss, "ppl": self.ppl, **self.scores}


def split_eval(data: Path, train: list[Example], seed: int) -> tuple[list[Example], list[EvalItem]]:
    """(training examples, evaluation items): E2E's test set, or 10 % held out of a JSONL file."""
    if data.is_dir():
        return train, load_e2e_test(data)
    held_idx = set(random.Random(seed).sample(range(len(train)), max(1, len(train) // 10)))
    items = [EvalItem(train[i].prompt, (train[i].completion.strip(),)) for i in sorted(held_idx)]
    return [ex for i, ex in enumerate(train) if i not in held_idx], items


def spread(items: Sequence, n: int) -> list:
    """n items evenly spread over the sequence (a fixed, representative subset)."""
    if n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def evaluate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: Sequence[EvalItem], cfg: EvalConfig,
    max_len: int,
) -> Evaluation:
    """Test loss over the references of `cfg.loss_items` inputs, then generation + E2E metrics."""
    loss_pairs = eval_pairs(spread(items, cfg.loss_items))
    loss = mean_loss(whole_model(model), batches(tokenizer, loss_pairs, cfg.batch_size, max_len))
    gen_items = spread(items, cfg.generate_items)
    outputs = generate(model, tokenizer, [it.prompt for it in gen_items], cfg.max_new_tokens, cfg.batch_size)
    scores = e2e_scores(outputs, [list(it.references) for it in gen_items], coco=cfg.coco) if gen_items else {}
    return Evaluation(loss, perplexity(loss), scores, outputs)


def finetune(cfg: FinetuneConfig) -> dict:
    """Run the fine-tune and return a report (before/after evaluation, losses, timings)."""
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model)
    train, items = split_eval(Path(cfg.data), load_examples(cfg.data), cfg.seed)
    ranks = parse_ranks(cfg.ranks, num_layers(model))
    log.info("model %s, %d training examples, %d evaluation inputs, %d adapted weights",
             cfg.model, len(train), len(items), len(ranks))

    before = evaluate(model, tokenizer, items, cfg.eval, cfg.max_len)
    log.info("before: test loss %.3f, %s", before.loss, _fmt(before.scores))

    apply_lora(model, ranks, cfg.alpha)
    opt = make_optimizer(model.parameters(), cfg.lr)
    net = whole_model(model)
    model.train()
    losses = []
    start = time.perf_counter()
    stream = endless_batches(tokenizer, train, cfg.batch_size, cfg.max_len, seed=cfg.seed)
    with tqdm(range(cfg.steps), desc="fine-tuning", unit="step") as bar:
        for _ in bar:
            batch = next(stream)
            loss = net.loss(batch.input_ids, batch.attention_mask, batch.labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    train_seconds = time.perf_counter() - start
    model.eval()

    after = evaluate(model, tokenizer, items, cfg.eval, cfg.max_len)
    log.info("after: test loss %.3f, %s", after.loss, _fmt(after.scores))
    if cfg.adapter_out:
        save_adapter(model, cfg.adapter_out)
    if cfg.merged_out:
        save_merged(model, tokenizer, cfg.merged_out)
    gen_items = spread(items, cfg.eval.generate_items)
    return {
        "config": jsonable(asdict(cfg)),
        "before": before.summary(),
        "after": after.summary(),
        "train_losses": losses,
        "train_seconds": train_seconds,
        "samples": [
            {"prompt": it.prompt, "before": b, "after": a, "reference": it.references[0]}
            for it, b, a in zip(gen_items, before.outputs, after.outputs)
        ],
    }


def _fmt(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in scores.items()) or "no metrics"
