"""What one stranger with a token can no longer do to a federation (issue: a server strangers cannot
break): poison the shared weights through an overflowing int8 step or huge finite adapters, fail
the round, or have a step trained twice; and what a retry gets."""

import asyncio
import math

import aiohttp
import torch

from conftest import one_client, running_server, server_config
from edge_sdk.client import AsyncClient, ServerError
from hsplitlora.aggregation import exact_update, ClientUpdate
from hsplitlora.data import load_e2e_train, shard
from hsplitlora.federation.protocol import Header, adapters_path, steps_path
from hsplitlora.federation.round import Contribution, close_round
from hsplitlora.federation.strategies import strategy
from hsplitlora.importance import ImportanceTracker, all_targets
from hsplitlora.lora import Target, lora_layer
from hsplitlora.wire import encode


def _step(d: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"h": torch.randn(1, 8, d, generator=gen), "attention_mask": torch.ones(1, 8, dtype=torch.long),
            "labels": torch.full((1, 8), 5, dtype=torch.long)}


def _int8_overflow(d: int) -> bytes:
    """An int8 step whose parts are finite but whose product (values x 1e38 scales) is not."""
    from safetensors.torch import save

    tensors = _step(d)
    return save({"h": torch.full((1, 8, d), 100, dtype=torch.int8), "h.scale": torch.full((1, 8, 1), 1e38),
                 "attention_mask": tensors["attention_mask"], "labels": tensors["labels"]}, metadata={"wire": "int8"})


def test_poisoned_steps_and_uploads_are_refused_and_honest_clients_train_on(tmp_path, e2e_dir):
    shards = shard(load_e2e_train(e2e_dir)[:200], 2, iid=False)

    async def main():
        async with running_server(server_config(tmp_path)) as (url, state):
            base = {t: lora_layer(state.trainer.model, t).weight_slice(t.proj).clone() for t in state.trainer.targets}
            attacker, honest = AsyncClient(url, shards[0], memory_budget=12e6), AsyncClient(url, shards[1], memory_budget=40e6)
            await attacker.register()
            d = state.trainer.dims.hidden
            auth = {"Authorization": f"Bearer {attacker.token}"}
            out = {}
            async with aiohttp.ClientSession() as s:
                async with s.post(url + steps_path(1, 0), data=_int8_overflow(d), headers=auth) as r:
                    out["int8 overflow"] = (r.status, (await r.json())["error"])
                # Huge but finite: the activations pass the wire checks; the loss they give does not count.
                async with s.post(url + steps_path(1, 0), data=encode({**_step(d), "h": torch.full((1, 8, d), 3e38)},
                                                                      "fp32"), headers=auth) as r:
                    out["huge activations"] = (r.status, (await r.json()).get("error", ""))
                # Adapters of 1e3: finite, the right shapes, an update thousands of times its weight.
                huge = {}
                for t, rank in attacker.plan.ranks.items():
                    d_in, d_out = state.trainer.dims.weight_shape(t.proj)
                    huge[t.key("A")], huge[t.key("B")] = torch.full((rank, d_in), 1e3), torch.full((d_out, rank), 1e3)
                async with s.put(url + adapters_path(1), data=encode(huge), headers=auth) as r:
                    out["huge adapters"] = (r.status, (await r.json())["error"])
            await attacker.close()
            # The honest client and a well-behaved attacker round: both upload, the round closes.
            attacker2 = AsyncClient(url, shards[0], memory_budget=12e6, token=attacker.token)
            await asyncio.gather(honest.run(rounds=1), attacker2.run(rounds=1))
            weights = {t: lora_layer(state.trainer.model, t).weight_slice(t.proj) for t in state.trainer.targets}
            return out, base, weights, state.store.completed_rounds(), state.store.losses(1)

    out, base, weights, completed, losses = asyncio.run(main())
    assert out["int8 overflow"][0] == 400 and "dequantised" in out["int8 overflow"][1]
    assert out["huge activations"][0] in (200, 400)  # finite loss or refused: never a 500, never non-finite
    assert out["huge adapters"][0] == 400 and "over the limit" in out["huge adapters"][1]
    assert completed == 1 and all(math.isfinite(v) for v in losses.values())
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())
    change = max(float((weights[t] - base[t]).norm() / base[t].norm()) for t in base)
    assert 0 < change < 1.0  # the round merged, and only honest-sized updates


