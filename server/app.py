"""The aiohttp service: registration, split steps, rounds, status and metrics. See docs/protocol.md.

Control messages are JSON; tensors travel as safetensors bytes and are checked (dtype, shape
against the client's plan, finiteness, size) before anything uses them. Every refusal is a 4xx
with `{"error": "..."}` and leaves the state as it was.

Every torch call (model load, decoding and encoding tensors, training, aggregation) runs on one
model thread, so the event loop keeps answering and torch's OpenMP runs one thread team: a
second team (the event loop's, from a tensor conversion there) makes both spin less between
parallel regions once the process has more OpenMP threads than the machine has cores, and the
server's step ran about 30 % slower for it on 2 cores (docs/benchmarks.md, network).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import time

from aiohttp import web

from hsplitlora.federation import protocol
from hsplitlora.federation.protocol import MERGE, OPERATOR, PUBLIC, START, Header, Route
from hsplitlora.lora import Target
from hsplitlora.planner import PlanError
from hsplitlora.wire import BYTES_PER_ELEMENT, WireError, decode, encode
from server.artifacts import FORMATS, ArtifactCache, ArtifactKey, BuildError
from server.config import ServerConfig
from server.limits import BrokenHttpLog, RateLimits
from server.monitoring import Monitor, render_status_page, snapshot
from server.store import Store, round_update_file, server_snapshot
from server.trainer import RedoRound, ServerTrainer, StepConflict

log = logging.getLogger(__name__)
STATE: web.AppKey[ServerState] = web.AppKey("state", object)  # the real type is set below
CLIENT: web.RequestKey[str] = web.RequestKey("client", str)
WATCH: web.AppKey[asyncio.Task] = web.AppKey("watch", asyncio.Task)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


async def answer_and_close(request: web.Request, response: web.Response) -> web.Response:
    """Answer, then close the connection at once: what the sender still has of its body is not read
    (aiohttp would otherwise linger, reading it, for up to 10 s)."""
    response.force_close()  # says `Connection: close`, so the sender does not reuse the connection
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()
    return response


def too_large(state: ServerState, request: web.Request) -> bool:
    return request.content_length is not None and request.content_length > state.limit


@web.middleware
async def errors_and_auth(request: web.Request, handler):
    """Rate limits, bearer-token authentication for every non-public route, errors as JSON."""
    state: ServerState = request.app[STATE]
    if state.failed is not None:
        return error(503, f"{state.failed}; the server's state on disk is consistent: its operator must restart it")
    address = request.remote or "unknown"
    if request.path in PUBLIC:
        if request.path in OPERATOR and not state.operator_may_read(request):
            return error(403, "the operator's views answer this machine, or a caller with the operator's token "
                              "(--operator-token-file)")
        wait = state.rates.anonymous_request(address)
    else:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        client_id = state.store.authenticate(token.strip()) if scheme.lower() == "bearer" else None
        if client_id is None or client_id not in state.trainer.clients:
            wait = state.rates.anonymous_request(address)  # guessing tokens costs the guesser's address
            if wait is None:
                return error(401, "missing or invalid bearer token")
        else:
            request[CLIENT] = client_id
            state.trainer.touch(client_id)
            wait = state.rates.client_request(client_id)
    if wait is not None:
        return error(429, f"too many requests: try again in {wait:.1f} s",
                     headers={"Retry-After": str(max(1, math.ceil(wait)))})
    if too_large(state, request):
        return await answer_and_close(request, error(413, f"request body over the limit of {state.limit} bytes"))
    try:
        return await handler(request)
    except WireError as e:
        return error(400, str(e))
    except web.HTTPRequestEntityTooLarge:
        return error(413, f"request body over the limit of {state.limit} bytes")
    except web.HTTPException as e:
        if e.content_type == "application/json":
            raise
        allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None  # a 405 names what is allowed
        response = error(e.status, e.reason, allow)
        if e.status == 408:  # a sender too slow for its body
            return await answer_and_close(request, response)
        return response


async def expect_continue(request: web.Request) -> web.Response | None:
    """`Expect: 100-continue`: a body over the limit is refused before it is sent, not invited."""
    state: ServerState = request.app[STATE]
    if request.headers.get("Expect", "").lower() != "100-continue":
        return None  # another expectation: ignored (RFC 9110 lets a server), the request goes on as usual
    if too_large(state, request):
        return await answer_and_close(request, error(413, f"request body over the limit of {state.limit} bytes"))
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the answer proper has not started
    return None


class ServerState:
    """Everything the handlers share: store, trainer, the open round and its replies."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.store = Store(cfg.state)
        self.model_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        self.trainer = self.model_thread.submit(ServerTrainer, cfg, self.store).result()
        self.round = self.store.current_round()
        self.round_started = time.time()
        self.limit = cfg.request_limit(self.trainer.dims.hidden, self._adapter_bytes())
        self.aggregating = asyncio.Lock()
        self.scores: dict[str, dict[Target, float]] = {}
        # Why the server stopped serving: a round's close failed half-way, and the weights in memory
        # may hold what the state on disk does not. A restart resumes from the disk, consistently.
        self.failed: str | None = None
        self.artifacts = ArtifactCache(cfg.state)
        self.monitor = Monitor(self)
        self.rates = RateLimits(cfg.rate_per_client, cfg.rate_per_address, int(cfg.probe_bytes_per_minute))
        self.operator_token = cfg.operator_token_file.read_text().strip() if cfg.operator_token_file else None
        if self.operator_token == "":
            raise ValueError(f"the operator token file {cfg.operator_token_file} is empty")
        # What a probe may ask for: one step's reply (its activations on the wire, with room for the
        # safetensors header), what a device measures its link with (`hsplitlora profile`).
        self.probe_limit = cfg.batch_size * cfg.max_len * self.trainer.dims.hidden * BYTES_PER_ELEMENT[cfg.wire] + 65536

    def operator_may_read(self, request: web.Request) -> bool:
        """The operators' views (/status, /metrics) answer this machine, and the operator's token."""
        if request.remote is not None and _loopback(request.remote):
            return True
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return (self.operator_token is not None and scheme.lower() == "bearer"
                and hmac.compare_digest(token.strip().encode(), self.operator_token.encode()))

    def _adapter_bytes(self) -> int:
        q = self.cfg.planner.rank_set[-1]
        return sum(8 * q * sum(self.trainer.dims.weight_shape(t.proj)) for t in self.trainer.targets)

    async def run_model(self, fn, *args):
        """fn(*args) on the model thread (the only thread that touches torch)."""
        return await asyncio.get_running_loop().run_in_executor(self.model_thread, fn, *args)

    async def maybe_aggregate(self, force: bool = False) -> None:
        """Aggregate the open round once enough clients uploaded and no other active client is still
        training it (or, forced at the deadline, with those that uploaded)."""
        async with self.aggregating:
            number = self.round
            uploaded = self.store.uploaded(number)
            if not uploaded or self.failed is not None:
                return
            if not force and (len(uploaded) < self.cfg.clients_per_round or self.trainer.mid_round(number, uploaded)):
                return
            log.info("round %d: aggregating %d client(s)", number, len(uploaded))
            try:
                with self.monitor.aggregation_seconds.time():
                    uploads = await self.run_model(self.store.uploads, number)
                    scores = {c: self.scores.get(c, {}) for c in uploads}
                    shared, plans = await self.run_model(self.trainer.aggregate, uploads, scores, number)
                    if shared is not None:
                        await self.run_model(self.store.save_tensors, round_update_file(number), shared)
                    self.store.complete_round(number, {c: plan.to_dict() for c, plan in plans.items()})
            except Exception as e:
                self.failed = f"closing round {number} failed ({type(e).__name__}: {e})"
                log.exception("%s: serving nothing until restarted (the state on disk is the round's before)",
                              self.failed)
                return
            self.round, self.round_started, self.scores = number + 1, time.time(), {}
            # The files of rounds past the retention go: disk stays bounded over a long run.
            try:
                await self.run_model(self.store.prune_rounds, number + 1 - self.cfg.keep_rounds)
            except OSError as e:  # the round is closed all the same; the next close tries again
                log.warning("round %d: deleting old rounds' files failed: %s", number, e)

    async def deadline_watch(self) -> None:
        """Close the round at its deadline; and once no active client holds it up any more (one
        that went idle mid-round)."""
        while True:
            await asyncio.sleep(1.0)
            try:
                await self.maybe_aggregate(force=time.time() - self.round_started > self.cfg.round_deadline_s)
            except Exception:  # logged, and tried again: the watch must outlive one failed close
                log.exception("round %d: closing it failed", self.round)

    def closed_without(self, round_number: int, client_id: str) -> web.Response:
        """409 for a step or upload of a closed round: one it took part in is over (it asks for its
        update); one that closed without it, it rejoins the open round."""
        if self.store.upload_of(round_number, client_id) is not None:
            return error(409, f"round {round_number} is closed and this client's adapters of it were accepted: "
                              f"ask for its update (GET {protocol.update_path(round_number)})")
        return web.json_response({"error": f"round {round_number} closed without this client (its deadline passed); "
                                           f"take the merged weights and train round {self.round}",
                                  "redo": protocol.REJOIN, "open_round": self.round}, status=409)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def settings(request: web.Request) -> web.Response:
    """The run's settings (model, batch, sequence length, wire...): what a device profiles itself for."""
    return web.json_response(request.app[STATE].cfg.client_settings().to_dict())


