"""Rounds that strangers cannot steer, on a real server: a round waits for the active clients in
it, closes without idle ones and at its deadline, a client it closed without rejoins the open
round, a round writes its update once and costs what its participants cost."""

import asyncio
import time

import aiohttp
import torch

from conftest import one_client, running_server, server_config
from edge_sdk.client import AsyncClient
from edge_sdk.transport import HttpTransport
from hsplitlora.data import load_e2e_train, shard
from hsplitlora.federation.protocol import REDO_ROUND, REJOIN, Route, adapters_path, steps_path
from hsplitlora.wire import encode


def _step(d: int) -> bytes:
    return encode({"h": torch.randn(1, 8, d), "attention_mask": torch.ones(1, 8, dtype=torch.long),
                   "labels": torch.full((1, 8), 5, dtype=torch.long)})


async def _register(s: aiohttp.ClientSession, url: str) -> dict:
    async with s.post(url + Route.REGISTER, json={"profile": {"memory_bytes": 40e6}, "examples": 4}) as r:
        assert r.status == 200
        return await r.json()


def test_a_round_waits_for_the_active_clients_in_it_and_writes_its_update_once(tmp_path, e2e_dir):
    shards = shard(load_e2e_train(e2e_dir)[:100], 2, iid=True)

    async def main():
        # One upload is the quorum, but the other client is training the round: it is waited for.
        async with running_server(server_config(tmp_path, clients_per_round=1)) as (url, state):
            clients = [AsyncClient(url, shards[0], memory_budget=12e6), AsyncClient(url, shards[1], memory_budget=40e6)]
            try:
                reports = await asyncio.gather(*(c.run(rounds=1) for c in clients))
            finally:
                for c in clients:
                    await c.close()
            return reports, state.store.uploaded(1), state.store.completed_rounds(), sorted(
                p.name for p in (tmp_path / "state" / "rounds" / "1").iterdir())

    reports, uploaded, completed, files = asyncio.run(main())
    assert completed == 1 and len(uploaded) == 2 and all(r[0].round == 1 for r in reports)
    # Per participant its upload and its server-side snapshot; the update once for all.
    assert len(files) == 2 * 2 + 1 and "update.safetensors" in files


def test_an_idle_client_is_not_waited_for_and_is_told_to_rejoin_the_open_round(tmp_path, e2e_dir):
    async def main():
        cfg = server_config(tmp_path, clients_per_round=1, idle_expiry_s=1.5)
        async with running_server(cfg) as (url, state), aiohttp.ClientSession() as s:
            idle = await _register(s, url)
            auth = {"Authorization": f"Bearer {idle['token']}"}
            async with s.post(url + steps_path(1, 0), data=_step(state.trainer.dims.hidden), headers=auth) as r:
                assert r.status == 200  # it is in round 1 now, and goes quiet
            client = AsyncClient(url, load_e2e_train(e2e_dir)[:20], memory_budget=40e6)
            start = time.monotonic()
            try:
                await client.run(rounds=1)  # its upload waits for the idle one, until it expires
            finally:
                await client.close()
            waited = time.monotonic() - start
            active_then = [c.id for c in state.trainer.active()]
            async with s.post(url + steps_path(1, 1), data=_step(state.trainer.dims.hidden), headers=auth) as r:
                late = (r.status, await r.json())
            async with s.put(url + adapters_path(1), data=b"", headers=auth) as r:
                late_upload = (r.status, await r.json())
            active_now = [c.id for c in state.trainer.active()]
            return waited, active_then, active_now, idle["client_id"], late, late_upload, state.store.uploaded(1)

    waited, active_then, active_now, idle_id, late, late_upload, uploaded = asyncio.run(main())
    assert waited >= 1.0 and idle_id not in uploaded and len(uploaded) == 1
    assert late[0] == 409 and late[1]["redo"] == REJOIN and late[1]["open_round"] == 2
    assert late_upload[0] == 409 and late_upload[1]["redo"] == REJOIN
    assert idle_id not in active_then and idle_id in active_now  # planning left it out until it was back


class _LateTransport(HttpTransport):
    """A real transport that holds back step 1 of round 1 until that round has closed (a device
    that lost its network for a while)."""

    def __init__(self, url: str, state):
        super().__init__(url)
        self.state, self.held = state, False

    async def step(self, round_number, step, tensors, wire):
        if round_number == 1 and step == 1 and not self.held:
            self.held = True
            while self.state.round == round_number:
                await asyncio.sleep(0.2)
        return await super().step(round_number, step, tensors, wire)


