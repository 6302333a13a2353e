"""`hsplitlora server`: run the backend."""

from __future__ import annotations

import argparse
import logging
import ssl
from pathlib import Path

from hsplitlora.aggregation import AGGREGATORS
from hsplitlora.models import DEFAULT_MODEL, NAMED_MODELS
from hsplitlora.planner import PlannerConfig
from hsplitlora.wire import WIRE_FORMATS
from server.config import ServerConfig


def add_parser(sub) -> None:
    p = sub.add_parser(
        "server", help="run the federation backend (aiohttp): plans, server-side segments, aggregation, state",
        description="Serve split fine-tuning to devices: register them, plan their split and ranks, train each "
                    "client's server segment, aggregate every round (naa by default), keep state in SQLite + safetensors. "
                    "Operators watch GET /status (an HTML page) and GET /metrics (Prometheus); see docs/protocol.md.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"{', '.join(NAMED_MODELS)} or a model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="port (default: %(default)s)")
    p.add_argument("--state", type=Path, default=Path("server-state"),
                   help="state directory (SQLite + tensors); restart with the same one to resume")
    p.add_argument("--method", choices=sorted(AGGREGATORS), default="naa",
                   help="aggregation: naa (HSplitLoRA's noise-free stacking, merged into the weights; default) "
                        "or fedavg / hetlora / flexlora (a global adapter on frozen weights; plans stay fixed)")
    p.add_argument("--rounds", type=int, default=10,
                   help="planned rounds of the run; importance smoothing settles over them (default: %(default)s)")
    p.add_argument("--clients-per-round", type=int, default=1,
                   help="aggregate once this many clients uploaded their round (default: %(default)s)")
    p.add_argument("--round-deadline", type=float, default=600.0,
                   help="seconds after which a round aggregates with the clients that made it (default: %(default)s)")
    p.add_argument("--local-steps", type=int, default=4, help="local steps per round (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="examples per step (default: %(default)s)")
    p.add_argument("--max-len", type=int, default=128, help="max tokens per example (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the clients' data order and of fresh adapters (default: %(default)s)")
    p.add_argument("--wire", choices=WIRE_FORMATS, default="fp16", help="activation/gradient format (default: fp16)")
    p.add_argument("--max-request-bytes", type=int, help="refuse larger bodies (default: sized from the model)")
    p.add_argument("--rank-set", default="2,4,8,16", help="ranks the planner chooses from (default: %(default)s)")
    p.add_argument("--projections",
                   help="the only projections adapted, on devices and server, comma-separated, e.g. q,v "
                        "(default: every projection of the model's family, the importance scores choose)")
    p.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--tls-key", type=Path, help="... and this private key (PEM)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aiohttp import web

    from server.app import make_app

    cfg = ServerConfig(
        model=args.model, state=args.state, host=args.host, port=args.port,
        method=args.method, rounds=args.rounds, clients_per_round=args.clients_per_round, round_deadline_s=args.round_deadline,
        local_steps=args.local_steps, batch_size=args.batch_size, max_len=args.max_len, lr=args.lr,
        seed=args.seed, wire=args.wire, max_request_bytes=args.max_request_bytes,
        planner=PlannerConfig(rank_set=tuple(int(r) for r in args.rank_set.split(",")),
                              candidates=tuple(args.projections.split(",")) if args.projections else None),
        tls_cert=args.tls_cert, tls_key=args.tls_key,
    )
    context = None
    if cfg.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    app = make_app(cfg)
    scheme = "https" if context else "http"
    logging.getLogger(__name__).info("state in %s; serving %s; status page %s://%s:%d/status, metrics at /metrics",
                                     cfg.state, cfg.model, scheme, cfg.host, cfg.port)
    web.run_app(app, host=cfg.host, port=cfg.port, ssl_context=context, print=None, access_log=None)
    return 0