async def probe_download(request: web.Request) -> web.Response:
    """`bytes` random bytes, for a device measuring its download bandwidth (edge_sdk.profile).

    Capped at one step's reply, and at --probe-bytes-per-minute per address:
    a probe costs the server no more than a step does, and a stranger cannot make it a flood.
    """
    state: ServerState = request.app[STATE]
    size = _int_query(request, "bytes")
    if not 0 <= size <= state.probe_limit:
        return error(400, f"bytes must be in [0, {state.probe_limit}] (one step's reply)")
    wait = state.rates.probe_bytes(request.remote or "unknown", size)
    if wait is not None:
        return error(429, f"this address asked for more than --probe-bytes-per-minute of probes: try again in "
                          f"{wait:.1f} s", headers={"Retry-After": str(max(1, math.ceil(wait)))})
    return web.Response(body=os.urandom(size), content_type="application/octet-stream")


async def probe_upload(request: web.Request) -> web.Response:
    """Read and discard the body (at most the request limit); answer its size."""
    return web.json_response({"bytes": len(await _body(request))})


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def profile_problem(profile: dict, cfg: ServerConfig) -> str | None:
    """What is wrong with a registration profile's budgets and model, or None: budgets must be
    finite and positive, and a measured profile must be of this server's model (its per-block
    times are the model's). Its measurements are checked where they are read (`measured_device`)."""
    for key in ("memory_bytes", "flops_per_step", "step_seconds", "relative_speed"):
        value = profile.get(key)
        if value is None and key != "memory_bytes":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            return f"profile.{key} must be a finite number > 0, got {value!r}"
    measured_model = profile.get("model")
    if measured_model is not None and measured_model != cfg.model:
        return (f"the profile was measured on model {measured_model!r}; this server trains {cfg.model!r}: "
                f"run `hsplitlora profile --model {cfg.model}`")
    return None


