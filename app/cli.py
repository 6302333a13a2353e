"""The `hsplitlora` command: one subcommand per user task, each with its own --help."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from hsplitlora.configs import add_arguments, apply_config_file, from_arguments


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # weight-loading bars for every load drown the real progress


def _finetune(args: argparse.Namespace) -> int:
    from hsplitlora.finetune import FinetuneConfig, finetune
    from hsplitlora.report import print_finetune_report

    report = finetune(from_arguments(FinetuneConfig, args))
    print_finetune_report(report)
    _write_json(args.out, report)
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from hsplitlora.report import print_simulation_report
    from hsplitlora.simulate import SimConfig, simulate

    results = simulate(from_arguments(SimConfig, args), args.save_merged, args.save_adapter, args.adapter_rank)
    print_simulation_report(results)
    _write_json(args.out, results)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from app.demo import DemoConfig, DemoError, print_demo_report, run_demo

    try:
        result = run_demo(from_arguments(DemoConfig, args))
    except DemoError as e:
        logging.getLogger("hsplitlora").error("%s", e)
        return 1
    print_demo_report(result)
    _write_json(args.out, result)
    return 0


def _write_json(path: Path | None, obj: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=1))
        print(f"results written to {path}")


def _report(args: argparse.Namespace) -> int:
    from hsplitlora.report import load_results, plot_validation, results_table

    runs = load_results(args.results)
    print(results_table(runs))
    if args.plot:
        plot_validation(runs, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def _out_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, help="write the full results as JSON here")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hsplitlora",
        description="Split learning + LoRA fine-tuning of LLMs across heterogeneous devices (HSplitLoRA).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = sub.choices  # each command's parser, by name (a --config file sets its defaults)

    from app.demo import DemoConfig
    from hsplitlora.finetune import FinetuneConfig
    from hsplitlora.simulate import SimConfig

    ft = sub.add_parser(
        "finetune",
        help="centralised LoRA fine-tune (the upper-bound baseline) with before/after evaluation",
        description="Fine-tune a model with LoRA on one machine (all data in one place), then report "
                    "test loss, perplexity, E2E metrics and before/after samples.",
    )
    add_arguments(ft, FinetuneConfig)
    _out_arg(ft)
    ft.set_defaults(func=_finetune)

    sim = sub.add_parser(
        "simulate",
        help="the whole federation in one process: HSplitLoRA or a baseline, heterogeneous clients",
        description="Simulate a federation of heterogeneous devices in one process: per-round train loss, "
                    "validation perplexity, bytes each way, per-client plans, then test metrics.",
    )
    add_arguments(sim, SimConfig)
    sim.add_argument("--save-adapter", type=Path, help="write the global model's adapter here (PEFT format)")
    sim.add_argument("--save-merged", type=Path, help="write the global model as a merged model directory here")
    sim.add_argument("--adapter-rank", type=int, default=16,
                     help="rank of the SVD adapter --save-adapter writes for merging methods (default: %(default)s)")
    _out_arg(sim)
    sim.set_defaults(func=_simulate)

    from edge_sdk import cli as edge_cli
    from server import cli as server_cli

    server_cli.add_parser(sub)
    edge_cli.add_parser(sub)

    from export import cli as export_cli

    exp = sub.add_parser("export", help="the device segment with trainable LoRA -> ONNX and/or ExecuTorch, verified",
                         description=export_cli.DESCRIPTION, epilog=export_cli.EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    export_cli.add_arguments(exp)
    exp.set_defaults(func=export_cli.run)

    from edge_sdk import profile as profile_cli

    prof = sub.add_parser("profile", help="measure this device (FLOP/s, memory, per-block time, link) for planning",
                          description=profile_cli.DESCRIPTION)
    profile_cli.add_arguments(prof)
    prof.set_defaults(func=profile_cli.run)

    demo = sub.add_parser(
        "demo", help="a server and several heterogeneous client processes on 127.0.0.1, end to end",
        description="Start `hsplitlora server` and K `hsplitlora client` processes on 127.0.0.1 that differ for "
                    "real: 1 to --max-threads torch threads each and, where this process may create cgroups "
                    "(root, or a delegated cgroup v2 subtree), a memory cgroup each, capped at what its runtime "
                    "holds plus a training budget (the budgets spread 4x); elsewhere the clients declare those "
                    "budgets. Each client profiles itself and the server plans its split and ranks from that "
                    "profile; fine-tune on non-IID E2E shards with HSplitLoRA, then print what each client had "
                    "and measured with its plan, the per-round table and a before/after evaluation.",
    )
    add_arguments(demo, DemoConfig)
    _out_arg(demo)
    demo.set_defaults(func=_demo)

    rep = sub.add_parser("report", help="a Markdown table and a validation-PPL plot of simulation results",
                         description="Compare simulation result files: final test metrics per method, and "
                                     "validation perplexity per round as a PNG plot.")
    rep.add_argument("results", type=Path, nargs="+", help="results JSON files written by simulate --out")
    rep.add_argument("--plot", type=Path, help="write the validation-PPL plot (PNG) here")
    rep.set_defaults(func=_report)
    return parser


def _config_file(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """A `--config FILE` given to a command that takes one: its options become that command's
    defaults before the command line is parsed, so that flags override the file."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, _ = pre.parse_known_args(argv)
    command = next((parser.commands[a] for a in argv if a in parser.commands), None)
    if known.config is not None and command is not None and command.get_default("command_parser") is command:
        apply_config_file(command, known.config)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    _setup_logging("-v" in argv or "--verbose" in argv)
    try:
        _config_file(parser, argv)
        args = parser.parse_args(argv)
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        if "-v" in argv or "--verbose" in argv:
            raise
        logging.getLogger("hsplitlora").error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
