"""Settings of a server run; sent in part to every client at registration."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hsplitlora.models import DEFAULT_MODEL
from hsplitlora.planner import PlannerConfig
from hsplitlora.wire import WIRE_FORMATS


@dataclass
class ServerConfig:
    """`hsplitlora server` options."""

    model: str = DEFAULT_MODEL
    state: Path = Path("server-state")
    host: str = "127.0.0.1"
    port: int = 8080
    method: str = "naa"  # the aggregator of the run
    rounds: int = 10  # the planned length of the run: sets how fast importance smoothing settles
    clients_per_round: int = 1  # a round aggregates once this many clients uploaded (or at the deadline)
    round_deadline_s: float = 600.0  # then it aggregates with the clients that made it
    local_steps: int = 4
    batch_size: int = 4
    max_len: int = 128
    lr: float = 1e-3
    alpha: float = 16.0
    seed: int = 0
    wire: str = "fp16"
    max_request_bytes: int | None = None  # default: sized from the model (see `request_limit`)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def __post_init__(self) -> None:
        if self.wire not in WIRE_FORMATS:
            raise ValueError(f"--wire must be one of {', '.join(WIRE_FORMATS)}, got {self.wire!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        for name in ("rounds", "clients_per_round", "local_steps", "batch_size", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    def request_limit(self, hidden: int, adapter_bytes: int) -> int:
        """Largest accepted body: an fp32 step (h + mask + labels) or the adapters, with headroom."""
        if self.max_request_bytes is not None:
            return self.max_request_bytes
        step = self.batch_size * self.max_len * (hidden * 4 + 16)
        return 2 * max(step, adapter_bytes) + 65536

    def client_settings(self) -> dict:
        """What a client must use to train the way this server expects."""
        return {
            "model": self.model, "local_steps": self.local_steps, "batch_size": self.batch_size,
            "max_len": self.max_len, "lr": self.lr, "alpha": self.alpha, "wire": self.wire, "seed": self.seed,
        }
