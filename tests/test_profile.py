"""The device profiler, the link probe, and the calibrated cost model against a real process."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import aiohttp
import pytest

from conftest import running_server
from edge_sdk.profile import DeviceProfile, measure_link, profile_device
from hsplitlora.cost import ModelDims, StepShape
from hsplitlora.models import load_model
from hsplitlora.predict import DeviceRates, predict_step
from server.config import ServerConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from calibration import expand_ranks, run_worker

BATCH, SEQ = 4, 64


def tiny_server(tmp_path, **kw):
    """A real tiny-llama server at the tests' batch x seq."""
    return running_server(ServerConfig(model="tiny-llama", state=tmp_path / "state", batch_size=BATCH, max_len=SEQ,
                                       open_registration=True, **kw))


@pytest.fixture(scope="module")
def profile() -> DeviceProfile:
    """tiny-llama profiled once (no link) at the tests' batch x seq, one thread."""
    return profile_device("tiny-llama", BATCH, SEQ, threads=1)


def test_profiler_returns_sane_positive_measurements(profile):
    dims = ModelDims.from_config(load_model("tiny-llama")[0].config)
    assert profile.flops_fp32 > 1e8, f"fp32 matmul at {profile.flops_fp32:.3g} FLOP/s: not a real measurement"
    assert 0 < profile.seconds_per_block <= 2 * profile.seconds_per_adapted_block
    assert profile.allocator_overhead >= 1.0
    for rate in (profile.flops_fp16, profile.flops_bf16):
        assert rate is None or rate >= profile.flops_fp32 / 2, "a half-precision rate under half fp32's is reported"
    assert profile.seconds_per_adapted_block < 1.0
    assert 0 < profile.memory_bytes <= profile.available_memory_bytes
    assert profile.memory_bytes == pytest.approx(0.8 * profile.available_memory_bytes)
    assert 50 * 2**20 < profile.baseline_rss_bytes < 4 * 2**30, "runtime baseline is not a process's RSS"
    assert set(profile.saved_bytes_per_adapter) == set(dims.projections)
    # A frozen block saves at least its input and the MLP's intermediates for the input gradient.
    assert profile.saved_bytes_frozen_block >= BATCH * SEQ * (dims.hidden + dims.intermediate) * 4
    # Adapting q makes autograd keep q's input (the normed hidden state) besides its r-wide intermediate.
    assert profile.saved_bytes_per_adapter["q"] == BATCH * SEQ * dims.hidden * 4
    assert (profile.batch, profile.seq, profile.threads, profile.rtt_s) == (BATCH, SEQ, 1, None)


def test_profile_json_round_trips_and_a_missing_key_is_named(profile):
    text = json.dumps(profile.to_dict())
    assert DeviceProfile.from_dict(json.loads(text)) == profile
    data = profile.to_dict()
    del data["flops_fp32"]
    with pytest.raises(ValueError, match="flops_fp32"):
        DeviceProfile.from_dict(data)
    rates = DeviceRates.from_profile(json.loads(text))
    assert rates.seconds_per_block == profile.seconds_per_block and rates.profiled_tokens == BATCH * SEQ


def test_probe_endpoint_gives_bandwidth_and_refuses_oversized_probes(tmp_path):
    async def main():
        async with tiny_server(tmp_path) as (url, state):
            up, down, rtt = await measure_link(url, state.probe_limit)  # one step's reply: what a profile measures
            async with aiohttp.ClientSession() as s:
                async with s.get(url + "/v1/probe", params={"bytes": "1234"}) as r:
                    got = await r.read()
                async with s.post(url + "/v1/probe", data=b"x" * 5000) as r:
                    size = (await r.json())["bytes"]
                async with s.get(url + "/v1/probe", params={"bytes": str(state.probe_limit + 1)}) as r:
                    too_big = r.status
                async with s.post(url + "/v1/probe", data=b"x" * (state.limit + 1)) as r:
                    too_big_up = r.status
            return up, down, rtt, got, size, too_big, too_big_up

    up, down, rtt, got, size, too_big, too_big_up = asyncio.run(main())
    assert up > 1e6 and down > 1e6, f"loopback bandwidth {up:.3g} up / {down:.3g} down B/s is implausibly low"
    assert 0 < rtt < 0.5
    assert len(got) == 1234 and size == 5000
    assert (too_big, too_big_up) == (400, 413)


