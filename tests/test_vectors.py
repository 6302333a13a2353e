"""The shared protocol test vectors (hsplitlora/federation/vectors/): the committed files are what
tests/vectors.py builds, a real server answers every case as index.json says, and the Python client
(transport, update arithmetic, eager runtime) is held to them."""

from __future__ import annotations

import asyncio
import json
import math
from contextlib import asynccontextmanager

import aiohttp
import pytest
import torch
from aiohttp import web

from conftest import running_server, server_config, serving
from edge_sdk.runtimes import TorchRuntime
from edge_sdk.transport import HttpTransport
from hsplitlora.federation import protocol
from hsplitlora.federation.protocol import VECTORS, Header, Route, Update
from hsplitlora.lora import Target, lora_layer
from hsplitlora.models import load_dims, load_model
from hsplitlora.wire import WireError, decode, encode
from vectors import SCORES, build_vectors, compare, step_tensors

BIG = 1 << 30
INDEX = json.loads((VECTORS / "index.json").read_text())
CASES = INDEX["cases"]
VALID_STEP_FILES = {c["body"] for c in CASES if c["path"].startswith(Route.STEPS) and c["status"] == 200}


def read(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


def tensor_header(data: bytes) -> tuple[dict, dict]:
    """({name: {dtype, shape}}, metadata) of a safetensors payload, read as another language would."""
    n = int.from_bytes(data[:8], "little")
    head = json.loads(data[8:8 + n])
    meta = head.pop("__metadata__", {})
    return {k: {"dtype": v["dtype"], "shape": v["shape"]} for k, v in sorted(head.items())}, meta


def cfg_for_index(tmp_path):
    return server_config(tmp_path, **INDEX["settings"], **INDEX["server"])


def upload_body(plan: dict) -> bytes:
    """The adapter upload index.json's `adapter_upload` describes, for the plan the server answered."""
    ranks = {Target.parse(k): r for k, r in plan["ranks"].items()}
    specs = protocol.adapter_specs(ranks, load_dims(INDEX["model"]).weight_shape)
    gen = torch.Generator().manual_seed(0)
    return encode({k: torch.randn(s.shape, generator=gen) * 0.01 for k, s in specs.items()}, "fp32")


# ----- the files ------------------------------------------------------------------------------


def test_the_committed_vectors_are_exactly_what_the_generator_builds():
    assert compare() == [], "run: python tests/vectors.py --write"
    assert set(build_vectors()) == {p.name for p in VECTORS.iterdir()}


def test_index_describes_every_body_and_the_protocol_code_judges_each_as_the_index_says():
    dims = load_dims(INDEX["model"])
    settings = INDEX["settings"]
    for case in CASES:
        if case["body"] is None:
            assert case["body_built"] == "adapter_upload"
            continue
        data = read(case["body"])
        if "body_tensors" in case:
            assert tensor_header(data) == (case["body_tensors"], {"wire": case["name"].split("-")[1]}), case["name"]
        if case["body"] in VALID_STEP_FILES and case["status"] != 200:
            continue  # a valid body refused for its path, query or token
        try:
            tensors = decode(data, protocol.step_specs(dims.hidden), BIG)
            protocol.check_step(tensors, settings["batch_size"], settings["max_len"], dims.vocab)
        except WireError as e:
            assert case["status"] == 400 and case["error"] in str(e), (case["name"], str(e))
        else:
            assert case["status"] == 200, case["name"]
    for kind, spec in INDEX["updates"].items():
        assert tensor_header(read(spec["file"])) == (spec["tensors"], {"wire": "fp32"}), kind
    assert tensor_header(read(INDEX["updates"]["merge"]["dense"]))[0] == INDEX["updates"]["merge"]["dense_tensors"]


def test_a_merge_update_is_the_dense_changes_of_the_vector_exactly_and_a_start_update_parses():
    merge = Update.from_tensors("merge", decode(read("update-merge.safetensors"), None, BIG))
    dense = decode(read("update-merge-dense.safetensors"), None, BIG)
    got = {str(t): d for t, d in merge.dense().items()}
    assert got.keys() == dense.keys() and all(torch.equal(got[k], dense[k]) for k in dense)
    assert [str(t) for t in merge.deltas] == ["2.k"]
    start = Update.from_tensors("start", decode(read("update-start.safetensors"), None, BIG))
    assert {str(t): a.shape[0] for t, (a, _) in start.factors.items()} == INDEX["updates"]["start"]["ranks"]
    with pytest.raises(ValueError):
        start.dense()


def test_the_importance_header_vector_reads_back_and_the_malformed_ones_are_refused():
    importance = INDEX["importance"]
    assert protocol.encode_scores(SCORES) == importance["header"]
    assert protocol.decode_scores(importance["header"]) == {Target.parse(k): v for k, v in importance["scores"].items()}
    for label, value in importance["malformed"].items():
        with pytest.raises(ValueError, match=Header.IMPORTANCE):
            protocol.decode_scores(value)


def test_an_eager_runtime_changes_each_weight_by_exactly_the_merge_vectors_dense_change():
    model, _ = load_model(INDEX["model"])  # fresh: this test changes its weights
    ranks = {Target.parse(k): r for k, r in INDEX["updates"]["start"]["ranks"].items()}
    runtime = TorchRuntime.from_model(model, 2, ranks, alpha=INDEX["settings"]["alpha"])
    dense = decode(read("update-merge-dense.safetensors"), None, BIG)
    targets = [Target(layer, p) for layer in range(2) for p in load_dims(INDEX["model"]).projections]
    before = {t: lora_layer(model, t).weight_slice(t.proj).detach().clone() for t in targets}
    runtime.apply_merged_update(dense)
    for t in targets:
        after = lora_layer(model, t).weight_slice(t.proj)
        expected = before[t] + dense[str(t)] if str(t) in dense else before[t]
        assert torch.equal(after, expected), t
    # A start update sets the device's LoRA tensors.
    start = decode(read("update-start.safetensors"), None, BIG)
    runtime.set_lora_tensors(start)
    live = runtime.lora_tensors()
    assert live.keys() == start.keys() and all(torch.equal(live[k], start[k]) for k in start)


# ----- a live server --------------------------------------------------------------------------


def test_a_live_server_answers_every_case_as_the_index_says_and_a_refusal_changes_nothing(tmp_path):
    replies: dict[str, bytes] = {}

    async def main():
        async with running_server(cfg_for_index(tmp_path)) as (url, state), aiohttp.ClientSession() as s:
            async with s.get(url + Route.SETTINGS) as r:
                assert await r.json() == INDEX["settings"]
            reg = INDEX["registration"]
            async with s.request(reg["method"], url + reg["path"], json=reg["json"]) as r:
                assert r.status == reg["status"]
                joined = await r.json()
            assert sorted(joined) == sorted(reg["reply_keys"]) and joined["settings"] == reg["reply_settings"]
            client_id, token, upload = joined["client_id"], joined["token"], upload_body(joined["plan"])

            def server_side():
                factors = state.trainer.clients[client_id].factors
                return {t: (f.A.detach().clone(), f.B.detach().clone()) for t, f in factors.items()}

            async def view():
                async with s.get(url + Route.STATUS) as r:
                    return await r.json(), state.store.steps_trained(), dict(state.store.losses(1)), server_side()

            for case in CASES:
                name = case["name"]
                headers = {k: v.replace("{token}", token) for k, v in case["headers"].items()}
                body = read(case["body"]) if case["body"] else upload
                seen = await view()
                async with s.request(case["method"], url + case["path"], data=body, headers=headers) as r:
                    status, reply, reply_headers = r.status, await r.read(), r.headers
                after = await view()
                assert status == case["status"], (name, status, reply[:300])
                if status >= 400:
                    assert reply_headers["Content-Type"].startswith("application/json"), name
                    assert case["error"] in json.loads(reply)["error"], (name, reply)
                    assert after[:3] == seen[:3], name
                    assert seen[3].keys() == after[3].keys() and all(
                        torch.equal(seen[3][t][i], after[3][t][i]) for t in seen[3] for i in (0, 1)), name
                    continue
                expect = case["reply"]
                if "json" in expect:
                    assert json.loads(reply) == expect["json"], name
                    continue
                assert tensor_header(reply) == (expect["tensors"], expect["metadata"]), name
                shape = tuple(expect["tensors"]["grad"]["shape"])
                grad = decode(reply, protocol.grad_specs(shape), BIG)["grad"]
                assert grad.abs().sum() > 0, name
                for key, value in expect["headers"].items():
                    assert reply_headers[key] == value, (name, key)
                assert all(math.isfinite(float(reply_headers[k])) for k in expect["number_headers"]), name
                retried = expect["headers"][Header.RETRIED] == "true"
                assert after[1] == seen[1] + (0 if retried else 1), name
                if "same_as" in expect:
                    assert reply == replies[expect["same_as"]], name
                replies[name] = reply
            assert state.store.steps_trained() == 3 and state.store.uploaded(1) == [client_id]

    asyncio.run(main())
    assert len(replies) == 4


@asynccontextmanager
async def recording_proxy(target: str):
    """A tiny aiohttp server on 127.0.0.1 that forwards every request to `target` and keeps what
    it received: (method, path with query, headers, body)."""
    seen: list[tuple[str, str, dict, bytes]] = []
    hop = {"host", "content-length", "transfer-encoding", "connection", "date", "server", "content-encoding"}
    session = aiohttp.ClientSession(auto_decompress=False)

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append((request.method, request.path_qs, dict(request.headers), body))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in hop}
        async with session.request(request.method, target + request.path_qs, data=body, headers=headers) as r:
            reply = await r.read()
            return web.Response(status=r.status, body=reply,
                                headers={k: v for k, v in r.headers.items() if k.lower() not in hop})

    app = web.Application(client_max_size=BIG)
    app.router.add_route("*", "/{tail:.*}", forward)
    try:
        async with serving(app) as url:
            yield url, seen
    finally:
        await session.close()