def test_the_sdk_rejoins_the_open_round_when_its_round_closed_at_the_deadline(tmp_path, e2e_dir):
    shards = shard(load_e2e_train(e2e_dir)[:100], 2, iid=True)

    async def main():
        cfg = server_config(tmp_path, clients_per_round=2, round_deadline_s=2.0)
        async with running_server(cfg) as (url, state):
            on_time = AsyncClient(url, shards[0], memory_budget=40e6)
            late = AsyncClient(_LateTransport(url, state), shards[1], memory_budget=40e6)
            try:
                reports = await asyncio.gather(on_time.run(rounds=1), late.run(rounds=1))
            finally:
                await on_time.close()
                await late.close()
            return reports, state.store.uploaded(1), state.store.uploaded(2), on_time.client_id, late.client_id

    (first, second), round_1, round_2, on_time, late = asyncio.run(main())
    assert round_1 == [on_time] and round_2 == [late]  # round 1 closed at its deadline without the late one
    assert first[0].round == 1 and second[0].round == 2 and len(second[0].losses) == 2


def test_steps_after_the_upload_and_an_upload_without_steps_are_refused(tmp_path, e2e_dir):
    async def main():
        async with one_client(tmp_path, load_e2e_train(e2e_dir)[:20], clients_per_round=2) as (url, state, client, auth):
            d, out = state.trainer.dims.hidden, {}
            async with aiohttp.ClientSession() as s:
                upload = encode({k: v.clone() for k, v in client.rt.lora_tensors().items()})
                async with s.put(url + adapters_path(1), data=upload, headers=auth) as r:
                    out["no steps"] = (r.status, await r.json())
                async with s.post(url + steps_path(1, 0), data=_step(d), headers=auth) as r:
                    assert r.status == 200
                async with s.put(url + adapters_path(1), data=upload, headers=auth) as r:
                    out["one of two steps"] = (r.status, await r.json())
                async with s.post(url + steps_path(1, 1), data=_step(d), headers=auth) as r:
                    assert r.status == 200
                async with s.put(url + adapters_path(1), data=upload, headers=auth) as r:
                    out["all steps"] = r.status
                async with s.post(url + steps_path(1, 0), data=_step(d), headers=auth) as r:
                    out["step after upload"] = (r.status, await r.json())
            return out, state.store.steps_trained()

    out, trained = asyncio.run(main())
    assert out["no steps"][0] == 409 and out["no steps"][1]["redo"] == REDO_ROUND
    assert out["one of two steps"][0] == 409 and "1 of the round's 2 steps" in out["one of two steps"][1]["error"]
    assert out["all steps"] == 202
    assert out["step after upload"][0] == 409 and "accepted" in out["step after upload"][1]["error"]
    assert trained == 2


def test_a_round_costs_its_participants_not_the_registered_clients(tmp_path, e2e_dir):
    """1,000 registered clients, 32 of them in the round: only the 32 are planned again and
    written for, and the round's disk is what 32 participants write."""
    shards = shard(load_e2e_train(e2e_dir)[:320], 32, iid=True)

    def round_bytes(state, number):
        return sum(p.stat().st_size for p in (state.cfg.state / "rounds" / str(number)).iterdir())

    async def one_round(state, url, clients):
        try:
            await asyncio.gather(*(c.train_round() for c in clients))
        finally:
            for c in clients:
                await c.close()

    async def main():
        cfg = server_config(tmp_path, clients_per_round=32, local_steps=1)
        async with running_server(cfg) as (url, state), aiohttp.ClientSession() as s:
            clients = [AsyncClient(url, shards[i], memory_budget=40e6) for i in range(32)]
            for c in clients:
                await c.register()
            await one_round(state, url, clients)
            alone = round_bytes(state, 1)
            idle = [await _register(s, url) for _ in range(1000 - 32)]
            planned = []
            original = state.trainer.strategy.next_plan
            state.trainer.strategy.next_plan = lambda ctx, who: planned.append(who.index) or original(ctx, who)
            clients = [AsyncClient(url, shards[i], memory_budget=40e6, token=c.token) for i, c in enumerate(clients)]
            await one_round(state, url, clients)
            return alone, round_bytes(state, 2), len(planned), len(idle), state.store.client_count(), sorted(
                p.name for p in (state.cfg.state / "rounds" / "2").iterdir())

    alone, crowded, planned, idle, registered, files = asyncio.run(main())
    assert registered == 1000 and idle == 968
    assert planned == 32  # the participants, not the 1,000
    assert len(files) == 2 * 32 + 1
    assert crowded < 1.5 * alone  # the 32 participants' files (their ranks may change), not 1,000 replies
