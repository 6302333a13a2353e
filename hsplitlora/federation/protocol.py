"""The server <-> device protocol as code: what both ends import instead of restating it.

Routes, header names, the run's settings a device trains with, the tensors of a split step and of
an adapter upload (names, shapes, dtypes and the checks a server applies), and the round update a
device applies. docs/protocol.md explains each endpoint; `openapi.json` beside this module is the
machine-readable contract (served at `GET /v1/openapi.json`) and `vectors/` holds request and reply
bodies that any device implementation, in any language, can be tested against.

Tensor names are `Target.key`'s: '<layer>.<proj>.A' (r x d_in), '.B' (d_out x r), '.delta'
(d_out x d_in). Tensors travel as safetensors (`hsplitlora.wire`), never pickled.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from hsplitlora.lora import Target
from hsplitlora.wire import WIRE_FORMATS, TensorSpec, WireError

OPENAPI = Path(__file__).with_name("openapi.json")
VECTORS = Path(__file__).with_name("vectors")
IGNORE_INDEX = -100  # a label the loss skips (the prompt's tokens, padding)
# A run's step shape unless its server says otherwise: what a device profiles itself for.
DEFAULT_BATCH_SIZE, DEFAULT_MAX_LEN = 4, 128


class Route:
    """Every path the server serves (aiohttp's `{name}` placeholders)."""

    HEALTH = "/healthz"
    OPENAPI = "/v1/openapi.json"
    SETTINGS = "/v1/settings"
    PROBE = "/v1/probe"
    REGISTER = "/v1/register"
    ME = "/v1/me"
    STEPS = "/v1/steps"
    ADAPTERS = "/v1/rounds/{round}/adapters"
    UPDATE = "/v1/rounds/{round}/update"
    DELTAS = "/v1/deltas"
    ARTIFACT = "/v1/artifact"
    ARTIFACT_FILE = "/v1/artifacts/{id}/{name}"
    STATUS = "/v1/status"
    STATUS_PAGE = "/status"
    METRICS = "/metrics"


# No token: a device reads the settings and probes its link before it registers; the operators'
# views name no token and no data.
PUBLIC = frozenset({Route.HEALTH, Route.OPENAPI, Route.SETTINGS, Route.PROBE, Route.REGISTER, Route.STATUS,
                    Route.STATUS_PAGE, Route.METRICS})  # no client token
OPERATOR = frozenset({Route.STATUS, Route.STATUS_PAGE, Route.METRICS})  # the server's machine, or the operator's token


class Header:
    """Header names of the protocol."""

    LOSS = "X-Loss"  # step reply: the server's loss on the batch
    RETRIED = "X-Retried"  # step reply: "true" when answered again from the retry cache
    PLAN = "X-Plan"  # update reply: the client's next plan (JSON)
    ROUND = "X-Round"  # update reply: the open round
    UPDATE = "X-Update"  # update reply: `Update.kind`
    IMPORTANCE = "X-Importance"  # adapter upload: the device's scores of its blocks (JSON)


def steps_path(round_number: int, step: int) -> str:
    return f"{Route.STEPS}?round={round_number}&step={step}"


def adapters_path(round_number: int) -> str:
    return Route.ADAPTERS.format(round=round_number)


def update_path(round_number: int) -> str:
    return Route.UPDATE.format(round=round_number)


@dataclass(frozen=True)
class Settings:
    """What a device must train with to take part in a run (sent at registration, `GET /v1/settings`)."""

    model: str
    local_steps: int
    batch_size: int
    max_len: int
    lr: float
    alpha: float
    wire: str
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Settings:
        missing = [f.name for f in fields(cls) if f.name not in data]
        if missing:
            raise ValueError(f"settings lack {', '.join(missing)}")
        settings = cls(**{f.name: data[f.name] for f in fields(cls)})
        if settings.wire not in WIRE_FORMATS:
            raise ValueError(f"settings.wire must be one of {', '.join(WIRE_FORMATS)}, got {settings.wire!r}")
        return settings


# ----- tensors --------------------------------------------------------------------------------


def factors_to_tensors(factors: dict[Target, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{target: (A, B)} -> {'<t>.A': A, '<t>.B': B}."""
    out = {}
    for t, (a, b) in factors.items():
        out[t.key("A")], out[t.key("B")] = a, b
    return out


def tensors_to_factors(tensors: dict[str, torch.Tensor]) -> dict[Target, tuple[torch.Tensor, torch.Tensor]]:
    """{'<t>.A', '<t>.B', ...} -> {target: (A, B)}; ValueError for a factor without its pair or
    any other name."""
    out = {}
    for key, value in tensors.items():
        t, kind = Target.from_key(key)
        if kind == "delta":
            raise ValueError(f"{key}: expected LoRA factors ('.A' / '.B'), not a delta")
        other = t.key("B" if kind == "A" else "A")
        if other not in tensors:
            raise ValueError(f"{key} without {other}")
        if kind == "A":
            out[t] = (value, tensors[other])
    return out


def adapter_specs(ranks: dict[Target, int], weight_shape) -> dict[str, TensorSpec]:
    """The tensors of an adapter upload for a plan's ranks: '<t>.A' (r, d_in) and '<t>.B'
    (d_out, r), fp32. `weight_shape(proj) -> (d_in, d_out)` (`ModelDims.weight_shape`)."""
    specs = {}
    for t, r in ranks.items():
        d_in, d_out = weight_shape(t.proj)
        specs[t.key("A")] = TensorSpec((r, d_in), (torch.float32,))
        specs[t.key("B")] = TensorSpec((d_out, r), (torch.float32,))
    return specs


def step_specs(hidden: int) -> dict[str, TensorSpec]:
    """The tensors of a split step's request: the activations at the cut, the mask, the labels."""
    return {
        "h": TensorSpec((None, None, hidden)),
        "attention_mask": TensorSpec((None, None), (torch.int64,)),
        "labels": TensorSpec((None, None), (torch.int64,)),
    }


def grad_specs(shape: tuple[int, ...]) -> dict[str, TensorSpec]:
    """The tensors of a split step's reply: dL/dh, the shape of the h that was sent."""
    return {"grad": TensorSpec(tuple(shape))}


def check_step(tensors: dict[str, torch.Tensor], batch_size: int, max_len: int, vocab: int) -> None:
    """What `step_specs` cannot say alone: the shapes agree, the batch is within the run's, the
    mask is 0/1, labels are IGNORE_INDEX or token ids, and at least one token is learnt
    (WireError otherwise)."""
    h, mask, labels = tensors["h"], tensors["attention_mask"], tensors["labels"]
    b, t = h.shape[:2]
    if mask.shape != (b, t) or labels.shape != (b, t):
        raise WireError(f"attention_mask and labels must be {b}x{t} like h")
    if not (1 <= b <= batch_size and 2 <= t <= max_len):
        raise WireError(f"batch x seq {b}x{t} outside 1..{batch_size} x 2..{max_len}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise WireError("attention_mask must hold only 0 and 1")
    if not bool(((labels == IGNORE_INDEX) | ((labels >= 0) & (labels < vocab))).all()):
        raise WireError(f"labels must be {IGNORE_INDEX} or token ids in [0, {vocab})")
    if not bool((labels[:, 1:] != IGNORE_INDEX).any()):
        raise WireError("labels mark no token to learn")


# A 409's `redo`: what the client does next.
REDO_ROUND = "round"  # the server lost the round's earlier steps: train it again from step 0
REJOIN = "rejoin"  # the round closed without this client (its deadline): take the merged weights, train `open_round`
MAX_EXAMPLES = 10**9  # more examples than one device holds: a registration's count is refused above it
MAX_ROUND = 10**9  # rounds and steps in paths and queries are integers below this


def parse_registration(body: object) -> tuple[dict, int]:
    """(profile, examples) of a registration body, types exactly as documented (ValueError
    otherwise): an object with a `profile` object and `examples`, an integer (not a bool, a float
    or a string) in [1, MAX_EXAMPLES]. The profile's budgets and measurements are checked where
    they are read."""
    if not isinstance(body, dict) or not isinstance(body.get("profile"), dict) or "memory_bytes" not in body["profile"]:
        raise ValueError('expected JSON {"profile": {"memory_bytes": N, ...}, "examples": N}')
    examples = body.get("examples")
    if isinstance(examples, bool) or not isinstance(examples, int) or not 1 <= examples <= MAX_EXAMPLES:
        raise ValueError(f"examples must be an integer in [1, {MAX_EXAMPLES}], got {examples!r}")
    return dict(body["profile"]), examples


def join_code(body: dict) -> str | None:
    """A registration's `join_code` (ValueError for one that is not a short string)."""
    code = body.get("join_code")
    if code is not None and not (isinstance(code, str) and 0 < len(code) <= 256):
        raise ValueError("join_code must be the string the operator gave (`hsplitlora enroll`)")
    return code


def parse_json(text: str | bytes) -> object:
    """JSON from a stranger: ValueError (not RecursionError) for one nested too deep."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deep") from None


def bounded_int(text: str, name: str, limit: int = MAX_ROUND) -> int:
    """A path or query integer in [0, limit) (ValueError otherwise: no 5,000-digit round numbers)."""
    if not (text.isascii() and text.isdigit()) or len(text) > len(str(limit)) or int(text) >= limit:
        raise ValueError(f"{name} must be an integer in [0, {limit}), got {text[:20]!r}")
    return int(text)


def encode_scores(scores: dict[Target, float]) -> str:
    """Importance scores for the `X-Importance` header."""
    return json.dumps({str(t): v for t, v in scores.items()})


def decode_scores(text: str) -> dict[Target, float]:
    """The `X-Importance` header; ValueError for anything but {'<layer>.<proj>': finite score >= 0}
    (a score is a mean of |W * dL/dW|; a NaN would reach every client's plan)."""
    try:
        raw = parse_json(text)
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in raw.values()):
            raise ValueError("every score must be a number")
        scores = {Target.parse(k): float(v) for k, v in raw.items()}
    except (ValueError, AttributeError, TypeError) as e:
        raise ValueError(f"{Header.IMPORTANCE} must be a JSON object of '<layer>.<proj>': score ({e})") from None
    bad = [str(t) for t, v in scores.items() if not (math.isfinite(v) and v >= 0)]
    if bad:
        raise ValueError(f"{Header.IMPORTANCE} must be a JSON object of finite scores >= 0 (not so for {', '.join(bad)})")
    return scores


# ----- the round update -----------------------------------------------------------------------

MERGE, START = "merge", "start"


@dataclass
class Update:
    """What a device applies after a round (`GET /v1/rounds/{R}/update`).

    `merge` (strategies that merge into W): `factors` are stacked factors whose product B @ A,
    scales folded in, the device adds to each changed weight of its blocks; `deltas` set blocks a
    deeper new split brings onto the device (the weight minus the base checkpoint's).
    `start` (strategies that keep W frozen): `factors` are where the device's adapters start the
    next round, at its own ranks, unscaled; no deltas.
    """

    kind: str
    factors: dict[Target, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    deltas: dict[Target, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in (MERGE, START):
            raise ValueError(f"an update is {MERGE!r} or {START!r}, got {self.kind!r}")
        if self.kind == START and self.deltas:
            raise ValueError("a start update carries no deltas")

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {**factors_to_tensors(self.factors), **{t.key("delta"): d for t, d in self.deltas.items()}}

    @classmethod
    def from_tensors(cls, kind: str, tensors: dict[str, torch.Tensor]) -> Update:
        """Parse an update's tensors (ValueError for unexpected names or unpaired factors)."""
        deltas, factors = {}, {}
        for key, value in tensors.items():
            t, k = Target.from_key(key)
            if k == "delta":
                deltas[t] = value
            else:
                factors[key] = value
        return cls(kind, tensors_to_factors(factors), deltas)

    def dense(self) -> dict[Target, torch.Tensor]:
        """A merge's change of each weight: B @ A (the deltas of new blocks are not changes)."""
        if self.kind != MERGE:
            raise ValueError("only a merge update changes the weights")
        return {t: b.float() @ a.float() for t, (a, b) in self.factors.items()}
