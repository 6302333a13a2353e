"""`hsplitlora demo`: a server and K heterogeneous client processes on 127.0.0.1, end to end.

The demo is a supervisor: it starts `hsplitlora server` and `hsplitlora client` as separate
processes (each client gets only its own shard, as a file), shows one progress line per client,
then evaluates the merged model the server saved against the base model.

The clients differ for real, as devices do, and the server plans each from what it measured:

- threads: client i trains with 1 + i % max_threads torch threads (no more than the cores);
- memory: where this process may create cgroups (root, or a delegated cgroup v2 subtree), each
  client runs in its own memory cgroup, whose limit is its cap (`edge_sdk.cgroups`). The caps
  follow `simulate.device_budgets` (training memory, spread `budget_spread` times from 1.5x the
  least workable), each on top of what the client's runtime needs (`_caps`). Where cgroups are
  not writable, each client declares the same budget with --memory-budget and nothing enforces it;
- each client profiles itself (`hsplitlora profile` in its cgroup: FLOP/s and per-block seconds
  with its threads, the memory available under its cap, its link), one after another before any
  trains: profiled at once on a machine with fewer cores than clients, they measure each other
  (five on two cores: 4 to 7 times their per-block time alone). The server plans each from
  its profile; the memory budget is the profiler's share (80 %) of what it found available, and
  every client accepts the same seconds per step (`step_time_budget`), so fewer threads mean
  fewer blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from edge_sdk.cgroups import MemoryCgroup, available_memory, capped_cgroup
from hsplitlora.configs import option
from hsplitlora.cost import ModelDims, StepShape
from hsplitlora.data import load_examples, shard
from hsplitlora.finetune import evaluate, split_eval, spread
from hsplitlora.lora import Target, lora_layer
from hsplitlora.models import load_model
from hsplitlora.planner import Budget, MeasuredDevice, PlannerConfig, choose_split
from hsplitlora.predict import DeviceRates
from hsplitlora.report import metrics_table, table
from hsplitlora.simulate import FederationConfig, device_budgets
from server.store import MERGED_DELTAS, Store

log = logging.getLogger(__name__)
PY = [sys.executable, "-m", "app"]  # the `hsplitlora` command of this interpreter
MIB = 2**20


class DemoError(RuntimeError):
    """A process of the demo failed (the message says which, why, and where its log is)."""


@dataclass
class DemoConfig(FederationConfig):
    """`hsplitlora demo` options."""

    max_threads: int = option(2, help="clients get 1, 2, ... up to this many torch threads, in turn (capped by the cores)")
    # On this project's 2-core machine one thread fits 8 or 9 blocks of SmolLM2-135M in 1.2 s, two 15.
    step_time_budget: float | None = option(
        1.2, metavar="SECONDS", parse=lambda text: float(text) or None,
        help="seconds of one device step every client accepts, predicted from its profile; 0 for none")


@dataclass
class DemoClient:
    """One client process of the demo: what it was given and what it measured."""

    name: str
    threads: int
    training_bytes: float  # its share of `device_budgets`: training memory beyond the runtime
    cap_bytes: int | None = None  # the limit of its memory cgroup, where there is one
    cgroup: MemoryCgroup | None = None
    declared_bytes: float | None = None  # its --memory-budget where no cgroup enforces a cap
    profile: dict | None = None
    id: str | None = None

    def report(self, status: dict, dims: ModelDims, shape: StepShape) -> dict:
        """What it had, what it measured and the plan the server gave it (`status`: its /v1/status
        entry), with the split each of its budgets alone allows, by the server's planner."""
        p = self.profile
        device = MeasuredDevice(DeviceRates.from_profile(p))
        memory, seconds = status["budget_mb"] * MIB, status.get("step_seconds_budget")

        def split(budget: Budget) -> int:  # the split does not depend on importance without a compute share
            return choose_split(dims, {}, budget, shape, PlannerConfig(), device=device)

        return {"name": self.name, "id": self.id, "threads": self.threads, "cap_mb": _mib(self.cap_bytes),
                "declared_budget_mb": _mib(self.declared_bytes), "gflops_fp32": p["flops_fp32"] / 1e9,
                "ms_per_block": p["seconds_per_block"] * 1e3, "available_mb": p["available_memory_bytes"] / MIB,
                "memory_allows": split(Budget(memory)),
                "time_allows": None if seconds is None else split(Budget(float("inf"), step_seconds=seconds)),
                "profile": p, **status}


