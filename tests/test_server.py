"""A real aiohttp server on 127.0.0.1 with real SDK clients, on a tiny model."""

import asyncio

import aiohttp
import pytest
import torch

from conftest import one_client, running_server, server_config as _cfg
from edge_sdk.client import AsyncClient, ServerError
from hsplitlora.data import load_e2e_train, shard
from hsplitlora.lora import lora_layer
from hsplitlora.wire import encode


def test_two_clients_train_rounds_and_end_with_the_servers_merged_weights(tmp_path, e2e_dir):
    shards = shard(load_e2e_train(e2e_dir)[:200], 2, iid=False)

    async def main():
        async with running_server(_cfg(tmp_path)) as (url, state):
            clients = [AsyncClient(url, shards[0], memory_budget=12e6), AsyncClient(url, shards[1], memory_budget=40e6)]
            reports = await asyncio.gather(*(c.run(rounds=2) for c in clients))
            assert state.store.completed_rounds() == 2 and state.round == 3
            merged = state.trainer.deltas()
            for c in clients:
                mine = c.device_deltas()
                assert mine and all(t.layer < c.plan.split for t in mine)
                for t, delta in mine.items():
                    assert torch.allclose(delta, merged[str(t)], atol=1e-6), (c.client_id, t)
                    weight = lora_layer(c.model, t).weight_slice(t.proj)  # what the device computes with
                    assert torch.allclose(weight, lora_layer(state.trainer.model, t).weight_slice(t.proj), atol=1e-6)
            async with aiohttp.ClientSession() as s, s.get(url + "/v1/status") as r:
                status = await r.json()
            return reports, status, clients

    reports, status, clients = asyncio.run(main())
    assert all(len(r) == 2 and all(len(x.losses) == 2 for x in r) for r in reports)
    assert len(status["clients"]) == 2 and status["completed_rounds"] == 2
    assert clients[0].plan.split <= clients[1].plan.split


def test_bad_requests_are_refused_with_4xx_and_change_nothing(tmp_path, e2e_dir):
    async def main():
        async with one_client(tmp_path, load_e2e_train(e2e_dir)[:20]) as (url, state, client, auth):
            server_client = state.trainer.clients[client.client_id]
            d = state.trainer.dims.hidden
            good = {"h": torch.randn(1, 8, d), "attention_mask": torch.ones(1, 8, dtype=torch.long),
                    "labels": torch.full((1, 8), 5, dtype=torch.long)}
            nan = dict(good, h=good["h"].clone())
            nan["h"][0, 0, 0] = float("nan")
            cases = {
                "garbage": (b"not tensors", 400, "safetensors"),
                "wrong hidden size": (encode(dict(good, h=torch.randn(1, 8, d + 1))), 400, "shape"),
                "NaN": (encode(nan), 400, "NaN"),
                "bad labels": (encode(dict(good, labels=torch.full((1, 8), 10**6, dtype=torch.long))), 400, "labels"),
                "oversize": (b"\0" * (state.limit + 10), 413, "limit"),
            }
            results = {}
            async with aiohttp.ClientSession() as s:
                for name, (body, want, text) in cases.items():
                    async with s.post(f"{url}/v1/steps?round=1&step=0", data=body, headers=auth) as r:
                        results[name] = (r.status, (await r.json())["error"], want, text)
                async with s.post(f"{url}/v1/steps?round=7&step=0", data=encode(good), headers=auth) as r:
                    results["wrong round"] = (r.status, (await r.json())["error"], 409, "open round")
                async with s.post(f"{url}/v1/steps?round=1&step=0", data=encode(good),
                                  headers={"Authorization": "Bearer nope"}) as r:
                    results["bad token"] = (r.status, (await r.json())["error"], 401, "token")
                async with s.post(f"{url}/v1/register", data=b"{}") as r:
                    results["bad registration"] = (r.status, (await r.json())["error"], 400, "memory_bytes")
                refused_left_nothing = server_client.round is None and not server_client.digests
                # A retried step is answered again, not trained twice.
                first = await s.post(f"{url}/v1/steps?round=1&step=0", data=encode(good), headers=auth)
                after_first = {t: f.A.detach().clone() for t, f in server_client.factors.items()}
                second = await s.post(f"{url}/v1/steps?round=1&step=0", data=encode(good), headers=auth)
                retried = (first.headers["X-Retried"], second.headers["X-Retried"], await first.read() == await second.read())
                changed_by_retry = any(not torch.equal(after_first[t], f.A) for t, f in server_client.factors.items())
            return results, retried, changed_by_retry, refused_left_nothing, state.store.losses(1)

    results, retried, changed_by_retry, refused_left_nothing, losses = asyncio.run(main())
    for name, (status, message, want, text) in results.items():
        assert status == want and text in message, (name, status, message)
    assert retried == ("false", "true", True) and not changed_by_retry and refused_left_nothing
    assert len(losses) == 1  # only the one good step was recorded


def test_registration_beyond_the_minimum_budget_is_refused_with_the_reason(tmp_path, e2e_dir):
    async def main():
        async with running_server(_cfg(tmp_path)) as (url, _):
            client = AsyncClient(url, load_e2e_train(e2e_dir)[:4], memory_budget=1000)
            try:
                with pytest.raises(ServerError, match="422"):
                    await client.register()
            finally:
                await client.close()

    asyncio.run(main())