def test_the_python_client_sends_the_vectors_bytes_to_a_live_server(tmp_path):
    hidden = INDEX["dims"]["hidden"]
    tensors = decode(read("step-fp32.safetensors"), protocol.step_specs(hidden), BIG)  # the exact step
    assert all(torch.equal(tensors[k], v) for k, v in step_tensors().items())
    steps = [c for c in CASES if c["name"] in ("step-fp16", "step-fp32", "step-int8")]

    async def main():
        async with running_server(cfg_for_index(tmp_path)) as (url, state), recording_proxy(url) as (proxy, seen):
            transport = HttpTransport(proxy, retries=0)
            try:
                joined = await transport.register(INDEX["registration"]["json"]["profile"],
                                                  INDEX["registration"]["json"]["examples"])
                assert seen[-1][3] == json.dumps(INDEX["registration"]["json"]).encode()
                for case in steps:
                    wire = case["name"].split("-")[1]
                    step = int(case["path"].rsplit("=", 1)[1])
                    grad, loss, up, down = await transport.step(1, step, tensors, wire)
                    method, path, headers, body = seen[-1]
                    assert (method, path) == (case["method"], case["path"]), case["name"]
                    assert headers["Authorization"] == case["headers"]["Authorization"].replace("{token}",
                                                                                              joined["token"])
                    assert headers["Content-Type"] == case["headers"]["Content-Type"]
                    assert body == read(case["body"]), f"{case['name']}: the client's body is not the vector's bytes"
                    assert up == len(body) and tuple(grad.shape) == tuple(tensors["h"].shape) and math.isfinite(loss)
                ranks = {Target.parse(k): r for k, r in joined["plan"]["ranks"].items()}
                specs = protocol.adapter_specs(ranks, load_dims(INDEX["model"]).weight_shape)
                adapters = {k: torch.zeros(s.shape) for k, s in specs.items()}
                await transport.upload(1, adapters, SCORES)
                method, path, headers, body = seen[-1]
                assert (method, path) == ("PUT", protocol.adapters_path(1))
                assert headers[Header.IMPORTANCE] == INDEX["importance"]["header"]
                assert body == encode(adapters, "fp32")
            finally:
                await transport.close()
            return state.store.steps_trained(), state.store.uploaded(1)

    trained, uploaded = asyncio.run(main())
    assert trained == 3 and len(uploaded) == 1