def test_a_step_is_trained_once_and_retries_get_the_first_answer(tmp_path, e2e_dir):
    async def main():
        async with one_client(tmp_path, load_e2e_train(e2e_dir)[:20]) as (url, state, client, auth):
            d = state.trainer.dims.hidden
            seen = {}
            async with aiohttp.ClientSession() as s:
                async def post(name, step, body):
                    async with s.post(url + steps_path(1, step), data=body, headers=auth) as r:
                        seen[name] = (r.status, r.headers.get(Header.RETRIED), await r.read())

                await post("first", 0, encode(_step(d, 0)))
                await post("retry", 0, encode(_step(d, 0)))
                await post("other body", 0, encode(_step(d, 1)))
                await post("next", 1, encode(_step(d, 2)))
                await post("older step", 0, encode(_step(d, 0)))
                trained = state.store.steps_trained()
                adapters = {}
                for t, rank in client.plan.ranks.items():
                    d_in, d_out = state.trainer.dims.weight_shape(t.proj)
                    adapters[t.key("A")], adapters[t.key("B")] = torch.zeros(rank, d_in), torch.zeros(d_out, rank)
                body = encode(adapters)
                uploads = []
                for b in (body, body, encode({k: v + 1e-3 for k, v in adapters.items()})):
                    async with s.put(url + adapters_path(1), data=b, headers=auth) as r:
                        uploads.append((r.status, await r.json()))
            return seen, trained, uploads, state.round

    seen, trained, uploads, open_round = asyncio.run(main())
    assert seen["first"][:2] == (200, "false")
    assert seen["retry"][:2] == (200, "true") and seen["retry"][2] == seen["first"][2]
    assert seen["other body"][0] == 409 and b"another body" in seen["other body"][2]
    assert seen["next"][:2] == (200, "false")
    assert seen["older step"][0] == 409 and b"already trained" in seen["older step"][2]
    assert trained == 2
    # The upload closed the round (one client per round); its retry gets its 202 again, another body 409.
    assert open_round == 2
    assert [u[0] for u in uploads] == [202, 202, 409]
    assert uploads[0][1]["round"] == uploads[1][1]["round"] == 1


def test_one_bad_contribution_is_left_out_and_the_round_still_aggregates_exactly(tiny):
    model, _ = tiny("tiny-llama")
    t = Target(0, "q")
    w = lora_layer(model, t).weight_slice(t.proj).detach().clone()
    gen = torch.Generator().manual_seed(0)
    a1, b1 = torch.randn(4, 32, generator=gen), torch.randn(32, 4, generator=gen) * 1e-3
    a2, b2 = torch.randn(4, 32, generator=gen), torch.randn(32, 4, generator=gen) * 0.01
    nan_b = b2.clone()
    nan_b[0, 0] = float("nan")
    limits = {target: float(lora_layer(model, target).weight_slice(target.proj).norm()) for target in all_targets(model)}
    contributions = [
        Contribution("honest", 10, {t: (a1, b1, 4.0)}),
        Contribution("nan", 10, {t: (a2, nan_b, 4.0)}),
        Contribution("huge", 10, {t: (a2 * 1e3, b2 * 1e3, 4.0)}),
        Contribution("bad scores", 10, {t: (a2, b2, 4.0)}, {t: float("inf")}),
    ]
    result = close_round(strategy("hsplitlora"), model, contributions, ImportanceTracker(), all_targets(model), 0.0,
                         limits)
    assert set(result.dropped) == {"nan", "huge", "bad scores"}
    assert "not finite" in result.dropped["nan"] and "over the limit" in result.dropped["huge"]
    want = exact_update([ClientUpdate("honest", a1, b1, 4.0, 10.0)]).dense()
    assert torch.allclose(lora_layer(model, t).weight_slice(t.proj) - w, want, atol=1e-6)
    # Nothing at all left: the round changes nothing and does not fail.
    before = lora_layer(model, t).weight_slice(t.proj).detach().clone()
    empty = close_round(strategy("hsplitlora"), model, contributions[1:2], ImportanceTracker(), all_targets(model),
                        0.0, limits)
    assert empty.dropped and not empty.merged and torch.equal(lora_layer(model, t).weight_slice(t.proj), before)


def _duplicate_key_step(d: int) -> bytes:
    """A valid step whose safetensors header names `labels` twice (safetensors keeps the last)."""
    import json as _json

    body = encode(_step(d), "fp32")
    size = int.from_bytes(body[:8], "little")
    header = _json.loads(body[8:8 + size])
    text = _json.dumps(header)[:-1] + ', "labels": ' + _json.dumps(header["labels"]) + "}"
    text += " " * ((8 - len(text) % 8) % 8)
    return len(text).to_bytes(8, "little") + text.encode() + body[8 + size:]