def _mib(n: float | None) -> float | None:
    return None if n is None else n / MIB


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc, timeout_s: float = 300.0, context=None) -> None:
    """Until the server process answers /healthz (over HTTPS with `context`, an ssl.SSLContext)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        code = proc.poll() if hasattr(proc, "poll") else proc.returncode  # subprocess or asyncio process
        if code is not None:
            raise RuntimeError(f"the server exited with status {code} before it was ready")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2, context=context):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the server did not answer {url}/healthz within {timeout_s:.0f} s")


def _env(threads: int) -> dict[str, str]:
    # The demo runs more threads than cores. OpenMP's default spin-waiting then burns the core a
    # descheduled peer thread needs: a 2-thread SmolLM2-135M block took 895 ms instead of 104 ms
    # with one core busy elsewhere. Passive waiting sleeps instead.
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}


def _failure(name: str, code: int, cgroup: MemoryCgroup | None, log_path: Path) -> DemoError:
    """Why a process of the demo failed: killed for memory under its cap, or the last line it wrote."""
    if cgroup is not None and cgroup.oom_kills():
        return DemoError(f"{name} was killed for memory: it went over its cap of {cgroup.limit() / MIB:.0f} MiB "
                         f"(cgroup {cgroup.path}); see {log_path}")
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    return DemoError(f"{name} failed (status {code}): {lines[-1] if lines else 'no output'}; see {log_path}")


async def _run(name: str, argv: list[str], threads: int, cgroup: MemoryCgroup | None, log_path: Path) -> None:
    """Run a process of the demo to its end (in `cgroup`, if any); DemoError if it fails."""
    with open(log_path, "wb") as out:
        proc = await asyncio.create_subprocess_exec(*(cgroup.command(argv) if cgroup else argv), env=_env(threads),
                                                    stdout=out, stderr=asyncio.subprocess.STDOUT)
        try:
            code = await proc.wait()
        finally:
            if proc.returncode is None:  # cancelled: the demo is failing elsewhere
                proc.kill()
                await proc.wait()
    if code != 0:
        raise _failure(name, code, cgroup, log_path)


def _profile_argv(cfg: DemoConfig, url: str | None, threads: int, out: Path) -> list[str]:
    link = ["--server", url] if url else []
    return [*PY, "profile", "--model", cfg.model, *link, "--batch-size", str(cfg.batch_size),
            "--max-len", str(cfg.max_len), "--threads", str(threads), "--out", str(out)]


async def _runtime_needs(cfg: DemoConfig, workdir: Path, prefix: str) -> dict | None:
    """What a client's runtime needs, to size the memory caps by (`_caps`); None where cgroups
    cannot be created. Measured by a profile under a cap far above what it needs: `held`, what a
    profiling process holds when it measures the memory available (the interpreter, torch), the
    runtime's `baseline` and the profiler's `fraction` of what is available it offers."""
    probe = capped_cgroup(f"{prefix}-calibration", available_memory() // 2)
    if probe is None:
        return None
    out = workdir / "calibration.profile.json"
    try:
        # Memory only, so no link: it runs while the server starts.
        await _run("the calibration profile", _profile_argv(cfg, None, 1, out), 1, probe, workdir / "calibration.log")
        limit = probe.limit()
    finally:
        probe.remove()
    reference = json.loads(out.read_text())
    return {"held": limit - reference["available_memory_bytes"], "baseline": reference["baseline_rss_bytes"],
            "fraction": reference["memory_fraction"]}


def _caps(clients: list[DemoClient], needs: dict, prefix: str) -> None:
    """Give each client a memory cgroup capped so that the budget its profile will measure there is
    its runtime's baseline plus its training budget: the profiler offers `fraction` of what is
    available when it starts, and by then its process already holds `held`."""
    for c in clients:
        c.cap_bytes = int(needs["held"] + (needs["baseline"] + c.training_bytes) / needs["fraction"])
        c.cgroup = capped_cgroup(f"{prefix}-{c.name}", c.cap_bytes)
        if c.cgroup is None:
            raise DemoError(f"created the calibration cgroup but not {c.name}'s (see the line above)")


async def _profile_clients(cfg: DemoConfig, clients: list[DemoClient], url: str, workdir: Path) -> None:
    """Each client's `hsplitlora profile`, one after another (module docstring), in its cgroup."""
    for c in clients:
        out = workdir / f"{c.name}.profile.json"
        cap = f", cap {c.cap_bytes / MIB:.0f} MiB" if c.cgroup else ""
        log.info("profiling %s (%d thread%s%s)", c.name, c.threads, "s" * (c.threads > 1), cap)
        await _run(f"{c.name}'s profile", _profile_argv(cfg, url, c.threads, out), c.threads, c.cgroup,
                   workdir / f"{c.name}.profile.log")
        c.profile = json.loads(out.read_text())
        if c.cgroup is None:
            c.declared_bytes = c.profile["baseline_rss_bytes"] + c.training_bytes


