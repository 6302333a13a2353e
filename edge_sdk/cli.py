"""`hsplitlora client`: take part in a federation from this device."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from edge_sdk.client import ClientConfig
from hsplitlora.configs import add_arguments, add_config_file, describe_arguments, from_arguments
from hsplitlora.data import DATA_HELP
from hsplitlora.federation.protocol import Route

DEFAULT_MEMORY_BUDGET = 2e9  # without a profile or a --memory-budget, the training memory a device gives


def add_parser(sub) -> None:
    p = sub.add_parser(
        "client", help="train on this device's data with a server (split learning + LoRA)",
        description="Register with a server (or resume with --token), then run rounds: the first blocks of "
                    "the model train here on your data; only activations, labels and adapters leave the device.",
    )
    p.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--data", type=Path, required=True, help=DATA_HELP)
    p.add_argument("--profile", metavar="FILE|auto",
                   help="plan from this device's measurements: a JSON written by `hsplitlora profile`, or 'auto' to "
                        "measure now against the server (about 15 s on SmolLM2-135M)")
    p.add_argument("--rounds", type=int, default=3, help="rounds to take part in (default: %(default)s)")
    p.add_argument("--save", type=Path, help="write the device's merged weights and plan here at the end")
    p.add_argument("--progress-json", action="store_true",
                   help="print one JSON object per step instead of a progress bar (for supervisors)")
    p.add_argument("--cafile", type=Path, help="CA certificate to trust for an HTTPS server")
    add_arguments(p.add_argument_group("how this device takes part"), ClientConfig)
    add_config_file(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import ssl

    import torch

    from edge_sdk.client import Client, ServerError
    from edge_sdk.fit import PlanDoesNotFit
    from hsplitlora.data import load_examples

    logging.getLogger(__name__).info("configuration (as a --config file):\n%s",
                                     describe_arguments(args.command_parser, args))
    if args.threads:
        torch.set_num_threads(args.threads)
    context = ssl.create_default_context(cafile=str(args.cafile)) if args.cafile else None
    emit = _json_progress if args.progress_json else None
    profile = _device_profile(args, context, emit)
    memory = args.memory_budget if args.memory_budget or profile else DEFAULT_MEMORY_BUDGET
    client = Client(args.server, load_examples(args.data), ssl=context,
                    config=from_arguments(ClientConfig, args, memory_budget=memory, profile=profile))
    try:
        plan = client.register()
    except (PlanDoesNotFit, ServerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    inner = client.inner
    predicted = plan.predicted_step
    if emit:
        emit({"event": "registered", "client": inner.client_id, "split": plan.split,
              "device_adapters": len(plan.ranks), "token": inner.token, "runtime": inner.runtime_name,
              "predicted_step_s": predicted and predicted.seconds,
              "predicted_peak_rss_bytes": predicted and predicted.peak_rss_bytes})
    else:
        print(f"registered as {inner.client_id} (token {inner.token}); split {plan.split}, "
              f"{len(plan.ranks)} device adapters; runtime {inner.runtime_name}")
        if predicted:
            print(f"predicted from this device's profile: {predicted.seconds:.2f} s per step, peak "
                  f"{predicted.peak_rss_bytes / 2**20:.0f} MiB resident")
    steps = inner.settings.local_steps
    bar = None if emit else tqdm(total=args.rounds * steps, desc=inner.client_id, unit="step")

    def progress(round_number: int, step: int, loss: float) -> None:
        if emit:
            emit({"event": "step", "round": round_number, "step": step, "loss": loss})
        else:
            bar.update(1)
            bar.set_postfix(round=round_number, loss=f"{loss:.3f}")

    try:
        reports = client.run(args.rounds, progress)
    except PlanDoesNotFit as e:  # a re-plan this device cannot take
        print(f"error: {e}", file=sys.stderr)
        return 2
    if bar:
        bar.close()
    for r in reports:
        line = {"event": "round", "round": r.round, "loss": sum(r.losses) / len(r.losses), "split": r.split,
                "seconds": r.seconds, "bytes_up": r.bytes_up, "bytes_down": r.bytes_down}
        emit(line) if emit else print(f"round {r.round}: mean loss {line['loss']:.3f}, {r.seconds:.0f} s, "
                                      f"{r.bytes_up / 1e6:.1f} MB up, {r.bytes_down / 1e6:.1f} MB down")
    if args.save:
        client.save(args.save)
    return 0


def _device_profile(args: argparse.Namespace, ssl_context, emit) -> dict | None:
    """--profile: read a profile file, or measure this device now for the server's model and batch."""
    if not args.profile:
        return None
    from edge_sdk.profile import DeviceProfile, profile_device

    if args.profile != "auto":
        return DeviceProfile.load(args.profile).to_dict()
    import urllib.request

    with urllib.request.urlopen(args.server.rstrip("/") + Route.SETTINGS, timeout=30, context=ssl_context) as r:
        settings = json.loads(r.read())
    profile = profile_device(settings["model"], settings["batch_size"], settings["max_len"], args.server,
                             args.threads, ssl=ssl_context)
    if emit:
        emit({"event": "profiled", "profile": profile.to_dict()})
    else:
        print(profile.summary())
    return profile.to_dict()


def _json_progress(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()