async def register(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    try:
        body = protocol.parse_json(await _body(request))
        profile, examples = protocol.parse_registration(body)
        code = protocol.join_code(body)
    except ValueError as e:
        return error(400, str(e))
    if not state.cfg.open_registration and code is None:
        return error(403, "this server registers devices with a join code from its operator (`hsplitlora enroll`): "
                          'send {"join_code": "..."} with the registration')
    if state.store.client_count() >= state.cfg.max_clients:
        return error(403, f"this server has its maximum of {state.cfg.max_clients} clients")
    problem = profile_problem(profile, state.cfg)
    if problem:
        return error(400, problem)
    try:
        plan = await state.run_model(state.trainer.plan_for, profile)
    except PlanError as e:
        return error(422, str(e))
    except ValueError as e:  # a malformed measurement in a measured profile
        return error(400, str(e))
    if not state.cfg.open_registration and not state.store.redeem(code):
        return error(403, "the join code is unknown, used up or expired")
    client_id, token = state.store.register(profile, examples)
    record = state.store.client(client_id)
    await state.run_model(state.trainer.add_client, record, plan)
    state.store.set_plan(client_id, plan.to_dict())
    log.info("registered %s: split %d, %d device adapters", client_id, plan.split, len(plan.ranks))
    return web.json_response({
        "client_id": client_id, "number": record.number, "token": token, "round": state.round,
        "plan": plan.to_dict(), "settings": state.cfg.client_settings().to_dict(),
    })


async def _body(request: web.Request) -> bytes:
    """The request body, read within --read-timeout seconds: a sender slower than that is answered 408
    and its connection closed, so slow senders cannot hold the server's connections."""
    timeout = request.app[STATE].cfg.read_timeout_s
    try:
        return await asyncio.wait_for(request.read(), timeout)
    except asyncio.TimeoutError:
        raise web.HTTPRequestTimeout(reason=f"the body did not arrive within {timeout:g} s") from None


def _int_query(request: web.Request, name: str) -> int:
    if name not in request.query:
        raise web.HTTPBadRequest(reason=f"query parameter {name!r} (an integer) is required")
    return _bounded(request.query[name], name)


def _round_path(request: web.Request) -> int:
    return _bounded(request.match_info["round"], "the round")


def _bounded(text: str, name: str) -> int:
    try:
        return protocol.bounded_int(text, name)
    except ValueError as e:
        raise web.HTTPBadRequest(reason=str(e)) from None


async def me(request: web.Request) -> web.Response:
    """A client resuming with its token: its id, the open round, its plan and the settings."""
    state: ServerState = request.app[STATE]
    client = state.trainer.clients[request[CLIENT]]
    return web.json_response({"client_id": client.id, "number": client.number, "round": state.round,
                              "plan": client.plan.to_dict(),
                              "settings": state.cfg.client_settings().to_dict()})


async def step(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    client_id = request[CLIENT]
    round_number, step_number = _int_query(request, "round"), _int_query(request, "step")
    if round_number < state.round:
        return state.closed_without(round_number, client_id)
    if round_number != state.round:
        return error(409, f"round {round_number} is not the open round ({state.round})")
    if state.store.upload_of(round_number, client_id) is not None:
        return error(409, f"this client's adapters of round {round_number} were accepted: its steps are over; "
                          f"wait for the round's update")
    if not 0 <= step_number < state.cfg.local_steps:
        return error(400, f"step must be in [0, {state.cfg.local_steps})")
    body = await _body(request)
    try:
        reply, loss, trained = await state.run_model(_train_step, state, client_id, round_number, step_number, body)
    except RedoRound as e:
        return web.json_response({"error": str(e), "redo": protocol.REDO_ROUND}, status=409)
    except StepConflict as e:
        return error(409, str(e))
    if trained:
        state.store.record_step(round_number, client_id, step_number, loss)
    return web.Response(body=reply, content_type="application/octet-stream",
                        headers={Header.LOSS: repr(loss), Header.RETRIED: str(not trained).lower()})


def _train_step(state: ServerState, client_id: str, round_number: int, step_number: int,
                body: bytes) -> tuple[bytes, float, bool]:
    """Check a step's tensors, train on them and encode dL/dh: (reply body, loss, trained)."""
    start = time.perf_counter()
    cfg, dims = state.cfg, state.trainer.dims
    tensors = decode(body, protocol.step_specs(dims.hidden), state.limit)
    protocol.check_step(tensors, cfg.batch_size, cfg.max_len, dims.vocab)
    grad, loss, trained = state.trainer.step(client_id, round_number, step_number, tensors["h"],
                                             tensors["attention_mask"], tensors["labels"],
                                             hashlib.sha256(body).hexdigest())
    reply = encode({"grad": grad}, cfg.wire)
    if trained:
        state.monitor.step_seconds.observe(time.perf_counter() - start)
    else:
        state.monitor.retried.inc()
    return reply, loss, trained


async def upload_adapters(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    client_id = request[CLIENT]
    round_number = _round_path(request)
    body = await _body(request)
    digest = hashlib.sha256(body + request.headers.get(Header.IMPORTANCE, "").encode()).hexdigest()
    accepted = {"round": round_number, "accepted": True, "open_round": state.round}
    earlier = state.store.upload_of(round_number, client_id)
    if earlier is not None:  # a retry of an accepted upload is answered as it was; another body is not taken
        if earlier[1] == digest:
            return web.json_response(accepted, status=202)
        return error(409, f"this client's adapters of round {round_number} were already accepted (with another body)")
    if round_number < state.round:
        return state.closed_without(round_number, client_id)
    if round_number != state.round:
        return error(409, f"round {round_number} is not the open round ({state.round})")
    plan = state.trainer.clients[client_id].plan
    specs = protocol.adapter_specs(plan.ranks, state.trainer.dims.weight_shape)
    tensors = await state.run_model(decode, body, specs, state.limit)
    problem = await state.run_model(state.trainer.upload_problem, client_id, tensors)
    if problem:
        return error(400, f"adapters refused: {problem}")
    scores_header = request.headers.get(Header.IMPORTANCE)
    try:
        scores = protocol.decode_scores(scores_header) if scores_header else {}
    except ValueError as e:
        return error(400, str(e))
    foreign = sorted(str(t) for t in scores if t not in state.trainer.targets or t.layer >= plan.split)
    if foreign:
        return error(400, f"{Header.IMPORTANCE} scores weights that are not of this client's device blocks: "
                          f"{', '.join(foreign[:5])}")
    trained = state.trainer.steps_trained(client_id, round_number)
    if trained == 0:  # also after a restart that lost its steps: the SDK trains the round again
        return web.json_response({"error": f"this server has no trained step of this client in round {round_number}: "
                                           f"train the round from step 0, then upload", "redo": protocol.REDO_ROUND},
                                 status=409)
    if trained < state.cfg.local_steps:
        return error(409, f"{trained} of the round's {state.cfg.local_steps} steps were trained: upload after the last")

    def keep() -> None:
        # The server-side half is written first: an upload row only ever exists with both halves on disk.
        state.store.save_tensors(server_snapshot(round_number, client_id), state.trainer.server_state(client_id))
        state.store.record_upload(round_number, client_id, tensors, plan.split, digest)

    await state.run_model(keep)
    state.scores[client_id] = scores
    await state.maybe_aggregate()
    return web.json_response({**accepted, "open_round": state.round}, status=202)


async def round_update(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    client_id = request[CLIENT]
    round_number = _round_path(request)
    if round_number >= state.round:
        uploaded = len(state.store.uploaded(state.round))
        return web.json_response({"status": "waiting", "round": state.round, "uploaded": uploaded,
                                  "needed": state.cfg.clients_per_round}, status=202)
    upload, plan, update = state.store.upload_of(round_number, client_id), state.trainer.clients[client_id].plan, None
    if max(1, state.round - state.cfg.keep_rounds) <= round_number:
        # A client that did not take part has kept its plan: its split then is its split now.
        split_before = upload[0] if upload is not None and upload[0] is not None else plan.split
        update = await state.run_model(state.trainer.reply, client_id, round_number, split_before)
    if update is None:
        return error(404, f"no update of round {round_number} (the server keeps the last --keep-rounds "
                          f"{state.cfg.keep_rounds})")
    body = await state.run_model(encode, update.to_tensors(), "fp32")
    return web.Response(body=body, content_type="application/octet-stream",
                        headers={Header.PLAN: json.dumps(plan.to_dict()), Header.ROUND: str(state.round),
                                 Header.UPDATE: MERGE if state.trainer.strategy.merges else START})


async def deltas(request: web.Request) -> web.Response:
    """The merged deltas of the client's device blocks, for a device joining after round 1."""
    state: ServerState = request.app[STATE]
    split = state.trainer.clients[request[CLIENT]].plan.split

    def encoded() -> bytes:
        tensors = {Target.parse(k).key("delta"): v for k, v in state.trainer.deltas().items()
                   if Target.parse(k).layer < split}
        return encode(tensors, "fp32")

    return web.Response(body=await state.run_model(encoded), content_type="application/octet-stream")


async def artifact(request: web.Request) -> web.Response:
    """The exported device segment of the client's current plan: manifest and file URLs (built on first ask)."""
    state: ServerState = request.app[STATE]
    fmt = request.query.get("format", "")
    if fmt not in FORMATS:
        return error(400, f"query parameter format must be one of {', '.join(FORMATS)}")
    plan = state.trainer.clients[request[CLIENT]].plan
    if not any(t.layer < plan.split for t in plan.ranks):
        return error(409, "this client's plan has no device-side adapters: nothing to export; train with eager torch")
    cfg = state.cfg
    key = ArtifactKey.for_plan(cfg.model, plan, cfg.alpha, cfg.batch_size, cfg.max_len, fmt)
    try:
        manifest = await state.artifacts.ensure(key)
    except BuildError as e:
        log.error("%s", e)
        return error(500, str(e))
    return web.json_response(state.artifacts.describe(key.id, manifest, fmt))


async def artifact_file(request: web.Request) -> web.StreamResponse:
    """One file of a built artifact; Range requests resume an interrupted download."""
    state: ServerState = request.app[STATE]
    cfg, plan = state.cfg, state.trainer.clients[request[CLIENT]].plan
    own = {ArtifactKey.for_plan(cfg.model, plan, cfg.alpha, cfg.batch_size, cfg.max_len, fmt).id for fmt in FORMATS}
    path = state.artifacts.file(request.match_info["id"], request.match_info["name"])
    if path is None or request.match_info["id"] not in own:  # a client reads only its own plan's artifact
        return error(404, "no such artifact file for this client's plan")
    try:
        wanted = request.http_range
    except ValueError:
        return error(416, "the Range header is malformed")
    if wanted.start is not None and wanted.start >= path.stat().st_size:
        return error(416, f"the Range starts past the file's end ({path.stat().st_size} bytes)")
    return web.FileResponse(path)


async def openapi(request: web.Request) -> web.FileResponse:
    """The machine-readable contract of every route here (OpenAPI 3.1)."""
    return web.FileResponse(protocol.OPENAPI, headers={"Content-Type": "application/json"})


async def status(request: web.Request) -> web.Response:
    return web.json_response(snapshot(request.app[STATE]))


async def status_page(request: web.Request) -> web.Response:
    """The operators' HTML page (refreshes itself every 10 s)."""
    state: ServerState = request.app[STATE]
    return web.Response(text=render_status_page(state), content_type="text/html")


async def metrics(request: web.Request) -> web.Response:
    """Prometheus' text format: requests, step and aggregation times, the run's progress per client."""
    return request.app[STATE].monitor.exposition()


def make_app(cfg: ServerConfig) -> web.Application:
    """The application for a config (state is loaded, or created, under cfg.state)."""
    state = ServerState(cfg)
    # keepalive_timeout also closes a connection whose request headers do not arrive in time (aiohttp
    # counts a connection idle until its headers are complete): the header timeout.
    app = web.Application(middlewares=[state.monitor.middleware, errors_and_auth], client_max_size=state.limit,
                          handler_args={"keepalive_timeout": cfg.header_timeout_s,
                                        "logger": BrokenHttpLog(logging.getLogger("aiohttp.server"))})
    app[STATE] = state
    for method, route, handler in [
        ("GET", Route.HEALTH, healthz), ("GET", Route.OPENAPI, openapi), ("GET", Route.SETTINGS, settings),
        ("GET", Route.PROBE, probe_download), ("POST", Route.PROBE, probe_upload), ("POST", Route.REGISTER, register),
        ("POST", Route.STEPS, step), ("PUT", Route.ADAPTERS, upload_adapters), ("GET", Route.UPDATE, round_update),
        ("GET", Route.DELTAS, deltas), ("GET", Route.ME, me), ("GET", Route.ARTIFACT, artifact),
        ("GET", Route.ARTIFACT_FILE, artifact_file), ("GET", Route.STATUS, status),
        ("GET", Route.STATUS_PAGE, status_page), ("GET", Route.METRICS, metrics),
    ]:
        add = {"GET": app.router.add_get, "POST": app.router.add_post, "PUT": app.router.add_put}[method]
        add(route, handler, expect_handler=expect_continue)
    app.on_response_prepare.append(state.monitor.on_response_prepare)

    async def start_watch(app: web.Application) -> None:
        app[WATCH] = asyncio.create_task(state.deadline_watch())

    async def stop_watch(app: web.Application) -> None:
        app[WATCH].cancel()
        state.model_thread.shutdown()
        state.store.close()

    app.on_startup.append(start_watch)
    app.on_cleanup.append(stop_watch)
    return app
