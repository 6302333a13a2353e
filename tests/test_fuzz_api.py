"""Property-based fuzzing of every endpoint of a live server against its own OpenAPI document
(schemathesis): whatever arrives, the server answers a status the document lists, with the
content type, headers and body it lists, never a 5xx, and every 4xx as `{"error": "..."}`.

The server is real (the tiny model, registration open), served from a thread of its own with its
own event loop; the schema is the one it serves at GET /v1/openapi.json. One client registers
first and its bearer token goes with every authenticated operation (schemathesis also sends
requests without it, or with a wrong one), so the fuzzing reaches the handlers past the 401 check.

The document cannot say what a valid safetensors body, the live model's model name or its open
round is, so schema-driven data alone would hardly get past the first check of the step, upload
and registration handlers. Hooks (below) steer part of the generated cases there: bodies that are
safetensors with the right names and nearly the right shapes, the open round, the server's model,
the artifact the client may read. The client's plan's artifacts are planted on disk (an export
takes a minute on two cores) so that GET /v1/artifact answers 200 and GET /v1/artifacts/{id}/{name}
has a file to serve (and Range headers to honour).

Reproducible: a fixed seed, derandomised Hypothesis, no example database. Not timing-dependent:
no deadlines (the round deadline is the config's 600 s, far past the run).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from dataclasses import dataclass

import pytest
import requests
import schemathesis
import torch
from hypothesis import strategies as st
from safetensors.torch import save
from schemathesis.config import SchemathesisConfig

from conftest import running_server, server_config
from hsplitlora.federation.manifest import SCHEMA
from hsplitlora.federation.protocol import IGNORE_INDEX
from server.artifacts import FORMATS, ArtifactKey

SEED = 20260101
MAX_EXAMPLES = 100  # per operation, in the fuzzing phase (the coverage phase adds its own, bounded cases)
ARTIFACT_FILE = "device_segment.bin"
ARTIFACT_BYTES = bytes(range(256)) * 4
# Checks each test leaves to the other, or that cannot hold for this API (see `fuzz_config`).
UNDECLARED_METHODS = "unsupported_method"
POSITIVE_DATA = "positive_data_acceptance"


@dataclass
class Live:
    url: str
    state: object  # server.app.ServerState
    token: str
    client_id: str
    artifact_ids: list[str]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A tiny-model server served from a background thread, one client registered with it, and that
    client's plan's artifacts planted."""
    ready, box = threading.Event(), {}

    def serve() -> None:
        async def main() -> None:
            box["loop"], box["stop"] = asyncio.get_running_loop(), asyncio.Event()
            try:
                async with running_server(server_config(tmp_path_factory.mktemp("fuzz"))) as (url, state):
                    box["url"], box["state"] = url, state
                    ready.set()
                    await box["stop"].wait()
            except BaseException as e:  # reported by the fixture, not lost in the thread
                box["error"] = e
                ready.set()

        asyncio.run(main())

    thread = threading.Thread(target=serve, name="fuzzed-server", daemon=True)
    thread.start()
    assert ready.wait(300), "the server did not start"
    if "error" in box:
        raise box["error"]
    try:
        reply = requests.post(box["url"] + "/v1/register", json={"profile": {"memory_bytes": 15e6}, "examples": 10},
                              timeout=60)
        assert reply.status_code == 200, reply.text
        client_id = reply.json()["client_id"]
        yield Live(box["url"], box["state"], reply.json()["token"], client_id, _plant_artifacts(box["state"], client_id))
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(60)


def _plant_artifacts(state, client_id: str) -> list[str]:
    """A built-looking artifact of each format for the client's plan: its manifest and one file."""
    cfg, plan = state.cfg, state.trainer.clients[client_id].plan
    ids = []
    for fmt in FORMATS:
        key = ArtifactKey.for_plan(cfg.model, plan, cfg.alpha, cfg.batch_size, cfg.max_len, fmt)
        directory = state.artifacts.directory(key.id)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / ARTIFACT_FILE).write_bytes(ARTIFACT_BYTES)
        (directory / "manifest.json").write_text(json.dumps({"schema": SCHEMA, "artifacts": {fmt: {
            "files": {"program": ARTIFACT_FILE}, "sha256": {ARTIFACT_FILE: hashlib.sha256(ARTIFACT_BYTES).hexdigest()},
            "bytes": {ARTIFACT_FILE: len(ARTIFACT_BYTES)}}}}))
        ids.append(key.id)
    return ids


def fuzz_config(live: Live, **extra) -> SchemathesisConfig:
    """Every schemathesis check, on every generated case (positive and negative), but:

    - `positive_data_acceptance` (schema-valid requests must be answered 2xx): no body the
      document allows for a step or an upload ("application/octet-stream", any bytes) is accepted
      unless it is the safetensors of the right tensors, nor a probe of more bytes than the live
      server's cap (one step's reply), nor a step past --local-steps, nor a registration measured on another model
      or fitting no plan (422), nor a Range past a file's end (416). The document cannot say these
      (they depend on the run); refusing them is the contract, not a bug.
    - `unsupported_method`: held by its own test below, for every path, so that one finding there
      does not hide what the fuzzing of each operation finds.
    """
    return SchemathesisConfig.from_dict({
        "seed": SEED,
        "base-url": live.url,
        "request-timeout": 60,
        "suppress-health-check": ["all"],
        "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
        "phases": {"stateful": {"enabled": False}},
        "auth": {"openapi": {"bearer": {"bearer": live.token}}},
        **extra,
    })


# ----- steering part of the generated cases past the first checks ---------------------------


def _randn(shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def _safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


# A well-formed body, or one with exactly one thing wrong (each of these, and none, drawn alike):
# what the handlers check, one at a time, and the training past all checks.
STEP_DEFECTS = [None, None, None, None, "fp16", "bf16", "int8", "int8 without scale", "int8 overflow", "float64",
                "one token", "batch too large", "wrong width", "nan", "inf", "huge", "mask of 2", "mask of zeros",
                "no label", "label out of range", "negative label", "int32 labels", "float mask", "missing tensor",
                "extra tensor", "scale on labels"]
ADAPTER_DEFECTS = [None, None, None, "rank too small", "rank too large", "fp16", "int64", "nan", "inf", "huge",
                   "zeros", "missing factor", "foreign target", "transposed"]


def step_bodies(hidden: int, batch: int, vocab: int) -> st.SearchStrategy[bytes]:
    """Split-step bodies: safetensors of h, attention_mask and labels that are valid (at this run's
    width, a batch and length within its limits) or wrong in one way; and arbitrary bytes."""

    @st.composite
    def near(draw) -> bytes:
        defect = draw(st.sampled_from(STEP_DEFECTS))
        seed = draw(st.integers(0, 2**16))
        b = batch + 1 if defect == "batch too large" else draw(st.integers(1, batch))
        t = 1 if defect == "one token" else draw(st.integers(2, 6))
        d = hidden + 1 if defect == "wrong width" else hidden
        scale = {"nan": float("nan"), "inf": float("inf"), "huge": 3e38}.get(defect, 1.0)
        h = _randn((b, t, d), seed, scale)
        tensors = {"h": h.half() if defect == "fp16" else h.bfloat16() if defect == "bf16" else
                   h.double() if defect == "float64" else h}
        if defect in ("int8", "int8 without scale", "int8 overflow"):
            tensors["h"] = torch.randint(-127, 128, (b, t, d), generator=torch.Generator().manual_seed(seed)).to(torch.int8)
            if defect != "int8 without scale":
                tensors["h.scale"] = torch.full((b, t, 1), 1e38 if defect == "int8 overflow" else 0.01)
        mask = torch.ones(b, t, dtype=torch.long)
        if defect == "mask of 2":
            mask[0, -1] = 2
        elif defect == "mask of zeros":
            mask.zero_()
        elif draw(st.booleans()):  # right padding, as a device sends a short example
            mask[0, draw(st.integers(1, t - 1)) if t > 1 else 1:] = 0
        labels = torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed + 1))
        labels[:, 0] = IGNORE_INDEX  # the first token is never a target
        if defect == "no label":
            labels.fill_(IGNORE_INDEX)
        elif defect == "label out of range":
            labels[0, -1] = vocab
        elif defect == "negative label":
            labels[0, -1] = -1
        tensors["attention_mask"] = mask.float() if defect == "float mask" else mask
        tensors["labels"] = labels.int() if defect == "int32 labels" else labels
        if defect == "missing tensor":
            tensors.pop(draw(st.sampled_from(["h", "attention_mask", "labels"])))
        elif defect == "extra tensor":
            tensors["extra"] = torch.zeros(1)
        elif defect == "scale on labels":
            tensors["labels.scale"] = torch.ones(b, 1)
        return _safetensors(tensors, {"wire": draw(st.sampled_from(["fp16", "fp32", "int8", "bogus"]))})

    return st.one_of(near(), st.binary(max_size=256))


def adapter_bodies(ranks: dict[str, int], weight_shape) -> st.SearchStrategy[bytes]:
    """Adapter uploads: '<t>.A' (r, d_in) and '<t>.B' (d_out, r), fp32, for each target of the
    client's plan at its rank, small (so that the update is within --max-update-ratio), or with one
    thing wrong; and arbitrary bytes."""

    @st.composite
    def near(draw) -> bytes:
        defect = draw(st.sampled_from(ADAPTER_DEFECTS))
        seed = draw(st.integers(0, 2**16))
        scale = {"nan": float("nan"), "inf": float("inf"), "huge": 1e3, "zeros": 0.0}.get(defect, 1e-3)
        tensors = {}
        for i, (name, rank) in enumerate(sorted(ranks.items())):
            d_in, d_out = weight_shape(name.split(".", 1)[1])
            r = max(rank + {"rank too small": -1, "rank too large": 1}.get(defect, 0), 0)
            a, b = _randn((r, d_in), seed + 2 * i, scale), _randn((d_out, r), seed + 2 * i + 1, scale)
            if defect == "transposed":
                a, b = a.T, b.T
            dtype = {"fp16": torch.float16, "int64": torch.int64}.get(defect, torch.float32)
            tensors[f"{name}.A"], tensors[f"{name}.B"] = a.to(dtype), b.to(dtype)
        if defect == "missing factor":
            tensors.pop(draw(st.sampled_from(sorted(tensors))))
        elif defect == "foreign target":
            tensors["9.q.A"], tensors["9.q.B"] = torch.zeros(1, 1), torch.zeros(1, 1)
        return _safetensors(tensors)

    return st.one_of(near(), st.binary(max_size=256))


