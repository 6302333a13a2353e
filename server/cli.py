"""`hsplitlora server`: run the backend."""

from __future__ import annotations

import argparse
import logging
import ssl

from hsplitlora.configs import add_arguments, from_arguments
from server.config import ServerConfig


def add_parser(sub) -> None:
    p = sub.add_parser(
        "server", help="run the federation backend (aiohttp): plans, server-side segments, aggregation, state",
        description="Serve split fine-tuning to devices: register them, plan their split and ranks, train each "
                    "client's server segment, aggregate every round by the run's strategy (HSplitLoRA by default), keep state in SQLite + safetensors. "
                    "Operators watch GET /status (an HTML page) and GET /metrics (Prometheus); see docs/protocol.md.",
    )
    add_arguments(p, ServerConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aiohttp import web

    from server.app import make_app

    cfg = from_arguments(ServerConfig, args)
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
