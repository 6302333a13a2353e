import asyncio
import os
import sys

import pytest

from edge_sdk.cgroups import capped_cgroup
from hsplitlora.cost import StepShape
from app.demo import MIB, DemoConfig, DemoError, _run, run_demo
from hsplitlora.finetune import EvalConfig
from hsplitlora.models import load_dims
from hsplitlora.planner import Budget, MeasuredDevice, PlannerConfig, plan_device, uniform_importance
from hsplitlora.predict import DeviceRates


def test_demo_clients_differ_for_real_and_the_server_plans_each_from_what_it_measured(e2e_dir):
    """Server + 2 client processes on 127.0.0.1 (tiny model) with 1 and 2 threads and, where this
    machine lets the demo create cgroups, memory caps: each profiled itself with its threads under
    its cap, the server planned each from that profile, the smaller budget makes the smaller plan,
    and the test loss falls. (No step-time budget: the tiny model's block times are noise.)"""
    cfg = DemoConfig(model="tiny-llama", data=e2e_dir, clients=2, rounds=2, local_steps=2, max_len=400,
                     step_time_budget=None,
                     eval=EvalConfig(loss_items=2, generate_items=2, max_new_tokens=8, coco=False))
    result = run_demo(cfg)
    weak, strong = clients = result["clients"]
    assert result["status"]["completed_rounds"] == 2
    assert sorted(result["rounds"]) == [1, 2] and all(len(v) == 2 for v in result["rounds"].values())
    # Threads: as given, and what torch ran with when each client measured itself.
    assert [c["threads"] for c in clients] == [1, 2] == [c["profile"]["threads"] for c in clients]
    if result["memory_caps"]:
        for c in clients:
            assert c["declared_budget_mb"] is None
            assert 0 < c["available_mb"] < c["cap_mb"], f"{c['name']} measured {c['available_mb']:.0f} MiB free " \
                                                        f"under a cap of {c['cap_mb']:.0f} MiB"
            assert c["budget_mb"] == pytest.approx(c["profile"]["memory_bytes"] / MIB), "not the measured budget"
        # Both processes held the same when they measured: what they found differs as their caps do.
        assert strong["available_mb"] - weak["available_mb"] == pytest.approx(strong["cap_mb"] - weak["cap_mb"], abs=20)
    else:
        for c in clients:
            assert c["cap_mb"] is None and c["budget_mb"] == pytest.approx(c["declared_budget_mb"])
    assert weak["budget_mb"] < strong["budget_mb"] - 50
    # The server's split is the planner's for each client's own measurements and budget.
    dims, shape = load_dims("tiny-llama"), StepShape(cfg.batch_size, cfg.max_len)
    for c in clients:
        device = MeasuredDevice(DeviceRates.from_profile(c["profile"]))
        plan = plan_device(dims, uniform_importance(dims), Budget(c["budget_mb"] * MIB), shape, PlannerConfig(),
                           device=device)
        assert c["split"] == plan.split == c["memory_allows"], (c["name"], c["split"], plan.split)
        assert c["predicted_peak_rss_mb"] <= c["budget_mb"]
    # The smaller budget leaves out blocks or adapters that the larger one holds, unless it already
    # holds them all. Shown with one device's rates for both budgets: each process measures its own
    # allocator overhead, which for the tiny model moves between runs by more than the budgets' gap.
    rates = MeasuredDevice(DeviceRates.from_profile(strong["profile"]))
    weak_plan, strong_plan, top = (plan_device(dims, uniform_importance(dims), Budget(mb * MIB), shape,
                                               PlannerConfig(), device=rates)
                                   for mb in (weak["budget_mb"], strong["budget_mb"], 1e6))
    sizes = [(p.split, len(p.ranks)) for p in (weak_plan, strong_plan, top)]
    assert sizes[0] < sizes[1] or sizes[0] == sizes[1] == sizes[2], (sizes, clients)
    assert result["after"]["loss"] < result["before"]["loss"]


def test_a_process_killed_for_memory_under_its_cap_is_a_clear_demo_error(tmp_path):
    group = capped_cgroup(f"hsplitlora-test-{os.getpid()}", 200 * MIB)
    if group is None:
        pytest.skip("this process may not create memory cgroups here (not root, no delegated cgroup v2 subtree)")
    try:
        hog = [sys.executable, "-c", "blocks = [bytearray(50 * 2**20) for _ in range(20)]"]
        with pytest.raises(DemoError, match=r"client9 was killed for memory: it went over its cap of 200 MiB"):
            asyncio.run(_run("client9", hog, 1, group, tmp_path / "client9.log"))
    finally:
        group.remove()