def steer(api, live: Live) -> None:
    """Register the hooks that take part of the generated cases past the first checks."""
    state = live.state
    dims, cfg = state.trainer.dims, state.cfg
    plan = state.trainer.clients[live.client_id].plan
    bodies = {"POST /v1/steps": step_bodies(dims.hidden, cfg.batch_size, dims.vocab),
              "PUT /v1/rounds/{round}/adapters": adapter_bodies({str(t): r for t, r in plan.ranks.items()},
                                                                dims.weight_shape)}

    @api.hook
    def before_generate_body(context, strategy):
        return bodies.get(context.operation.label, strategy)

    @api.hook
    def map_case(context, case):
        # Only schema-valid cases are steered, and only to schema-valid values (the open round is
        # 1 for the whole run: one client uploads at most, and a round needs two, or 600 s).
        if case.meta is None or not case.meta.generation.mode.is_positive:
            return case
        label = case.operation.label
        if label == "POST /v1/steps" and isinstance(case.query, dict) and isinstance(case.query.get("round"), int):
            if case.query["round"] % 4 != 3:  # most to the open round, the rest as drawn
                case.query["round"] = state.round
                if isinstance(case.query.get("step"), int):
                    case.query["step"] %= cfg.local_steps + 1
        elif label in ("PUT /v1/rounds/{round}/adapters", "GET /v1/rounds/{round}/update"):
            if isinstance(case.path_parameters.get("round"), int) and case.path_parameters["round"] % 2:
                case.path_parameters["round"] = state.round - case.path_parameters["round"] % 4 // 2  # 1 or 0
        elif label == "GET /v1/artifacts/{id}/{name}":
            name = case.path_parameters.get("name")
            if isinstance(name, str) and len(name) % 2 == 0:
                case.path_parameters["id"] = live.artifact_ids[len(name) // 2 % len(live.artifact_ids)]
                case.path_parameters["name"] = ARTIFACT_FILE
        elif label == "POST /v1/register" and isinstance(case.body, dict) and isinstance(case.body.get("profile"), dict):
            # Half the declared profiles the planner could fit: this server's model, no step-time
            # budget (that needs a measured profile), a memory budget of at least one block.
            profile = case.body["profile"]
            if isinstance(profile.get("memory_bytes"), (int, float)) and int(profile["memory_bytes"]) % 2 == 0:
                profile["memory_bytes"] = 15e6 + min(abs(profile["memory_bytes"]), 1e12)
                profile.pop("step_seconds", None)
                if "model" in profile:
                    profile["model"] = cfg.model
        return case


def refusals_are_json_errors(ctx, response, case) -> bool | None:
    """Every 4xx is JSON `{"error": "<a string>"}` (docs/protocol.md: "Every refusal is a 4xx with a
    JSON body"; the document's Error schema, for every 4xx it lists or not)."""
    if not 400 <= response.status_code < 500:
        return None
    content_type = response.headers.get("content-type", [""])[0].partition(";")[0].strip()  # lower-case names
    assert content_type == "application/json", f"a {response.status_code} answered as {content_type!r}, not JSON"
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"a {response.status_code} whose body is not JSON: {response.content[:200]!r}") from None
    assert isinstance(body, dict) and isinstance(body.get("error"), str), (
        f"a {response.status_code} whose body is not {{'error': '...'}}: {body!r}")
    return True


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request):
    """schemathesis 4.32.5's lazy schemas read and rename `Node._nodeid` (for their per-operation
    reports), which pytest 9.2 no longer has (it keeps `_id`): give them one."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


# ----- the tests ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(live):
    schema = schemathesis.openapi.from_url(live.url + "/v1/openapi.json", config=fuzz_config(
        live, checks={UNDECLARED_METHODS: {"enabled": False}, POSITIVE_DATA: {"enabled": False}}))
    steer(schema, live)
    return schema


@pytest.fixture(scope="module")
def api_methods(live):
    """The same document, for the coverage phase's requests of undeclared methods on every path."""
    return schemathesis.openapi.from_url(live.url + "/v1/openapi.json", config=fuzz_config(
        live, phases={"examples": {"enabled": False}, "fuzzing": {"enabled": False}, "stateful": {"enabled": False}},
        checks={"enabled": False, UNDECLARED_METHODS: {"enabled": True}, "not_a_server_error": {"enabled": True}}))


fuzzed = schemathesis.pytest.from_fixture("api")
methods = schemathesis.pytest.from_fixture("api_methods")


@fuzzed.parametrize()
def test_every_operation_answers_as_documented(case):
    case.call_and_validate(additional_checks=[refusals_are_json_errors])


@methods.parametrize()
def test_undeclared_methods_are_refused_with_405_and_allow(case):
    if case.method.upper() == case.operation.method.upper():
        return  # the coverage phase's cases of the declared method: the test above has them
    case.call_and_validate(additional_checks=[refusals_are_json_errors])
