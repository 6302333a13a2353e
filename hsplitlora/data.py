"""Training and evaluation data: E2E NLG, users' JSONL, client shards, tokenised batches.

Every example is a prompt and a completion; the loss covers the completion tokens only.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from transformers import PreTrainedTokenizerBase

E2E_PROMPT = "Meaning representation: {mr}\nDescription:"
MAX_FIELD_CHARS = 4000  # a longer MR or reference is a broken row, not a restaurant description
IGNORE = -100  # label value that cross-entropy skips


class DataError(ValueError):
    """Bad input data; the message names the file and the row."""


@dataclass(frozen=True)
class Example:
    """One training pair; `group` keys non-IID sharding (E2E: the restaurant name)."""

    prompt: str
    completion: str
    group: str = ""


@dataclass(frozen=True)
class EvalItem:
    """One evaluation input with all its references (E2E test MRs have 1-45 each)."""

    prompt: str
    references: tuple[str, ...]


DATA_HELP = 'an E2E directory (devset.csv, testset_w_refs.csv) or a JSONL file of {"prompt", "completion"} objects'


def default_e2e_dir() -> Path:
    """`$HSPLITLORA_E2E_DIR`, else `../shared/data/e2e` beside the repository."""
    env = os.environ.get("HSPLITLORA_E2E_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e"


def e2e_prompt(mr: str) -> str:
    return E2E_PROMPT.format(mr=mr)


def _restaurant(mr: str) -> str:
    match = re.search(r"name\[([^\]]*)\]", mr)
    return match[1] if match else ""


def _read_csv(path: Path, columns: Sequence[str]) -> list[tuple[int, list[str]]]:
    """Rows of the given columns as (1-based line-ish row number, values), checked."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: the file is empty")
        index = {name.strip().lower(): i for i, name in enumerate(header)}
        missing = [c for c in columns if c.lower() not in index]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)} (header: {header})")
        rows = []
        for row_number, row in enumerate(reader, start=2):
            if not row:
                continue
            values = []
            for column in columns:
                i = index[column.lower()]
                value = row[i].strip() if i < len(row) else ""
                if not value:
                    raise DataError(f"{path}, row {row_number}: empty {column!r}")
                if len(value) > MAX_FIELD_CHARS:
                    raise DataError(f"{path}, row {row_number}: {column!r} is {len(value)} characters long "
                                    f"(limit {MAX_FIELD_CHARS})")
                values.append(value)
            rows.append((row_number, values))
    if not rows:
        raise DataError(f"{path}: no data rows")
    return rows


def load_e2e_train(data_dir: str | Path) -> list[Example]:
    """E2E dev pairs (the training pool here: the official train split is not available)."""
    rows = _read_csv(Path(data_dir) / "devset.csv", ("mr", "ref"))
    return [Example(e2e_prompt(mr), " " + ref, _restaurant(mr)) for _, (mr, ref) in rows]


def load_e2e_test(data_dir: str | Path) -> list[EvalItem]:
    """E2E test MRs with all references grouped, in first-seen order (the official order)."""
    rows = _read_csv(Path(data_dir) / "testset_w_refs.csv", ("mr", "ref"))
    refs: dict[str, list[str]] = defaultdict(list)
    for _, (mr, ref) in rows:
        refs[mr].append(ref)
    return [EvalItem(e2e_prompt(mr), tuple(r)) for mr, r in refs.items()]


def eval_pairs(items: Iterable[EvalItem]) -> list[Example]:
    """Every (MR, reference) pair of evaluation items, for a test loss."""
    return [Example(item.prompt, " " + ref) for item in items for ref in item.references]


def load_jsonl(path: str | Path) -> list[Example]:
    """A user's data: one `{"prompt": ..., "completion": ...}` object per line (optional "group")."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    examples = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {line_number}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}, line {line_number}: expected a JSON object")
            for key in ("prompt", "completion"):
                value = obj.get(key)
                if not isinstance(value, str) or not value:
                    raise DataError(f"{path}, line {line_number}: {key!r} must be a non-empty string")
                if len(value) > MAX_FIELD_CHARS:
                    raise DataError(f"{path}, line {line_number}: {key!r} is {len(value)} characters long "
                                    f"(limit {MAX_FIELD_CHARS})")
            examples.append(Example(obj["prompt"], obj["completion"], str(obj.get("group", ""))))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def load_examples(source: str | Path) -> list[Example]:
    """Training examples from an E2E directory or a JSONL file."""
    source = Path(source)
    return load_e2e_train(source) if source.is_dir() else load_jsonl(source)


def shard(examples: Sequence[Example], k: int, *, iid: bool = True, seed: int = 0) -> list[list[Example]]:
    """Split examples into k client shards.

    IID: a seeded shuffle dealt round-robin. Non-IID: whole groups (E2E restaurants) go to one
    client each, largest first onto the currently smallest shard, so clients see different
    restaurants while their sizes stay close.
    """
    if k < 1:
        raise ValueError(f"need at least one shard, got {k}")
    if len(examples) < k:
        raise ValueError(f"{len(examples)} examples cannot fill {k} shards")
    rng = random.Random(seed)
    if iid:
        order = list(examples)
        rng.shuffle(order)
        return [order[i::k] for i in range(k)]
    groups: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        groups[ex.group].append(ex)
    if len(groups) < k:
        raise ValueError(f"non-IID sharding needs at least {k} groups, the data has {len(groups)}")
    shards: list[list[Example]] = [[] for _ in range(k)]
    for name in sorted(groups, key=lambda g: (-len(groups[g]), g)):
        min(shards, key=len).extend(groups[name])
    for s in shards:
        rng.shuffle(s)
    return shards


@dataclass
class Batch:
    """Right-padded token ids, attention mask and labels (IGNORE outside the completions)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def target_tokens(self) -> int:
        # Labels are compared shifted by one, so the first position never counts.
        return int((self.labels[:, 1:] != IGNORE).sum())


def encode(tokenizer: PreTrainedTokenizerBase, ex: Example, max_len: int) -> tuple[list[int], list[int]]:
    """(token ids, labels) of one example: prompt + completion + EOS, labels only on the completion.

    Examples longer than max_len are cut from the end of the completion (the prompt is kept whole).
    """
    prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
    completion = tokenizer(ex.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt) >= max_len:
        raise DataError(f"a prompt of {len(prompt)} tokens does not fit max_len={max_len}: {ex.prompt[:80]!r}")
    ids = (prompt + completion)[:max_len]
    labels = ([IGNORE] * len(prompt) + completion)[:max_len]
    return ids, labels


def collate(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_len: int) -> Batch:
    """Tokenise and right-pad a list of examples into one batch."""
    encoded = [encode(tokenizer, ex, max_len) for ex in examples]
    width = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return Batch(input_ids, mask, labels)


def pad_batch(batch: Batch, batch_size: int, seq: int, pad_id: int) -> Batch:
    """A batch right-padded to exactly batch_size x seq (whole padding rows: mask 0, labels ignored),
    for runtimes whose shapes are fixed at export."""
    b, t = batch.input_ids.shape
    if b > batch_size or t > seq:
        raise ValueError(f"a {b} x {t} batch does not fit the fixed shape {batch_size} x {seq}")
    input_ids = torch.full((batch_size, seq), pad_id, dtype=torch.long)
    mask = torch.zeros((batch_size, seq), dtype=torch.long)
    labels = torch.full((batch_size, seq), IGNORE, dtype=torch.long)
    input_ids[:b, :t], mask[:b, :t], labels[:b, :t] = batch.input_ids, batch.attention_mask, batch.labels
    return Batch(input_ids, mask, labels)


def batches(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], batch_size: int, max_len: int,
    *, shuffle: bool = False, seed: int = 0,
) -> Iterator[Batch]:
    """Batches over the examples once (shuffled per call if asked)."""
    order = list(examples)
    if shuffle:
        random.Random(seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        yield collate(tokenizer, order[i : i + batch_size], max_len)


def endless_batches(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], batch_size: int, max_len: int, seed: int = 0
) -> Iterator[Batch]:
    """Shuffled batches forever, a new order each epoch (for step-counted training)."""
    epoch = 0
    while True:
        yield from batches(tokenizer, examples, batch_size, max_len, shuffle=True, seed=seed + epoch)
        epoch += 1