def test_input_is_taken_exactly_as_documented_and_every_refusal_is_json(tmp_path, e2e_dir):
    async def main():
        async with one_client(tmp_path, load_e2e_train(e2e_dir)[:20]) as (url, state, client, _):
            d = state.trainer.dims.hidden
            out = {}
            async with aiohttp.ClientSession() as s:
                async def call(name, method, path, **kw):
                    async with s.request(method, url + path, **kw) as r:
                        body = await r.read()
                        out[name] = (r.status, r.content_type, body)

                profile = {"memory_bytes": 15e6}
                for name, value in {"bool": True, "float": 2.5, "string": "5", "huge": 10**30, "1e30": 1e30}.items():
                    await call(f"examples {name}", "POST", "/v1/register", json={"profile": profile, "examples": value})
                await call("profile as pairs", "POST", "/v1/register",
                           json={"profile": [["memory_bytes", 15e6]], "examples": 4})
                await call("deep JSON", "POST", "/v1/register", data=b"[" * 100_000 + b"]" * 100_000)
                measured = {"memory_bytes": 15e6, "flops_fp32": 1e10, "model": "tiny-llama",
                            "seconds_per_block": 0.01, "baseline_rss_bytes": float("inf")}
                await call("infinite measurement", "POST", "/v1/register",
                           data=_json_with_infinity({"profile": measured, "examples": 4}))
                auth = {"Authorization": f"bearer {client.token}"}  # the scheme is case-insensitive
                await call("lowercase bearer", "GET", "/v1/me", headers=auth)
                await call("5000-digit round", "GET", f"/v1/rounds/{'9' * 5000}/update", headers=auth)
                await call("duplicate tensor name", "POST", steps_path(1, 0), data=_duplicate_key_step(d), headers=auth)
                zeros = {}
                for t, rank in client.plan.ranks.items():
                    d_in, d_out = state.trainer.dims.weight_shape(t.proj)
                    zeros[t.key("A")], zeros[t.key("B")] = torch.zeros(rank, d_in), torch.zeros(d_out, rank)
                server_target = next(str(t) for t in state.trainer.targets if t.layer >= client.plan.split)
                for name, header in {"bool score": '{"0.q": true}', "string score": '{"0.q": "1.5"}',
                                     "server-side target": f'{{"{server_target}": 1.0}}',
                                     "unknown target": '{"99.q": 1.0}'}.items():
                    await call(name, "PUT", adapters_path(1), data=encode(zeros),
                               headers={**auth, Header.IMPORTANCE: header})
            return out, state.store.completed_rounds(), len(state.store.clients())

    out, completed, clients = asyncio.run(main())
    assert out.pop("lowercase bearer")[0] == 200
    for name, (status, content_type, body) in out.items():
        assert 400 <= status < 500 and content_type == "application/json", (name, status, body[:200])
        assert status == 400, (name, status, body[:200])
    assert completed == 0 and clients == 1  # nothing refused registered a client or closed a round


def _json_with_infinity(obj) -> bytes:
    import json as _json

    return _json.dumps(obj).encode()  # Python writes Infinity, as a stranger may send it


def test_registration_needs_a_join_code_unless_the_operator_opens_it(tmp_path, e2e_dir):
    examples = load_e2e_train(e2e_dir)[:8]

    async def main():
        cfg = server_config(tmp_path, open_registration=False, max_clients=2)
        async with running_server(cfg) as (url, state):
            once = state.store.add_join_code(uses=1)
            twice = state.store.add_join_code(uses=2)
            expired = state.store.add_join_code(uses=5, expires_in_s=-1.0)
            outcomes = []
            for code in (None, "made-up", expired, once, once, twice, twice):
                client = AsyncClient(url, examples, memory_budget=15e6, join_code=code)
                try:
                    await client.register()
                    outcomes.append("registered")
                except ServerError as e:
                    outcomes.append(str(e).split(": ", 1)[1][:3])
                finally:
                    await client.close()
            return outcomes, state.store.client_count()

    outcomes, count = asyncio.run(main())
    # No code, an unknown or an expired one: 403; `once` works once; `twice` once more, then the cap of 2.
    assert outcomes == ["403", "403", "403", "registered", "403", "registered", "403"], outcomes
    assert count == 2


