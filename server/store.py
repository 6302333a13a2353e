"""The server's durable state: one SQLite file (clients, plans, rounds, metrics) + safetensors files.

Tokens are stored only as SHA-256 hashes. Every write is a transaction, so a server killed at any
moment restarts from a consistent state; tensors are written to a temporary file and renamed, so
a file on disk is always complete.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import shutil
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (
    id TEXT PRIMARY KEY,
    number INTEGER NOT NULL UNIQUE,
    token_hash TEXT NOT NULL UNIQUE,
    profile TEXT NOT NULL,
    examples INTEGER NOT NULL,
    plan TEXT,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    number INTEGER PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('open', 'complete')),
    started REAL NOT NULL,
    completed REAL
);
CREATE TABLE IF NOT EXISTS metrics (
    round INTEGER NOT NULL,
    client TEXT NOT NULL REFERENCES clients(id),
    step INTEGER NOT NULL,
    loss REAL NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (round, client, step)
);
CREATE TABLE IF NOT EXISTS join_codes (
    code_hash TEXT PRIMARY KEY,
    uses_left INTEGER NOT NULL,
    expires REAL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS uploads (
    round INTEGER NOT NULL,
    client TEXT NOT NULL REFERENCES clients(id),
    path TEXT NOT NULL,
    at REAL NOT NULL,
    split INTEGER,
    digest TEXT,
    PRIMARY KEY (round, client)
);
"""
# Columns added after a state directory may have been created: (table, column, type).
ADDED_COLUMNS = [("uploads", "split", "INTEGER"), ("uploads", "digest", "TEXT")]


# Where the tensors of a run rest under the state directory (docs/protocol.md, "State and restarts").
MERGED_DELTAS = "deltas/merged.safetensors"  # merging strategies: the merged model as deltas against the base
GLOBAL_ADAPTER = "deltas/global-adapter.safetensors"  # the others: the global model is W + this adapter
IMPORTANCE = "importance.safetensors"  # the smoothed importance scores
# What closing a round rewrites: staged beside the file (".pending", stamped with the round) and put
# in its place once the round's close is committed in SQLite, so that a server killed in between
# restarts from the state before that round (and closes it again), never with it merged twice.
STAGED = (MERGED_DELTAS, GLOBAL_ADAPTER, IMPORTANCE)
PENDING = ".pending"


def upload_file(round_number: int, client_id: str) -> str:
    """A client's accepted device-side adapters of a round."""
    return f"rounds/{round_number}/{client_id}.safetensors"


def server_snapshot(round_number: int, client_id: str) -> str:
    """A client's server-side adapters of a round, kept once it uploaded."""
    return f"rounds/{round_number}/{client_id}-server.safetensors"


def round_update_file(round_number: int) -> str:
    """What a merging round added to the weights (stacked factors of every adapted weight), written
    once for its participants: each one's reply is the part of its device blocks."""
    return f"rounds/{round_number}/update.safetensors"


def start_factors(client_id: str) -> str:
    """Where the factors a client starts its next round from are kept (non-merging strategies)."""
    return f"starts/{client_id}.safetensors"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class ClientRecord:
    """A registered client as the store keeps it."""

    id: str
    number: int  # registration order from 0; seeds the client's data order and adapter initialisation
    profile: dict
    examples: int
    plan: dict | None


@dataclass(frozen=True)
class RoundRecord:
    """One round as the store keeps it, for the operators' views."""

    number: int
    status: str  # 'open' or 'complete'
    started: float  # Unix time
    completed: float | None
    steps: int  # split steps trained in it
    mean_loss: float | None
    uploads: int


