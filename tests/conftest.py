"""Shared fixtures: tiny models of both families, the E2E data directory, a real server."""

from __future__ import annotations

import subprocess
import sys
from contextlib import asynccontextmanager

import pytest
import torch
from aiohttp import web
from transformers.utils import logging as hf_logging

from hsplitlora.data import default_e2e_dir
from app.demo import wait_healthy
from hsplitlora.models import load_model
from server.app import STATE, make_app
from server.config import ServerConfig

FAMILY_MODELS = ["tiny-llama", "tiny-gpt2"]
hf_logging.disable_progress_bar()


@pytest.fixture(scope="session")
def e2e_dir():
    path = default_e2e_dir()
    if not (path / "devset.csv").is_file():
        pytest.skip(f"E2E data not found at {path} (set HSPLITLORA_E2E_DIR)")
    return path


@pytest.fixture
def tiny():
    """Load a fresh tiny model + tokenizer by name (fresh so tests can change weights freely)."""
    return load_model


@pytest.fixture
def text_batch():
    """Two right-padded sentences for a tokenizer, as tensors (ids, mask)."""

    def make(tokenizer):
        enc = tokenizer(["Meaning representation: name[Aromi]\nDescription: a pub", "short"],
                        return_tensors="pt", padding=True)
        return enc["input_ids"], enc["attention_mask"]

    return make


def randomize_adapters(factors, seed: int = 0, std: float = 0.1) -> None:
    """Give fresh adapters non-zero B so that they change the output (B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for f in factors.values():
            f.B.copy_(torch.randn(f.B.shape, generator=gen) * std)


@asynccontextmanager
async def serving(app: web.Application):
    """An aiohttp application served on 127.0.0.1 (a free port): yields its URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def running_server(cfg: ServerConfig):
    """A real aiohttp server on 127.0.0.1 (a free port): yields its URL and its state."""
    app = make_app(cfg)
    async with serving(app) as url:
        yield url, app[STATE]


@asynccontextmanager
async def one_client(tmp_path, examples, **kw):
    """A real tiny-model server closing a round per upload, and one SDK client registered with it:
    yields (url, server state, client, the client's Authorization header)."""
    from edge_sdk.client import AsyncClient

    async with running_server(server_config(tmp_path, **{"clients_per_round": 1, **kw})) as (url, state):
        client = AsyncClient(url, examples, memory_budget=15e6)
        await client.register()
        try:
            yield url, state, client, {"Authorization": f"Bearer {client.token}"}
        finally:
            await client.close()


def server_config(tmp_path, **kw) -> ServerConfig:
    """A tiny-model server: 2 clients per round, 2 local steps of batch 2, registration open, rates
    no test reaches unless it sets them (tests/test_limits.py does)."""
    base = dict(model="tiny-llama", state=tmp_path / "state", local_steps=2, batch_size=2, max_len=400,
                clients_per_round=2, open_registration=True, rate_per_client="100000/second",
                rate_per_address="100000/second")
    base.update(kw)
    return ServerConfig(**base)


def server_process(state, port: int, *args: str, stderr=subprocess.DEVNULL, context=None) -> subprocess.Popen:
    """`hsplitlora server --port PORT --state STATE --open-registration ARGS...` as a process, once it answers /healthz
    (over HTTPS with `context`, an ssl.SSLContext); killed if it never does."""
    proc = subprocess.Popen([sys.executable, "-m", "app", "server", "--port", str(port), "--state", str(state),
                             "--open-registration", *args], stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_healthy(f"{'https' if context else 'http'}://127.0.0.1:{port}", proc, timeout_s=120, context=context)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc
