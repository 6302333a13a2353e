"""Kill the server process for real (SIGKILL) and start it again on the same state directory."""

import asyncio
import json
import os
import signal
import urllib.request

from app.demo import free_port
from conftest import server_process
from edge_sdk.client import AsyncClient
from hsplitlora.data import load_e2e_train, shard
from hsplitlora.federation.protocol import update_path


def _start(state, port):
    return server_process(state, port, "--model", "tiny-llama", "--clients-per-round", "2", "--local-steps", "2",
                          "--batch-size", "2", "--max-len", "400")


def _status(url):
    with urllib.request.urlopen(url + "/v1/status", timeout=10) as r:
        return json.loads(r.read())


def test_a_killed_server_resumes_at_the_last_round_and_keeps_accepted_uploads(tmp_path, e2e_dir):
    shards = shard(load_e2e_train(e2e_dir)[:100], 2, iid=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start(tmp_path / "state", port)
    try:
        async def first_life():
            a, b = AsyncClient(url, shards[0], 12e6), AsyncClient(url, shards[1], 40e6)
            await asyncio.gather(a.run(1), b.run(1))  # round 1 completes
            deltas = (tmp_path / "state" / "deltas" / "merged.safetensors").read_bytes()
            # Round 2: only A uploads; then the server dies before B does.
            task = asyncio.create_task(a.train_round())
            while _status(url)["uploaded"] < 1:
                await asyncio.sleep(0.2)
            os.kill(server.pid, signal.SIGKILL)
            server.wait()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await a.close()
            return a.token, b.token, deltas, {a.client_id: True, b.client_id: False}

        token_a, token_b, deltas, uploaded = asyncio.run(first_life())
        server = _start(tmp_path / "state", port)
        status = _status(url)
        assert (status["round"], status["completed_rounds"], status["uploaded"]) == (2, 1, 1)
        assert {c["id"]: c["uploaded"] for c in status["clients"]} == uploaded
        assert (tmp_path / "state" / "deltas" / "merged.safetensors").read_bytes() == deltas

        async def second_life():
            b = AsyncClient(url, shards[1], 40e6, token=token_b)
            await b.register()
            assert b.round == 2
            await b.run(1)  # B's upload completes round 2 with A's upload from before the kill
            a = AsyncClient(url, shards[0], 12e6, token=token_a)
            await a.register()
            status_code, _, _ = await a.transport.request("GET", update_path(2), expect=(200, 202))
            await a.close()
            return status_code, a.round

        code, round_a = asyncio.run(second_life())
        assert code == 200 and round_a == 3
        assert _status(url)["completed_rounds"] == 2
    finally:
        server.kill()
        server.wait()


def test_a_client_mid_round_when_the_server_restarts_trains_the_round_again(tmp_path, e2e_dir):
    """The server keeps a round's server-side training in memory until the upload: after a kill
    mid-round it answers the client's next step 409 `redo: round`, and the SDK trains the round
    again from step 0 instead of failing or training on a half-lost state."""
    from edge_sdk.transport import HttpTransport

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    state = tmp_path / "state"

    def start():
        return server_process(state, port, "--model", "tiny-llama", "--clients-per-round", "1", "--local-steps", "3",
                              "--batch-size", "2", "--max-len", "400")

    servers = [start()]

    sent = []

    class KillAfterFirstStep(HttpTransport):
        killed = False

        async def step(self, round_number, step, tensors, wire):
            sent.append(step)
            reply = await super().step(round_number, step, tensors, wire)
            if not self.killed:
                self.killed = True
                os.kill(servers[-1].pid, signal.SIGKILL)
                servers[-1].wait()
                servers.append(start())
            return reply

    try:
        async def main():
            client = AsyncClient(KillAfterFirstStep(url, backoff_s=0.1), load_e2e_train(e2e_dir)[:20], 40e6)
            return await client.run(1)

        reports = asyncio.run(main())
        status = _status(url)
    finally:
        for proc in servers:
            proc.kill()
            proc.wait()
    assert len(servers) == 2 and status["completed_rounds"] == 1
    assert reports[0].round == 1 and len(reports[0].losses) == 3
    assert sent == [0, 1, 0, 1, 2]  # step 1 after the restart was refused (redo), then the round from step 0


def test_the_upload_that_closed_a_round_retried_after_a_restart_gets_its_first_answer(tmp_path, e2e_dir):
    """Upload digests rest in SQLite with the upload: the same body after a restart is the 202 it
    was, another body a 409."""
    import aiohttp
    import torch

    from conftest import running_server, server_config
    from hsplitlora.federation.protocol import adapters_path, steps_path
    from hsplitlora.wire import encode

    cfg = server_config(tmp_path, clients_per_round=1)

    async def main():
        async with running_server(cfg) as (url, state), aiohttp.ClientSession() as s:
            async with s.post(url + "/v1/register", json={"profile": {"memory_bytes": 40e6}, "examples": 4}) as r:
                joined = await r.json()
            auth = {"Authorization": f"Bearer {joined['token']}"}
            d = state.trainer.dims.hidden
            for step in range(cfg.local_steps):
                body = encode({"h": torch.randn(1, 8, d), "attention_mask": torch.ones(1, 8, dtype=torch.long),
                               "labels": torch.full((1, 8), 5, dtype=torch.long)})
                async with s.post(url + steps_path(1, step), data=body, headers=auth) as r:
                    assert r.status == 200
            adapters = {}
            for key, rank in joined["plan"]["ranks"].items():
                d_in, d_out = state.trainer.dims.weight_shape(key.split(".")[1])
                adapters[f"{key}.A"], adapters[f"{key}.B"] = torch.ones(rank, d_in) * 1e-3, torch.zeros(d_out, rank)
            upload = encode(adapters)
            async with s.put(url + adapters_path(1), data=upload, headers=auth) as r:
                first = (r.status, await r.json())
            assert state.round == 2  # it closed the round
        async with running_server(cfg) as (url, state), aiohttp.ClientSession() as s:
            async with s.put(url + adapters_path(1), data=upload, headers=auth) as r:
                again = (r.status, await r.json())
            async with s.put(url + adapters_path(1), data=encode({k: v * 2 for k, v in adapters.items()}),
                             headers=auth) as r:
                other = r.status
        return first, again, other

    first, again, other = asyncio.run(main())
    assert first[0] == 202 and again[0] == 202 and again[1]["round"] == 1 and other == 409


def test_a_close_cut_short_stops_the_server_and_a_restart_closes_the_round_once(tmp_path, e2e_dir):
    """The round's new weights are staged beside the old and take their place only with the SQLite
    commit that closes the round: when that commit fails (here: the disk refuses it), the server
    stops serving (503) instead of going on with weights its disk does not hold, and a restart
    closes the round again from the uploads, merging it exactly once."""
    import aiohttp
    import torch

    from conftest import running_server, server_config
    from edge_sdk.client import AsyncClient
    from hsplitlora.federation.protocol import Route
    from server.store import MERGED_DELTAS, PENDING, round_update_file

    cfg = server_config(tmp_path, clients_per_round=1)

    async def main():
        async with running_server(cfg) as (url, state):
            def refuse(*_):
                raise OSError(28, "No space left on device")

            state.store.complete_round = refuse
            client = AsyncClient(url, load_e2e_train(e2e_dir)[:20], memory_budget=40e6)
            task = asyncio.create_task(client.run(1))
            while state.failed is None:
                await asyncio.sleep(0.1)
            async with aiohttp.ClientSession() as s, s.get(url + Route.HEALTH) as r:
                failed = (r.status, (await r.json())["error"])
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.close()
            staged = (cfg.state / (MERGED_DELTAS + PENDING)).is_file()
        async with running_server(cfg) as (url, state):
            on_disk = (cfg.state / MERGED_DELTAS).is_file(), (cfg.state / (MERGED_DELTAS + PENDING)).is_file()
            reopened = state.round
            while state.round == 1:  # the deadline watch closes it: its one upload is the quorum
                await asyncio.sleep(0.2)
            update = state.store.load_tensors(round_update_file(1))
            deltas = state.trainer.deltas()
        return failed, staged, on_disk, reopened, update, deltas

    failed, staged, on_disk, reopened, update, deltas = asyncio.run(main())
    assert failed[0] == 503 and "No space left" in failed[1]
    assert staged and on_disk == (False, False)  # the staged weights were dropped at the restart
    assert reopened == 1
    merged = {}
    for key, value in update.items():
        target, kind = key.rsplit(".", 1)
        merged.setdefault(target, {})[kind] = value
    for target, ab in merged.items():  # once: the deltas are the round's B @ A, not twice that
        assert torch.allclose(deltas[target], ab["B"] @ ab["A"], atol=1e-6), target
