"""A networked federation (a real server and real client processes on 127.0.0.1) ends where the
one-process simulation ends: same plans, same merged weights, on the server and on each device."""

import json
import subprocess
from dataclasses import replace
import sys
import time
import urllib.request

import torch
from safetensors.torch import load_file

from conftest import server_process
from app.demo import free_port
from hsplitlora.finetune import EvalConfig
from hsplitlora.importance import all_targets
from hsplitlora.lora import lora_layer
from hsplitlora.simulate import Federation, SimConfig

TOL = 1e-5
RUNTIME_TOL = 1e-4  # other kernels (ONNX Runtime, XNNPACK) sum in other orders


def _status(url):
    with urllib.request.urlopen(url + "/v1/status", timeout=10) as r:
        return json.loads(r.read())


def _simulated(cfg: SimConfig):
    fed = Federation(cfg)
    base = {t: lora_layer(fed.model, t).weight_slice(t.proj).detach().clone() for t in all_targets(fed.model)}
    fed.run()
    deltas = {str(t): lora_layer(fed.model, t).weight_slice(t.proj).detach() - w for t, w in base.items()}
    return fed, deltas


def _networked(cfg: SimConfig, fed: Federation, workdir, runtimes: list[str] | None = None):
    """Run the same federation over HTTP; returns (server deltas, per-client device deltas, status)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    py = [sys.executable, "-m", "app"]
    server = server_process(
        workdir / "state", port, "--model", cfg.model, "--wire", "fp32", "--rounds", str(cfg.rounds),
        "--clients-per-round", str(cfg.clients), "--local-steps", str(cfg.local_steps), "--batch-size",
        str(cfg.batch_size), "--max-len", str(cfg.max_len), "--lr", repr(cfg.lr), "--seed", str(cfg.seed),
        stderr=open(workdir / "server.log", "wb"))
    clients = []
    try:
        for c in fed.clients:
            data = workdir / f"{c.name}.jsonl"
            data.write_text("".join(json.dumps({"prompt": e.prompt, "completion": e.completion}) + "\n" for e in c.data))
            extra = ["--runtime", runtimes[c.index], "--artifact-dir", str(workdir / "artifacts")] if runtimes else []
            clients.append(subprocess.Popen(
                [*py, "client", "--server", url, "--data", str(data), "--memory-budget", repr(c.budget.memory_bytes),
                 "--relative-speed", repr(c.speed), "--rounds", str(cfg.rounds), "--threads", "1",
                 "--save", str(workdir / c.name), "--progress-json", *extra],
                stdout=subprocess.DEVNULL, stderr=open(workdir / f"{c.name}.log", "wb")))
            # One at a time, so that registration numbers (which seed data order and adapters) are the simulation's.
            deadline = time.time() + 120
            while len(_status(url)["clients"]) <= c.index:
                assert clients[-1].poll() is None, (workdir / f"{c.name}.log").read_text()[-3000:]
                assert time.time() < deadline, "a client did not register within 120 s"
                time.sleep(0.2)
        for c, proc in zip(fed.clients, clients):
            assert proc.wait(timeout=600) == 0, (workdir / f"{c.name}.log").read_text()[-3000:]
        status = _status(url)
    finally:
        for proc in clients:
            proc.kill()
        server.terminate()
        server.wait(timeout=30)
    devices = [load_file(str(workdir / c.name / "device_deltas.safetensors")) for c in fed.clients]
    return load_file(str(workdir / "state" / "deltas" / "merged.safetensors")), devices, status


def equivalence_config(e2e_dir) -> SimConfig:
    return SimConfig(method="hsplitlora", model="tiny-llama", data=e2e_dir, clients=2, rounds=2, local_steps=2,
                     batch_size=2, max_len=400, val_pairs=4,
                     eval=EvalConfig(loss_items=1, generate_items=1, max_new_tokens=4, coco=False))


def assert_same_run(fed, sim, server, devices, status, tol=TOL):
    assert [c["split"] for c in status["clients"]] == [c.plan.split for c in fed.clients]
    assert status["completed_rounds"] == fed.cfg.rounds
    assert set(server) == {k for k, v in sim.items() if v.abs().max() > 0}
    worst = max(float((server[k] - sim[k]).abs().max()) for k in server)
    assert worst <= tol, f"server weights differ from the simulation's by {worst:.2e}"
    scale = max(float(v.abs().max()) for v in server.values())
    assert scale > 10 * tol  # the run moved the weights: the comparison checks something
    print(f"max |networked - simulated| = {worst:.2e}, largest weight change {scale:.2e}")
    for c, device in zip(fed.clients, devices):
        assert device, f"{c.name} saved no device weights"
        for key, value in device.items():
            diff = float((value - sim[key]).abs().max())
            assert diff <= tol, f"{c.name} {key}: device weights differ from the simulation's by {diff:.2e}"


def test_a_networked_run_ends_at_the_simulated_weights(tmp_path, e2e_dir):
    cfg = equivalence_config(e2e_dir)
    fed, sim = _simulated(cfg)
    assert_same_run(fed, sim, *_networked(cfg, fed, tmp_path))


def test_clients_on_onnxruntime_and_executorch_end_at_the_simulated_weights(tmp_path, e2e_dir):
    """Each device downloads the artifact the server exports for its plan, merges every round's update
    into it in place (or fetches a new one when re-planned) and trains it with the SDK's AdamW."""
    # Exported segments have no weight gradients: their devices cannot score importance.
    cfg = replace(equivalence_config(e2e_dir), device_scores=False)
    fed, sim = _simulated(cfg)
    assert_same_run(fed, sim, *_networked(cfg, fed, tmp_path, runtimes=["onnxruntime", "executorch"]), tol=RUNTIME_TOL)