def test_registration_with_a_measured_profile_gets_a_plan(tmp_path, profile):
    async def main():
        async with tiny_server(tmp_path) as (url, _):
            async with aiohttp.ClientSession() as s:
                async with s.post(url + "/v1/register", json={"profile": profile.to_dict(), "examples": 10}) as r:
                    return r.status, await r.json()

    status, reply = asyncio.run(main())
    assert status == 200, reply
    assert reply["plan"]["split"] >= 1 and reply["plan"]["ranks"]
    assert reply["plan"]["predicted_memory"]["total"] <= profile.memory_bytes


def test_prediction_matches_a_real_client_process_on_a_tiny_model(tmp_path, profile):
    """Loose bounds (memory +-35 %, time within a factor 3): the machine is shared and noisy."""
    dims = ModelDims.from_config(load_model("tiny-llama")[0].config)
    split, spec = 3, "all=8"

    async def main():
        async with tiny_server(tmp_path) as (url, _):
            link = await measure_link(url, BATCH * SEQ * dims.hidden * 2)
            # A blocking subprocess: in a thread, so that this loop keeps serving its probes.
            measured = await asyncio.to_thread(run_worker, "tiny-llama", split, spec, 6, 1, BATCH, SEQ, url)
            return link, measured

    (up, down, rtt), measured = asyncio.run(main())
    linked = dataclasses.replace(profile, upload_bytes_per_s=up, download_bytes_per_s=down, rtt_s=rtt)
    ranks = expand_ranks(spec, dims.projections, dims.layers, split)
    pred = predict_step(DeviceRates.from_profile(linked.to_dict()), dims, split, ranks, StepShape(BATCH, SEQ))
    seconds = statistics.median(measured["step_seconds"])
    memory_error = pred.peak_rss_bytes / measured["peak_rss_bytes"] - 1
    assert abs(memory_error) < 0.35, (f"peak RSS predicted {pred.peak_rss_bytes / 2**20:.0f} MiB, measured "
                                      f"{measured['peak_rss_bytes'] / 2**20:.0f} MiB")
    assert 1 / 3 < pred.seconds / seconds < 3, f"step time predicted {pred.seconds:.4f} s, measured {seconds:.4f} s"


# ----- planning from a profile, end to end ------------------------------------------------------
def _cli(*args: str):
    """`hsplitlora ...` as a real process (for use inside the loop that serves the test's server)."""
    return asyncio.create_subprocess_exec(sys.executable, "-m", "app", *args, stdout=asyncio.subprocess.PIPE,
                                          stderr=asyncio.subprocess.PIPE)


async def _finish(proc) -> tuple[int, str, str]:
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