async def _supervise(cfg: DemoConfig, workdir: Path) -> dict:
    model_cfg = load_model(cfg.model)[0].config
    dims, shape = ModelDims.from_config(model_cfg), StepShape(cfg.batch_size, cfg.max_len)
    train, _ = split_eval(Path(cfg.data), load_examples(cfg.data), seed=0)
    shards = shard(train, cfg.clients, iid=False)
    budgets = device_budgets(dims, shape, cfg.clients, cfg.budget_spread, PlannerConfig())
    most = max(1, min(cfg.max_threads, os.cpu_count() or 1))
    clients = [DemoClient(f"client{i}", 1 + i % most, b.memory_bytes) for i, b in enumerate(budgets)]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    # Each device registers with a join code of its own, as an operator would give them out.
    store = Store(workdir / "state")
    codes = [store.add_join_code(uses=1) for _ in clients]
    store.close()
    # The server does most of the compute (every client's remaining blocks): torch's threads.
    server = await asyncio.create_subprocess_exec(
        *PY, "server", "--model", cfg.model, "--port", str(port), "--state", str(workdir / "state"),
        "--rounds", str(cfg.rounds), "--clients-per-round", str(cfg.clients), "--local-steps", str(cfg.local_steps),
        "--batch-size", str(cfg.batch_size), "--max-len", str(cfg.max_len),
        stdout=asyncio.subprocess.DEVNULL, stderr=open(workdir / "server.log", "wb"), env=_env(os.cpu_count() or 1))
    prefix = f"hsplitlora-demo-{os.getpid()}"
    measuring = asyncio.ensure_future(_runtime_needs(cfg, workdir, prefix))
    procs, bars, rounds = [], [], {}
    try:
        await asyncio.get_running_loop().run_in_executor(None, wait_healthy, url, server)
        log.info("server up: the run's status page is %s/status (Prometheus metrics at /metrics)", url)
        needs = await measuring
        if needs:
            _caps(clients, needs, prefix)
            log.info("memory caps: each client runs in its own cgroup v%d under %s, limited to %s MiB",
                     clients[0].cgroup.version, clients[0].cgroup.path.parent,
                     ", ".join(f"{c.cap_bytes / MIB:.0f}" for c in clients))
        else:
            log.info("memory caps: none (cgroups are not writable here); each client declares its budget with "
                     "--memory-budget, and nothing enforces it")
        await _profile_clients(cfg, clients, url, workdir)
        set_up = time.perf_counter() - started
        for i, (c, examples, code) in enumerate(zip(clients, shards, codes)):
            data = workdir / f"{c.name}.jsonl"
            data.write_text("".join(json.dumps({"prompt": e.prompt, "completion": e.completion}) + "\n"
                                    for e in examples))
            argv = [*PY, "client", "--server", url, "--join-code", code, "--data", str(data), "--threads", str(c.threads),
                    "--profile", str(workdir / f"{c.name}.profile.json"), "--rounds", str(cfg.rounds), "--progress-json"]
            if c.declared_bytes is not None:
                argv += ["--memory-budget", str(int(c.declared_bytes))]
            if cfg.step_time_budget is not None:
                argv += ["--step-time-budget", repr(cfg.step_time_budget)]
            procs.append(await asyncio.create_subprocess_exec(
                *(c.cgroup.command(argv) if c.cgroup else argv), stdout=asyncio.subprocess.PIPE,
                stderr=open(workdir / f"{c.name}.log", "wb"), env=_env(c.threads)))
            bars.append(tqdm(total=cfg.rounds * cfg.local_steps, desc=c.name, unit="step", position=i, leave=True))

        async def follow(i: int, proc) -> None:
            c = clients[i]
            async for line in proc.stdout:
                event = json.loads(line)
                if event["event"] == "registered":
                    c.id = event["client"]
                    bars[i].set_description(f"{c.name} split {event['split']:>2}")
                elif event["event"] == "step":
                    bars[i].update(1)
                    bars[i].set_postfix(round=event["round"], loss=f"{event['loss']:.3f}")
                elif event["event"] == "round":
                    rounds.setdefault(event["round"], []).append(event)
            if await proc.wait() != 0:
                raise _failure(c.name, proc.returncode, c.cgroup, workdir / f"{c.name}.log")

        try:
            await asyncio.gather(*(follow(i, p) for i, p in enumerate(procs)))
        finally:
            for bar in bars:
                bar.close()
        with urllib.request.urlopen(url + "/v1/status", timeout=10) as r:
            status = json.loads(r.read())
    finally:
        if not measuring.done():
            measuring.cancel()
            await asyncio.gather(measuring, return_exceptions=True)
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
        server.terminate()
        await server.wait()
        for c in clients:
            if c.cgroup is not None:
                c.cgroup.remove()
    by_id = {s["id"]: s for s in status["clients"]}
    caps = f"cgroup v{clients[0].cgroup.version}" if needs else None
    return {"status": status, "rounds": rounds, "memory_caps": caps, "step_time_budget": cfg.step_time_budget,
            "setup_seconds": set_up, "clients": [c.report(by_id[c.id], dims, shape) for c in clients]}


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo; returns plans, per-round numbers and before/after evaluation."""
    model, tokenizer = load_model(cfg.model)
    _, items = split_eval(Path(cfg.data), load_examples(cfg.data), seed=0)
    log.info("evaluating the base model before training")
    before = evaluate(model, tokenizer, items, cfg.eval, cfg.max_len)
    with tempfile.TemporaryDirectory(prefix="hsplitlora-demo-") as tmp:
        workdir = Path(tmp)
        started = time.perf_counter()
        run = asyncio.run(_supervise(cfg, workdir))
        seconds = time.perf_counter() - started - run["setup_seconds"]
        from safetensors.torch import load_file

        deltas = load_file(str(workdir / "state" / MERGED_DELTAS))
    for key, delta in deltas.items():
        t = Target.parse(key)
        lora_layer(model, t).add_to_weight(t.proj, delta)
    after = evaluate(model, tokenizer, items, cfg.eval, cfg.max_len)
    gen_items = spread(items, cfg.eval.generate_items)
    return {**run, "train_seconds": seconds, "before": before.summary(), "after": after.summary(),
            "samples": [{"prompt": it.prompt, "before": b, "after": a, "reference": it.references[0]}
                        for it, b, a in zip(gen_items, before.outputs, after.outputs)]}


def print_demo_report(result: dict) -> None:
    caps, seconds = result["memory_caps"], result["step_time_budget"]
    print("\nper-client devices and plans: threads and memory caps as given; GFLOP/s, ms per block (forward + "
          "backward) and available memory as each client's profile measured them; budgets and plans from the "
          "server's /v1/status; the deepest split its memory budget alone, and its step-time budget alone, allow")
    print(f"memory caps: {caps} limits" if caps else
          "memory caps: none (cgroups not writable here): the budgets are declared (--memory-budget)")
    if seconds is not None:
        print(f"step-time budget: {seconds:g} s per device step for every client (--step-time-budget)")

    def mb(x: float | None) -> str:
        return "-" if x is None else f"{x:.0f}"

    print(table(["client", "threads", "GFLOP/s", "ms per block", "cap MiB", "available MiB", "budget MiB",
                 "memory / time allow", "split", "device adapters", "predicted peak MiB", "predicted step s",
                 "last loss"],
                [[c["name"], c["threads"], f"{c['gflops_fp32']:.1f}", f"{c['ms_per_block']:.0f}", mb(c["cap_mb"]),
                  mb(c["available_mb"]), mb(c["budget_mb"]), f"{c['memory_allows']} / {c['time_allows'] or '-'}",
                  c["split"], c["device_adapters"],
                  mb(c["predicted_peak_rss_mb"]), f"{c['predicted_step_s']:.2f}",
                  f"{c['loss']:.3f}" if c["loss"] is not None else "-"] for c in result["clients"]]))
    print("\nper round (means over clients)")
    rows = []
    for number, events in sorted(result["rounds"].items(), key=lambda kv: int(kv[0])):
        rows.append([number, sum(e["loss"] for e in events) / len(events), f"{max(e['seconds'] for e in events):.0f}",
                     f"{sum(e['bytes_up'] for e in events) / 1e6:.1f}", f"{sum(e['bytes_down'] for e in events) / 1e6:.1f}"])
    print(table(["round", "train loss", "seconds", "MB up (all)", "MB down (all)"], rows))
    print(f"\nstarting the server and profiling the clients took {result['setup_seconds']:.0f} s, federated "
          f"training {result['train_seconds']:.0f} s\n")
    print(metrics_table({"before": result["before"], "after": result["after"]}))
    for sample in result["samples"][:2]:
        print(f"\n{sample['prompt']}\n  before:    {sample['before']}\n  after:     {sample['after']}"
              f"\n  reference: {sample['reference']}")
