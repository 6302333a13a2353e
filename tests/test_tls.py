"""HTTPS for real: `hsplitlora server --tls-cert/--tls-key` and `hsplitlora client --cafile` as
processes on 127.0.0.1, with a certificate from a test CA (trustme)."""

import asyncio
import http.client
import json
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import aiohttp
import pytest
import trustme

from conftest import server_process
from hsplitlora.data import load_e2e_train
from app.demo import free_port

SERVER_ARGS = ["--model", "tiny-llama", "--clients-per-round", "1", "--local-steps", "2", "--batch-size", "2",
               "--max-len", "400"]


def _get_json(url: str, context: ssl.SSLContext) -> dict:
    with urllib.request.urlopen(url, timeout=10, context=context) as r:
        return json.loads(r.read())


def test_server_and_client_train_over_https_and_an_untrusted_certificate_is_refused(tmp_path, e2e_dir):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt, "completion": e.completion}) + "\n"
                            for e in load_e2e_train(e2e_dir)[:20]))
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    trusted = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    server = server_process(tmp_path / "state", port, *SERVER_ARGS, "--tls-cert", str(tmp_path / "server.pem"),
                            "--tls-key", str(tmp_path / "server.key"), context=trusted)
    try:
        client = subprocess.run(
            [sys.executable, "-m", "app", "client", "--server", url, "--cafile", str(tmp_path / "ca.pem"),
             "--data", str(data), "--memory-budget", "12000000", "--rounds", "1"],
            capture_output=True, text=True, timeout=300)
        assert client.returncode == 0, client.stderr[-2000:]
        status = _get_json(url + "/v1/status", trusted)
        assert status["completed_rounds"] == 1 and len(status["clients"]) == 1

        # Without the CA the server's certificate is not trusted, by urllib and by aiohttp (the SDK's client).
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            _get_json(url + "/healthz", ssl.create_default_context())

        async def aiohttp_untrusted():
            async with aiohttp.ClientSession() as s:
                async with s.get(url + "/healthz"):
                    pass

        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            asyncio.run(aiohttp_untrusted())
        # Plain HTTP is not served on the TLS port: the server closes the connection unanswered.
        with pytest.raises(http.client.RemoteDisconnected):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10)
    finally:
        server.kill()
        server.wait()