class Store:
    """SQLite + safetensors state under one directory (`--state DIR`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.root / "state.sqlite", isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        for table, column, kind in ADDED_COLUMNS:
            if column not in {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        self._settle_staged()

    def close(self) -> None:
        self.db.close()

    # ----- clients -----------------------------------------------------------------------------
    def register(self, profile: dict, examples: int) -> tuple[str, str]:
        """A new client: (id, bearer token). Only the token's hash is stored."""
        client_id, token = uuid.uuid4().hex[:16], secrets.token_urlsafe(32)
        self.db.execute(
            "INSERT INTO clients (id, number, token_hash, profile, examples, created) "
            "VALUES (?, (SELECT COUNT(*) FROM clients), ?, ?, ?, ?)",
            (client_id, hash_token(token), json.dumps(profile), int(examples), time.time()),
        )
        return client_id, token

    def client_count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM clients").fetchone()[0]

    # ----- enrollment --------------------------------------------------------------------------
    def add_join_code(self, uses: int = 1, expires_in_s: float | None = None) -> str:
        """A new join code good for `uses` registrations (until `expires_in_s` from now, if given).
        Only its hash is stored: the code is shown once, here."""
        if uses < 1:
            raise ValueError(f"a join code needs at least one use, got {uses}")
        code = secrets.token_urlsafe(18)
        expires = time.time() + expires_in_s if expires_in_s is not None else None
        self.db.execute("INSERT INTO join_codes (code_hash, uses_left, expires, created) VALUES (?, ?, ?, ?)",
                        (hash_token(code), uses, expires, time.time()))
        return code

    def redeem(self, code: str) -> bool:
        """Use a join code once: False for an unknown, used-up or expired one (nothing changes then)."""
        cur = self.db.execute(
            "UPDATE join_codes SET uses_left = uses_left - 1 "
            "WHERE code_hash = ? AND uses_left > 0 AND (expires IS NULL OR expires > ?)",
            (hash_token(code), time.time()))
        return cur.rowcount == 1

    def authenticate(self, token: str) -> str | None:
        """The id of the client holding this token, or None."""
        digest = hash_token(token)
        row = self.db.execute("SELECT id, token_hash FROM clients WHERE token_hash = ?", (digest,)).fetchone()
        # The lookup is by hash; compare_digest keeps the final check constant-time anyway.
        return row[0] if row and hmac.compare_digest(row[1], digest) else None

    def client(self, client_id: str) -> ClientRecord | None:
        row = self.db.execute("SELECT id, number, profile, examples, plan FROM clients WHERE id = ?",
                              (client_id,)).fetchone()
        return None if row is None else ClientRecord(row[0], row[1], json.loads(row[2]), row[3],
                                                     json.loads(row[4]) if row[4] else None)

    def clients(self) -> list[ClientRecord]:
        rows = self.db.execute("SELECT id FROM clients ORDER BY number").fetchall()
        return [self.client(r[0]) for r in rows]

    def set_plan(self, client_id: str, plan: dict) -> None:
        self.db.execute("UPDATE clients SET plan = ? WHERE id = ?", (json.dumps(plan), client_id))

    # ----- rounds and metrics ------------------------------------------------------------------
    def current_round(self) -> int:
        """The open round's number, opening round 1 on a fresh state."""
        row = self.db.execute("SELECT number FROM rounds WHERE status = 'open' ORDER BY number DESC").fetchone()
        if row:
            return row[0]
        last = self.db.execute("SELECT MAX(number) FROM rounds").fetchone()[0] or 0
        self.db.execute("INSERT INTO rounds (number, status, started) VALUES (?, 'open', ?)", (last + 1, time.time()))
        return last + 1

    def complete_round(self, number: int, plans: dict[str, dict]) -> None:
        """Close a round with its participants' new plans and open the next one, in one transaction."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("UPDATE clients SET plan = ? WHERE id = ?",
                                [(json.dumps(plan), client_id) for client_id, plan in plans.items()])
            self.db.execute("UPDATE rounds SET status = 'complete', completed = ? WHERE number = ?", (time.time(), number))
            self.db.execute("INSERT INTO rounds (number, status, started) VALUES (?, 'open', ?)", (number + 1, time.time()))
        self._settle_staged()

    def stage(self, relative: str, tensors: dict[str, torch.Tensor], round_number: int) -> None:
        """Write what closing `round_number` changes of a file of STAGED; it takes the file's place
        when the round is completed (`complete_round`), and is dropped if it never is."""
        assert relative in STAGED, relative
        self.save_tensors(relative + PENDING, tensors, {"round": str(round_number)})

    def _settle_staged(self) -> None:
        """Staged files of completed rounds take their place; those of a round not completed (a
        close cut short) are dropped."""
        row = self.db.execute("SELECT MAX(number) FROM rounds WHERE status = 'complete'").fetchone()
        completed = row[0] or 0
        for relative in STAGED:
            pending = self.root / (relative + PENDING)
            if not pending.is_file():
                continue
            with safe_open(str(pending), "pt") as f:
                staged_round = int((f.metadata() or {}).get("round", completed + 1))
            if staged_round <= completed:
                os.replace(pending, self.root / relative)
            else:
                pending.unlink()

    def prune_rounds(self, before: int) -> list[int]:
        """Delete the tensor files of rounds numbered below `before` (uploads, server-side snapshots,
        update replies); their rows stay for the history. Returns the rounds pruned."""
        pruned = []
        for directory in sorted((self.root / "rounds").glob("*")):
            if directory.name.isdigit() and int(directory.name) < before:
                shutil.rmtree(directory)
                pruned.append(int(directory.name))
        return pruned

    def completed_rounds(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM rounds WHERE status = 'complete'").fetchone()[0]

    def record_step(self, round_number: int, client_id: str, step: int, loss: float) -> bool:
        """Record a trained step; False if this (round, client, step) was already recorded (a retry)."""
        cur = self.db.execute(
            "INSERT OR IGNORE INTO metrics (round, client, step, loss, at) VALUES (?, ?, ?, ?, ?)",
            (round_number, client_id, step, float(loss), time.time()),
        )
        return cur.rowcount == 1

    def steps_trained(self) -> int:
        """Split steps trained over the whole run (retries not counted)."""
        return self.db.execute("SELECT COUNT(*) FROM metrics").fetchone()[0]

    def round_history(self, limit: int) -> list[RoundRecord]:
        """The last `limit` rounds, newest first, with their steps, mean loss and uploads."""
        rows = self.db.execute(
            "SELECT r.number, r.status, r.started, r.completed, "
            "(SELECT COUNT(*) FROM metrics m WHERE m.round = r.number), "
            "(SELECT AVG(loss) FROM metrics m WHERE m.round = r.number), "
            "(SELECT COUNT(*) FROM uploads u WHERE u.round = r.number) "
            "FROM rounds r ORDER BY r.number DESC LIMIT ?", (limit,)).fetchall()
        return [RoundRecord(*row) for row in rows]

    def losses(self, round_number: int) -> dict[str, float]:
        """Mean loss per client in a round."""
        rows = self.db.execute("SELECT client, AVG(loss) FROM metrics WHERE round = ? GROUP BY client",
                               (round_number,)).fetchall()
        return dict(rows)

    # ----- tensors -----------------------------------------------------------------------------
    def save_tensors(self, relative: str, tensors: dict[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> Path:
        """Write a safetensors file atomically (temporary file + rename)."""
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
        return path

    def load_tensors(self, relative: str, keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor] | None:
        """A safetensors file's tensors (only the names `keep` accepts, read alone), or None if absent."""
        path = self.root / relative
        if not path.is_file():
            return None
        if keep is None:
            return load_file(str(path))
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if keep(k)}

    def record_upload(self, round_number: int, client_id: str, tensors: dict[str, torch.Tensor], split: int,
                      digest: str) -> None:
        """Keep a client's round adapters, trained at `split`, and the digest of the request that
        brought them (a retry is recognised by it, also after a restart); the row is written after
        the file, so it never dangles."""
        path = self.save_tensors(upload_file(round_number, client_id), tensors)
        self.db.execute("INSERT OR REPLACE INTO uploads (round, client, path, at, split, digest) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (round_number, client_id, str(path.relative_to(self.root)), time.time(), split, digest))

    def upload_of(self, round_number: int, client_id: str) -> tuple[int | None, str | None] | None:
        """(split, digest) of a client's accepted upload of a round, or None if it did not upload."""
        row = self.db.execute("SELECT split, digest FROM uploads WHERE round = ? AND client = ?",
                              (round_number, client_id)).fetchone()
        return None if row is None else (row[0], row[1])

    def _upload_rows(self, round_number: int) -> list[tuple[str, str]]:
        # In registration order, so that aggregation sums in the same order wherever it runs.
        return self.db.execute("SELECT u.client, u.path FROM uploads u JOIN clients c ON c.id = u.client "
                               "WHERE u.round = ? ORDER BY c.number", (round_number,)).fetchall()

    def uploaded(self, round_number: int) -> list[str]:
        """The clients that uploaded in a round (no files read)."""
        return [client for client, _ in self._upload_rows(round_number)]

    def uploads(self, round_number: int) -> dict[str, dict[str, torch.Tensor]]:
        """The round's uploaded adapters by client."""
        return {client: load_file(str(self.root / path)) for client, path in self._upload_rows(round_number)}
