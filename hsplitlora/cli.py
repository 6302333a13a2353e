"""The `hsplitlora` command: one subcommand per user task, each with its own --help."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from hsplitlora.data import default_e2e_dir
from hsplitlora.models import DEFAULT_MODEL, NAMED_MODELS


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # weight-loading bars for every load drown the real progress


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"{', '.join(NAMED_MODELS)}, or a local transformers causal-LM directory "
                        f"(default: {DEFAULT_MODEL})")


def _finetune(args: argparse.Namespace) -> int:
    from hsplitlora.finetune import FinetuneConfig, finetune
    from hsplitlora.report import print_finetune_report

    cfg = FinetuneConfig(
        model=args.model, data=args.data, ranks=args.ranks, alpha=args.alpha, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, max_len=args.max_len, seed=args.seed,
        adapter_out=args.save_adapter, merged_out=args.save_merged,
        eval=_eval_config(args),
    )
    report = finetune(cfg)
    print_finetune_report(report)
    _write_json(args.out, report)
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from hsplitlora.planner import PlannerConfig
    from hsplitlora.report import print_simulation_report
    from hsplitlora.simulate import SimConfig, simulate

    cfg = SimConfig(
        method=args.method, model=args.model, data=args.data, clients=args.clients, rounds=args.rounds,
        local_steps=args.local_steps, batch_size=args.batch_size, max_len=args.max_len, lr=args.lr,
        alpha=args.alpha, seed=args.seed, iid=args.iid, budget_spread=args.budget_spread,
        eval=_eval_config(args),
        planner=PlannerConfig(rank_set=_rank_set(args.rank_set)),
    )
    results = simulate(cfg, args.save_merged, args.save_adapter, args.adapter_rank)
    print_simulation_report(results)
    _write_json(args.out, results)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from hsplitlora.demo import DemoConfig, DemoError, print_demo_report, run_demo

    try:
        result = run_demo(DemoConfig(model=args.model, data=args.data, clients=args.clients, rounds=args.rounds,
                                     local_steps=args.local_steps, max_len=args.max_len,
                                     max_threads=args.max_threads, step_time_budget=args.step_time_budget or None,
                                     eval=_eval_config(args)))
    except DemoError as e:
        logging.getLogger("hsplitlora").error("%s", e)
        return 1
    print_demo_report(result)
    _write_json(args.out, result)
    return 0


def _eval_config(args: argparse.Namespace):
    from hsplitlora.finetune import EvalConfig

    return EvalConfig(loss_items=args.eval_items, generate_items=args.generate_items, coco=not args.no_coco)


def _rank_set(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(r) for r in text.split(","))
    except ValueError:
        raise ValueError(f"--rank-set must be comma-separated integers, e.g. 2,4,8,16; got {text!r}") from None


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


def _common_training_args(p: argparse.ArgumentParser) -> None:
    _model_arg(p)
    p.add_argument("--data", type=Path, default=default_e2e_dir(),
                   help="an E2E directory (devset.csv, testset_w_refs.csv) or a JSONL file of "
                        "{\"prompt\", \"completion\"} objects (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; scale = alpha / rank (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    _eval_args(p)
    p.add_argument("--save-adapter", type=Path, help="write the trained adapter here (PEFT format)")
    p.add_argument("--save-merged", type=Path, help="write a merged model directory here")


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-items", type=int, default=20,
                   help="test inputs whose references give the test loss (default: %(default)s)")
    p.add_argument("--generate-items", type=int, default=40,
                   help="test inputs generated and scored (default: %(default)s)")
    p.add_argument("--no-coco", action="store_true", help="skip METEOR/ROUGE-L/CIDEr (Java, ~20 s)")
    p.add_argument("--out", type=Path, help="write the full results as JSON here")


def _federation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", type=int, default=5, help="number of devices (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="aggregation rounds (default: %(default)s)")
    p.add_argument("--local-steps", type=int, default=4, help="local steps per client per round (default: %(default)s)")
    p.add_argument("--max-len", type=int, default=128, help="max tokens per example (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hsplitlora",
        description="Split learning + LoRA fine-tuning of LLMs across heterogeneous devices (HSplitLoRA).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ft = sub.add_parser(
        "finetune",
        help="centralised LoRA fine-tune (the upper-bound baseline) with before/after evaluation",
        description="Fine-tune a model with LoRA on one machine (all data in one place), then report "
                    "test loss, perplexity, E2E metrics and before/after samples.",
    )
    _common_training_args(ft)
    ft.add_argument("--ranks", default="q=8,v=8",
                    help="LoRA ranks: 'q=8,v=8' for every layer, '0-3:up=16', '5.down=4'; comma-separated, "
                         "later items win (default: %(default)s)")
    ft.add_argument("--steps", type=int, default=60, help="optimizer steps (default: %(default)s)")
    ft.add_argument("--batch-size", type=int, default=8, help="examples per step (default: %(default)s)")
    ft.add_argument("--max-len", type=int, default=160, help="max tokens per example (default: %(default)s)")
    ft.set_defaults(func=_finetune)

    sim = sub.add_parser(
        "simulate",
        help="the whole federation in one process: HSplitLoRA or a baseline, heterogeneous clients",
        description="Simulate a federation of heterogeneous devices in one process: per-round train loss, "
                    "validation perplexity, bytes each way, per-client plans, then test metrics.",
    )
    from hsplitlora.simulate import METHODS

    sim.add_argument("--method", choices=METHODS, default="hsplitlora",
                     help="hsplitlora (ours), splitlora, hetlora, flexlora, or cenlora (centralised upper bound)")
    _common_training_args(sim)
    _federation_args(sim)
    sim.add_argument("--batch-size", type=int, default=4, help="examples per step (default: %(default)s)")
    sim.add_argument("--iid", action="store_true", help="IID shards (default: non-IID, by restaurant)")
    sim.add_argument("--budget-spread", type=float, default=4.0,
                     help="strongest / weakest device memory budget (default: %(default)s)")
    sim.add_argument("--rank-set", default="2,4,8,16", help="the ranks Q the planner chooses from (default: %(default)s)")
    sim.add_argument("--adapter-rank", type=int, default=16,
                     help="rank of the SVD adapter --save-adapter writes for merging methods (default: %(default)s)")
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
    _model_arg(demo)
    demo.add_argument("--data", type=Path, default=default_e2e_dir(), help="E2E directory or JSONL (default: %(default)s)")
    _federation_args(demo)
    demo.add_argument("--max-threads", type=int, default=2,
                      help="clients get 1, 2, ... up to this many torch threads, in turn (default: %(default)s)")
    demo.add_argument("--step-time-budget", type=float, default=1.2, metavar="SECONDS",
                      help="seconds of one device step every client accepts, predicted from its profile; 0 for none "
                           "(default: %(default)s)")
    _eval_args(demo)
    demo.set_defaults(func=_demo)

    rep = sub.add_parser("report", help="a Markdown table and a validation-PPL plot of simulation results",
                         description="Compare simulation result files: final test metrics per method, and "
                                     "validation perplexity per round as a PNG plot.")
    rep.add_argument("results", type=Path, nargs="+", help="results JSON files written by simulate --out")
    rep.add_argument("--plot", type=Path, help="write the validation-PPL plot (PNG) here")
    rep.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        if args.verbose:
            raise
        logging.getLogger("hsplitlora").error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
