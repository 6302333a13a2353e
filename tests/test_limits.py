"""What one party may take of a real server: slow headers, request rates, probe bytes, bodies
announced too large, broken HTTP, the operators' views from elsewhere (docs/reliability.md)."""

import asyncio
import logging
import socket
import time

import aiohttp
import pytest

from conftest import running_server, server_config
from hsplitlora.federation.protocol import Route


async def _raw(url: str, data: bytes, read_s: float = 5.0) -> bytes:
    """Send bytes on a fresh connection; what the server answers until it closes or `read_s` passes."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    out = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), read_s):
            out += chunk
    except asyncio.TimeoutError:
        pass
    writer.close()
    return out


def test_a_connection_slow_with_its_headers_is_closed_and_others_are_served(tmp_path):
    async def main():
        async with running_server(server_config(tmp_path, header_timeout_s=1.0)) as (url, _):
            host, port = url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            start, closed_after = time.monotonic(), None
            for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:  # one byte per 0.1 s
                writer.write(bytes([byte]))
                try:
                    await writer.drain()
                    if await asyncio.wait_for(reader.read(100), 0.1) == b"":
                        closed_after = time.monotonic() - start
                        break
                except asyncio.TimeoutError:
                    continue
                except ConnectionError:
                    closed_after = time.monotonic() - start
                    break
            writer.close()
            async with aiohttp.ClientSession() as s, s.get(url + Route.HEALTH) as r:
                return closed_after, r.status

    closed_after, status = asyncio.run(main())
    assert closed_after is not None and closed_after < 3.0  # 100 bytes would take 10 s
    assert status == 200


def test_request_rates_per_client_and_per_address_are_answered_429_with_retry_after(tmp_path):
    async def main():
        cfg = server_config(tmp_path, rate_per_address="5/second", rate_per_client="8/second")
        async with running_server(cfg) as (url, _):
            async with aiohttp.ClientSession() as s:
                async with s.post(url + Route.REGISTER, json={"profile": {"memory_bytes": 40e6}, "examples": 4}) as r:
                    token = (await r.json())["token"]
                anonymous = []
                for _ in range(8):  # the registration counted too: 5 a second for this address
                    async with s.get(url + Route.SETTINGS) as r:
                        anonymous.append((r.status, r.headers.get("Retry-After"), await r.json()))
                await asyncio.sleep(2.2)
                guesses = []
                for _ in range(7):  # wrong tokens count against the address
                    async with s.get(url + Route.ME, headers={"Authorization": "Bearer guess"}) as r:
                        guesses.append(r.status)
                mine = []
                for _ in range(10):  # the client's own budget, apart from its address'
                    async with s.get(url + Route.ME, headers={"Authorization": f"Bearer {token}"}) as r:
                        mine.append(r.status)
                return anonymous, guesses, mine

    anonymous, guesses, mine = asyncio.run(main())
    statuses = [a[0] for a in anonymous]
    assert statuses.count(200) == 4 and statuses[4:] == [429] * 4
    status, retry_after, body = anonymous[-1]
    assert int(retry_after) >= 1 and "too many requests" in body["error"]
    assert guesses[:5] == [401] * 5 and guesses[5:] == [429] * 2
    assert mine[:8] == [200] * 8 and mine[8:] == [429] * 2


def test_anonymous_probes_are_bounded_in_size_and_in_bytes_a_minute(tmp_path):
    async def main():
        async with running_server(server_config(tmp_path, probe_bytes_per_minute=3 * 2**20)) as (url, state):
            limit = state.probe_limit
            out = []
            async with aiohttp.ClientSession() as s:
                async with s.get(url + Route.PROBE, params={"bytes": str(limit + 1)}) as r:
                    out.append((r.status, len(await r.read())))
                for _ in range(3 * 2**20 // limit + 2):
                    async with s.get(url + Route.PROBE, params={"bytes": str(limit)}) as r:
                        out.append((r.status, len(await r.read())))
            return limit, out

    limit, out = asyncio.run(main())
    assert out[0][0] == 400
    served = [size for status, size in out[1:] if status == 200]
    assert served and all(size == limit for size in served) and sum(served) <= 3 * 2**20
    assert out[-1][0] == 429


def test_a_body_announced_over_the_limit_is_refused_before_it_is_sent(tmp_path):
    async def main():
        async with running_server(server_config(tmp_path)) as (url, state):
            head = (f"POST {Route.REGISTER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Expect: 100-continue\r\nContent-Length: {10 * state.limit}\r\n\r\n").encode()
            refused = await _raw(url, head, read_s=2.0)
            invited = await _raw(url, head.replace(str(10 * state.limit).encode(), b"2"), read_s=1.0)
            plain = await _raw(url, head.replace(b"Expect: 100-continue\r\n", b""), read_s=2.0)
            return refused, invited, plain

    refused, invited, plain = asyncio.run(main())
    assert refused.startswith(b"HTTP/1.1 413") and b"100 Continue" not in refused and b'"error"' in refused
    assert invited.startswith(b"HTTP/1.1 100 Continue")
    assert plain.startswith(b"HTTP/1.1 413")  # announced without Expect: refused without reading it


def test_broken_http_is_answered_400_and_logged_as_one_line(tmp_path, caplog):
    async def main():
        async with running_server(server_config(tmp_path)) as (url, _):
            answers = [await _raw(url, b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon in this header\r\n\r\n", 2.0)
                       for _ in range(3)]
            async with aiohttp.ClientSession() as s, s.get(url + Route.HEALTH) as r:
                return answers, r.status

    with caplog.at_level(logging.DEBUG, logger="aiohttp.server"):
        answers, health = asyncio.run(main())
    assert all(a.split(b" ")[1] == b"400" for a in answers) and health == 200  # aiohttp's own, plain text
    records = [r for r in caplog.records if r.name == "aiohttp.server" and r.levelno >= logging.WARNING]
    assert len(records) == 1 and records[0].levelno == logging.WARNING and records[0].exc_info is None
    assert "broken HTTP from 127.0.0.1" in records[0].getMessage()


def _own_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_operator_views_answer_this_machine_and_the_operators_token_only(tmp_path):
    address = _own_address()
    if address is None:
        pytest.skip("this machine has no address but loopback")
    (tmp_path / "operator-token").write_text("s3cret-operator\n")

    async def main():
        from aiohttp import web

        from server.app import STATE, make_app

        app = make_app(server_config(tmp_path, operator_token_file=tmp_path / "operator-token"))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "0.0.0.0", 0)
        await site.start()
        port = runner.addresses[0][1]
        out = {}
        try:
            async with aiohttp.ClientSession() as s:
                for name, host, headers in [
                    ("loopback", "127.0.0.1", {}), ("elsewhere", address, {}),
                    ("wrong token", address, {"Authorization": "Bearer nope"}),
                    ("token", address, {"Authorization": "bearer s3cret-operator"}),
                ]:
                    for route in (Route.STATUS, Route.METRICS):
                        async with s.get(f"http://{host}:{port}{route}", headers=headers) as r:
                            out[name, route] = r.status
                async with s.get(f"http://{address}:{port}{Route.SETTINGS}") as r:
                    out["settings elsewhere"] = r.status
        finally:
            assert app[STATE] is not None
            await runner.cleanup()
        return out

    out = asyncio.run(main())
    for route in (Route.STATUS, Route.METRICS):
        assert out["loopback", route] == 200 and out["token", route] == 200
        assert out["elsewhere", route] == 403 and out["wrong token", route] == 403
    assert out["settings elsewhere"] == 200