def test_a_client_plans_from_its_profile_within_its_budgets_and_refuses_a_plan_that_does_not_fit(tmp_path):
    """`hsplitlora profile` against a real server; a client process registering with that profile
    and a step-time budget gets the deepest split its predictions allow, trains a round; resumed
    with a memory budget its plan exceeds, it refuses to start; an impossible budget gets a 422."""
    data = tmp_path / "device.jsonl"  # short examples: the tests' sequences are 64 tokens
    data.write_text("".join(json.dumps({"prompt": f"name[Pub {i}] ->", "completion": f" Pub {i} is a pub."}) + "\n"
                            for i in range(8)))
    dims = ModelDims.from_config(load_model("tiny-llama")[0].config)
    out = tmp_path / "profile.json"

    async def main():
        async with tiny_server(tmp_path, local_steps=2) as (url, state):
            code, printed, err = await _finish(await _cli(
                "profile", "--model", "tiny-llama", "--server", url, "--batch-size", str(BATCH),
                "--max-len", str(SEQ), "--threads", "1", "--out", str(out)))
            assert code == 0, err
            profile = DeviceProfile.load(out)
            rates = DeviceRates.from_profile(profile.to_dict())
            # A step-time budget that takes two blocks and no more: the planner keeps a quarter in
            # reserve when it chooses the split, and seconds grow by a whole block per split.
            two = predict_step(rates, dims, 2, {}, StepShape(BATCH, SEQ)).seconds
            budget = two / (1 - state.cfg.planner.reserve) * 1.001
            client = ["client", "--server", url, "--data", str(data), "--profile", str(out), "--threads", "1",
                      "--rounds", "1", "--progress-json"]
            code, events, err = await _finish(await _cli(*client, "--step-time-budget", repr(budget)))
            assert code == 0, err
            registered = json.loads(events.splitlines()[0])
            async with aiohttp.ClientSession() as s:
                async with s.get(url + "/v1/status") as r:
                    status = await r.json()
            # Resumed with a memory budget 1 MiB under its plan's predicted peak: refused, and why.
            refused = await _finish(await _cli(
                *client, "--token", registered["token"], "--memory-budget",
                str(registered["predicted_peak_rss_bytes"] - 2**20)))
            # Profiled at start (the model and batch from /v1/settings), with a budget no plan meets.
            auto = [a if a != str(out) else "auto" for a in client]
            impossible = await _finish(await _cli(*auto, "--step-time-budget", "1e-9"))
            return profile, printed, budget, registered, status, refused, impossible

    profile, printed, budget, registered, status, refused, impossible = asyncio.run(main())
    assert "GFLOP/s" in printed and "link" in printed and f"written to {out}" in printed
    assert profile.model == "tiny-llama" and profile.upload_bytes_per_s > 0 and profile.rtt_s > 0
    assert registered["split"] == 2, registered
    assert registered["predicted_step_s"] <= budget
    assert registered["predicted_peak_rss_bytes"] <= profile.memory_bytes
    [me] = status["clients"]
    assert me["measured"] and me["split"] == 2 and me["step_seconds_budget"] == pytest.approx(budget)
    assert me["predicted_step_s"] <= budget  # the plan after the round's re-plan, within the same budget
    code, _, err = refused
    assert code == 2 and "refuses its plan" in err and "predicted to peak at" in err, err
    code, events, err = impossible
    assert json.loads(events.splitlines()[0])["profile"]["model"] == "tiny-llama"
    assert code == 2 and "422" in err and "s per step" in err, err


def test_registration_refuses_a_malformed_or_foreign_profile(tmp_path, profile):
    bad = {
        "a NaN rate": {**profile.to_dict(), "flops_fp32": float("nan")},
        "a negative block time": {**profile.to_dict(), "seconds_per_block": -1.0},
        "another model's profile": {**profile.to_dict(), "model": "smollm2-135m"},
        "a zero step-time budget": {**profile.to_dict(), "step_seconds": 0},
        "a step-time budget without measurements": {"memory_bytes": 1e9, "step_seconds": 1.0},
    }

    async def main():
        async with tiny_server(tmp_path) as (url, state):
            replies = {}
            async with aiohttp.ClientSession() as s:
                for name, body in bad.items():
                    # json.dumps writes NaN as a bare token, as a careless client would send it.
                    async with s.post(url + "/v1/register", data=json.dumps({"profile": body, "examples": 4}),
                                      headers={"Content-Type": "application/json"}) as r:
                        replies[name] = (r.status, (await r.json())["error"])
            return replies, len(state.store.clients())

    replies, registered = asyncio.run(main())
    assert registered == 0, "a refused registration left a client behind"
    for name, (code, message) in replies.items():
        assert code in (400, 422), (name, code, message)
    assert "flops_fp32" in replies["a NaN rate"][1]
    assert "seconds_per_block" in replies["a negative block time"][1]
    assert "smollm2-135m" in replies["another model's profile"][1]
    assert "needs the device's measurements" in replies["a step-time budget without measurements"][1]