def test_enroll_prints_a_code_that_registers_one_device(tmp_path):
    import subprocess
    import sys

    from server.store import Store

    out = subprocess.run([sys.executable, "-m", "app", "enroll", "--state", str(tmp_path), "--uses", "1"],
                         capture_output=True, text=True, check=True)
    code = out.stdout.strip()
    store = Store(tmp_path)
    try:
        assert code and store.redeem(code) and not store.redeem(code)
    finally:
        store.close()


def test_a_client_reads_only_the_artifact_of_its_own_plan(tmp_path, e2e_dir):
    """Artifact ids are derived from plans, so they can be guessed: another plan's files are 404."""
    import json as _json

    from server.artifacts import ArtifactKey

    async def main():
        async with one_client(tmp_path, load_e2e_train(e2e_dir)[:8]) as (url, state, client, auth):
            cfg, plan = state.cfg, state.trainer.clients[client.client_id].plan
            other = ArtifactKey.for_plan(cfg.model, plan, cfg.alpha + 1, cfg.batch_size, cfg.max_len, "onnx").id
            mine = ArtifactKey.for_plan(cfg.model, plan, cfg.alpha, cfg.batch_size, cfg.max_len, "onnx").id
            for artifact_id in (other, mine):  # two built artifacts on disk (their contents do not matter here)
                directory = state.artifacts.directory(artifact_id)
                directory.mkdir(parents=True)
                (directory / "device_segment.onnx").write_bytes(b"weights")
                (directory / "manifest.json").write_text(_json.dumps(
                    {"artifacts": {"onnx": {"sha256": {"device_segment.onnx": "x"}}}}))
            async with aiohttp.ClientSession() as s:
                codes = []
                for artifact_id in (other, mine):
                    async with s.get(f"{url}/v1/artifacts/{artifact_id}/device_segment.onnx", headers=auth) as r:
                        codes.append(r.status)
                async with s.get(f"{url}/v1/artifacts/{mine}/device_segment.onnx",
                                 headers={**auth, "Range": "bytes=100-"}) as r:
                    codes.append((r.status, r.content_type))
            return codes

    assert asyncio.run(main()) == [404, 200, (416, "application/json")]


def test_a_sender_too_slow_for_its_body_is_answered_408_and_let_go(tmp_path, e2e_dir):
    import time

    async def main():
        async with one_client(tmp_path, load_e2e_train(e2e_dir)[:8], read_timeout_s=1.0) as (url, state, client, auth):
            host, port = url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            # Promise a 1000-byte body and send one byte a second.
            writer.write((f"POST {steps_path(1, 0)} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {auth['Authorization']}"
                          f"\r\nContent-Length: 1000\r\n\r\n").encode())
            await writer.drain()
            start = time.monotonic()

            async def trickle():
                for _ in range(10):
                    writer.write(b"x")
                    await writer.drain()
                    await asyncio.sleep(1.0)

            sender = asyncio.create_task(trickle())
            status_line = await asyncio.wait_for(reader.readline(), 8)
            rest = await asyncio.wait_for(reader.read(), 8)  # the server closes the connection
            seconds = time.monotonic() - start
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            writer.close()
            return status_line, rest, seconds, state.store.steps_trained()

    status_line, rest, seconds, trained = asyncio.run(main())
    assert b" 408 " in status_line and b'"error"' in rest and seconds < 5 and trained == 0


def test_old_rounds_files_are_pruned_past_the_retention(tmp_path, e2e_dir):
    async def main():
        cfg = server_config(tmp_path, clients_per_round=1, keep_rounds=2)
        async with running_server(cfg) as (url, state):
            client = AsyncClient(url, load_e2e_train(e2e_dir)[:20], memory_budget=15e6)
            await client.run(rounds=4)
            kept = sorted(int(d.name) for d in (cfg.state / "rounds").iterdir())
            async with aiohttp.ClientSession() as s:
                auth = {"Authorization": f"Bearer {client.token}"}
                async with s.get(url + "/v1/rounds/1/update", headers=auth) as r:
                    old = (r.status, (await r.json())["error"])
                async with s.get(url + "/v1/rounds/4/update", headers=auth) as r:
                    recent = r.status
            return kept, old, recent, state.store.completed_rounds()

    kept, old, recent, completed = asyncio.run(main())
    assert completed == 4 and kept == [3, 4]  # rounds 1 and 2 are gone; 5 is open and empty
    assert old[0] == 404 and "--keep-rounds" in old[1] and recent == 200