def test_projections_option_limits_the_adapters_on_both_sides_and_a_foreign_one_refuses_to_start(tmp_path, e2e_dir):
    from hsplitlora.planner import PlannerConfig
    from server.trainer import ServerTrainer

    async def main():
        cfg = _cfg(tmp_path, clients_per_round=1, planner=PlannerConfig(candidates=("q", "v")))
        async with running_server(cfg) as (url, state):
            client = AsyncClient(url, load_e2e_train(e2e_dir)[:8], memory_budget=40e6)
            try:
                await client.register()
                server_side = state.trainer.server_ranks(client.client_id)
            finally:
                await client.close()
        return client.plan, server_side

    plan, server_side = asyncio.run(main())
    assert plan.ranks and {t.proj for t in plan.ranks} <= {"q", "v"}
    assert server_side and {t.proj for t in server_side} == {"q", "v"}
    with pytest.raises(ValueError, match="'qkv' does not exist"):
        ServerTrainer(_cfg(tmp_path / "other", planner=PlannerConfig(candidates=("q", "qkv"))), None)


@pytest.mark.parametrize("method", ["splitlora", "hetlora", "flexlora"])
def test_non_merging_methods_keep_weights_frozen_and_continue_from_the_aggregated_factors(tmp_path, e2e_dir, method):
    from hsplitlora.aggregation import AGGREGATORS, ClientUpdate
    from hsplitlora.federation.protocol import tensors_to_factors
    from hsplitlora.federation.strategies import strategy
    from server.store import GLOBAL_ADAPTER, server_snapshot, upload_file

    shards = shard(load_e2e_train(e2e_dir)[:200], 2, iid=False)

    async def main():
        async with running_server(_cfg(tmp_path, method=method)) as (url, state):
            before = {t: lora_layer(state.trainer.model, t).weight_slice(t.proj).clone() for t in state.trainer.targets}
            # hetlora / flexlora devices hold every block (their plans say so, and a client refuses a plan
            # over its budget): they need more memory than a split device.
            budgets = (40e6, 60e6) if strategy(method).whole_model else (12e6, 40e6)
            clients = [AsyncClient(url, shards[i], memory_budget=budgets[i]) for i in range(2)]
            await asyncio.gather(*(c.run(rounds=1) for c in clients))
            starts = [dict(c.start) for c in clients]
            await asyncio.gather(*(c.run(rounds=1) for c in clients))  # round 2 starts from them
            assert state.store.completed_rounds() == 2
            for t, w in before.items():  # W never changes: the global model is W + the global adapter
                assert torch.equal(lora_layer(state.trainer.model, t).weight_slice(t.proj), w)
            return clients, starts, state

    clients, starts, state = asyncio.run(main())
    store, alpha = state.store, state.cfg.alpha
    # Round 1 again, from what the server kept on disk: every participant's device and server factors.
    updates = {}
    for c in clients:
        halves = {**store.load_tensors(upload_file(1, c.client_id)),
                  **store.load_tensors(server_snapshot(1, c.client_id))}
        for t, (a, b) in tensors_to_factors(halves).items():
            updates.setdefault(t, []).append(ClientUpdate(c.client_id, a, b, alpha / a.shape[0], float(len(c.examples))))
    assert starts[0] and starts[1]
    for i, c in enumerate(clients):
        for key, value in starts[i].items():
            t = key[:-2]
            expected = AGGREGATORS[strategy(method).aggregator](updates[next(u for u in updates if str(u) == t)]).client_factors[c.client_id]
            assert torch.allclose(value, expected[0 if key.endswith(".A") else 1], atol=1e-6), (method, c.client_id, key)
    assert store.load_tensors(GLOBAL_ADAPTER)


def test_a_client_that_misses_a_round_takes_the_servers_merged_weights(tmp_path, e2e_dir):
    """A's upload closes round 1; round 2 (B alone) closes before A asks for its update: A then
    goes on from round 3 with the server's weights, round 2's merge included."""
    from edge_sdk.transport import HttpTransport

    shards = shard(load_e2e_train(e2e_dir)[:200], 2, iid=False)
    b_done = asyncio.Event()

    class LateForTheUpdate(HttpTransport):
        async def wait_update(self, round_number):
            await b_done.wait()
            return await super().wait_update(round_number)

    async def main():
        async with running_server(_cfg(tmp_path, clients_per_round=1)) as (url, state):
            a = AsyncClient(LateForTheUpdate(url), shards[0], memory_budget=40e6)
            task = asyncio.create_task(a.train_round())
            while state.round < 2:
                await asyncio.sleep(0.05)
            b = AsyncClient(url, shards[1], memory_budget=40e6)
            await b.run(rounds=1)  # round 2 closes without A
            b_done.set()
            await task
            await a.close()
            return a, state.trainer.deltas(), state.round

    a, merged, open_round = asyncio.run(main())
    assert a.round == open_round == 3
    mine = a.device_deltas()
    assert mine and all(torch.allclose(d, merged.get(str(t), torch.zeros_like(d)), atol=1e-6) for t, d in mine.items())
