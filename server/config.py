"""Settings of a server run; sent in part to every client at registration."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hsplitlora.configs import ALPHA_HELP, LR_HELP, option, parse_bytes
from hsplitlora.federation.protocol import DEFAULT_BATCH_SIZE, DEFAULT_MAX_LEN, Settings
from hsplitlora.federation.strategies import SERVER_SPEED, STRATEGIES, Strategy, strategy
from hsplitlora.models import DEFAULT_MODEL, MODEL_HELP
from hsplitlora.planner import PlannerConfig
from hsplitlora.wire import WIRE_FORMATS
from server.limits import rate

FEDERATED = tuple(name for name, s in STRATEGIES.items() if s.federated)


@dataclass
class ServerConfig:
    """`hsplitlora server` options."""

    model: str = option(DEFAULT_MODEL, help=MODEL_HELP)
    state: Path = option(Path("server-state"), help="state directory (SQLite + tensors); restart with the same one to resume")
    host: str = option("127.0.0.1", help="address to listen on")
    port: int = option(8080, help="port")
    method: str = option("hsplitlora", choices=FEDERATED,
                         help="the run's strategy: hsplitlora (planned splits and ranks, noise-free aggregation merged "
                              "into the weights), or splitlora / hetlora / flexlora (a global adapter on frozen weights; "
                              "plans stay fixed; hetlora / flexlora devices run every block, the server the head)")
    rounds: int = option(10, help="planned rounds of the run; importance smoothing settles over them")
    clients_per_round: int = option(1, help="aggregate once this many clients uploaded their round and no other "
                                             "active client is still training it")
    round_deadline_s: float = option(600.0, flag="--round-deadline", metavar="SECONDS",
                                     help="seconds after which a round aggregates with the clients that made it")
    idle_expiry_s: float = option(1800.0, flag="--idle-expiry", metavar="SECONDS",
                                  help="a client not heard from for this long is left out of planning and no round "
                                       "waits for it, until it is back")
    local_steps: int = option(4, help="local steps per round")
    batch_size: int = option(DEFAULT_BATCH_SIZE, help="examples per step")
    max_len: int = option(DEFAULT_MAX_LEN, help="max tokens per example")
    lr: float = option(1e-3, help=LR_HELP)
    alpha: float = option(16.0, help=ALPHA_HELP)
    seed: int = option(0, help="seed of the clients' data order and of fresh adapters")
    server_speed: float = option(SERVER_SPEED, help="this server's compute per client, relative to the weakest device")
    wire: str = option("fp16", choices=WIRE_FORMATS, help="activation and gradient format on the wire")
    max_request_bytes: int | None = option(None, help="refuse larger bodies (default: sized from the model)")
    max_update_ratio: float = option(
        1.0, help="refuse an upload, and leave out of the round a client, whose update of a weight "
                  "(||scale * B @ A||) is larger than this multiple of the weight's own norm")
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    open_registration: bool = option(
        False, help="let any device register without a join code (`hsplitlora enroll` makes codes); for a "
                    "server only trusted devices reach")
    max_clients: int = option(1000, help="refuse registrations beyond this many clients")
    keep_rounds: int = option(3, help="rounds whose tensor files (uploads, server-side snapshots, the round's "
                                       "update) are kept; older ones are deleted (a client asking for a deleted "
                                       "round's update gets 404)")
    read_timeout_s: float = option(60.0, flag="--read-timeout", metavar="SECONDS",
                                   help="a request body must arrive within this many seconds (408 otherwise)")
    header_timeout_s: float = option(30.0, flag="--header-timeout", metavar="SECONDS",
                                     help="a connection must send a request's headers within this many seconds of "
                                          "opening, or of its last answer; slower (or idle) ones are closed")
    rate_per_client: str = option("50/second", metavar="RATE",
                                  help="requests one client may make (e.g. 50/second, 600/minute); more get 429")
    rate_per_address: str = option("50/second", metavar="RATE",
                                   help="requests without a valid token (registration, probes, status) one address "
                                        "may make; more get 429")
    probe_bytes_per_minute: float = option(64 * 2**20, parse=parse_bytes, metavar="BYTES",
                                           help="bytes of /v1/probe downloads one address may ask for per minute "
                                                "without a token (e.g. 64MiB)")
    operator_token_file: Path | None = option(
        None, help="a file holding the operator's token: /status and /metrics then answer callers from other "
                   "addresses than this machine's who send it as a bearer token (without it they answer only "
                   "this machine)")
    tls_cert: Path | None = option(None, help="serve HTTPS with this certificate (PEM)")
    tls_key: Path | None = option(None, help="... and this private key (PEM)")

    def __post_init__(self) -> None:
        if not self.strategy().federated:
            raise ValueError(f"--method {self.method} trains all data in one place: run `hsplitlora simulate "
                             f"--method {self.method}` (or `hsplitlora finetune`), not a server")
        if self.wire not in WIRE_FORMATS:
            raise ValueError(f"--wire must be one of {', '.join(WIRE_FORMATS)}, got {self.wire!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        for name in ("rate_per_client", "rate_per_address"):
            rate(getattr(self, name))  # a ValueError that says what a rate looks like
        for name, flag in (("idle_expiry_s", "--idle-expiry"), ("header_timeout_s", "--header-timeout"),
                           ("read_timeout_s", "--read-timeout"), ("probe_bytes_per_minute", "--probe-bytes-per-minute")):
            if not getattr(self, name) > 0:
                raise ValueError(f"{flag} must be > 0, got {getattr(self, name)}")
        if not self.max_update_ratio > 0:
            raise ValueError(f"--max-update-ratio must be > 0, got {self.max_update_ratio}")
        for name in ("rounds", "clients_per_round", "local_steps", "batch_size", "max_len", "max_clients",
                     "keep_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    def strategy(self) -> Strategy:
        return strategy(self.method)

    def request_limit(self, hidden: int, adapter_bytes: int) -> int:
        """Largest accepted body: an fp32 step (h + mask + labels) or the adapters, with headroom."""
        if self.max_request_bytes is not None:
            return self.max_request_bytes
        step = self.batch_size * self.max_len * (hidden * 4 + 16)
        return 2 * max(step, adapter_bytes) + 65536

    def client_settings(self) -> Settings:
        """What a client must use to train the way this server expects."""
        return Settings(model=self.model, local_steps=self.local_steps, batch_size=self.batch_size,
                        max_len=self.max_len, lr=self.lr, alpha=self.alpha, wire=self.wire, seed=self.seed)
