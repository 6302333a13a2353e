"""`hsplitlora server`: run the backend."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import ssl
from pathlib import Path

from hsplitlora.configs import add_arguments, add_config_file, describe_arguments, from_arguments
from server.config import ServerConfig


def add_parser(sub) -> None:
    p = sub.add_parser(
        "server", help="run the federation backend (aiohttp): plans, server-side segments, aggregation, state",
        description="Serve split fine-tuning to devices: register them, plan their split and ranks, train each "
                    "client's server segment, aggregate every round by the run's strategy (HSplitLoRA by default), keep state in SQLite + safetensors. "
                    "Operators watch GET /status (an HTML page) and GET /metrics (Prometheus); see docs/protocol.md.",
    )
    add_arguments(p, ServerConfig)
    add_config_file(p)
    p.set_defaults(func=run)
    e = sub.add_parser(
        "enroll", help="make a join code with which a device may register with a server",
        description="Make a join code, good for --uses registrations (until --expires-in seconds from now), "
                    "in a server's state directory; the server may be running. Print it once: only its hash is "
                    "kept. A device registers with it (`hsplitlora client --join-code CODE`).")
    e.add_argument("--state", type=Path, default=ServerConfig.state, help="the server's state directory "
                   "(default: %(default)s)")
    e.add_argument("--uses", type=int, default=1, help="registrations the code allows (default: %(default)s)")
    e.add_argument("--expires-in", type=float, metavar="SECONDS", help="the code expires this many seconds from now "
                   "(default: never)")
    e.set_defaults(func=enroll)


def enroll(args: argparse.Namespace) -> int:
    from server.store import Store

    store = Store(args.state)
    try:
        print(store.add_join_code(args.uses, args.expires_in))
    finally:
        store.close()
    return 0


def run(args: argparse.Namespace) -> int:
    from aiohttp import web

    from server.app import make_app

    cfg = from_arguments(ServerConfig, args)
    log = logging.getLogger(__name__)
    log.info("configuration (as a --config file):\n%s", describe_arguments(args.command_parser, args))
    context = None
    if cfg.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    app = make_app(cfg)
    scheme = "https" if context else "http"
    if cfg.open_registration and not ipaddress.ip_address(socket.gethostbyname(cfg.host)).is_loopback:
        log.warning("registration is open to anyone who reaches %s:%d: give devices join "
                                            "codes instead (`hsplitlora enroll`)", cfg.host, cfg.port)
    who = "this machine" + (", and callers with the operator's token" if cfg.operator_token_file else
                            " only (--operator-token-file opens them to callers with a token)")
    log.info("state in %s; serving %s; status page %s://%s:%d/status and metrics at /metrics "
                                     "answer %s", cfg.state, cfg.model, scheme, cfg.host, cfg.port, who)
    web.run_app(app, host=cfg.host, port=cfg.port, ssl_context=context, print=None, access_log=None)
    return 0
