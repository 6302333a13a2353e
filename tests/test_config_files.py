"""`--config FILE` (TOML) for the server and the client: the file's options, flags over them, wrong
files refused with the reason, the effective configuration logged at start with secrets left out."""

import json
import subprocess
import sys
import urllib.request

import pytest

from app.cli import build_parser, main
from app.demo import free_port
from conftest import server_process
from edge_sdk.client import ClientConfig
from hsplitlora.configs import apply_config_file, describe_arguments, from_arguments
from server.config import ServerConfig


def _parse(argv: list[str]):
    parser = build_parser()
    apply_config_file(parser.commands[argv[0]], argv[argv.index("--config") + 1])
    return parser.parse_args(argv)


def test_a_file_gives_the_options_and_flags_override_it(tmp_path):
    (tmp_path / "server.toml").write_text(
        'model = "tiny-llama"\nlocal_steps = 3\nround_deadline = 90.0\nopen_registration = true\n'
        f'state = "{tmp_path / "state"}"\nrate_per_client = "10/second"\n[planner]\nreserve = 0.3\n')
    args = _parse(["server", "--config", str(tmp_path / "server.toml"), "--local-steps", "5"])
    cfg = from_arguments(ServerConfig, args)
    assert (cfg.model, cfg.local_steps, cfg.round_deadline_s, cfg.open_registration) == ("tiny-llama", 5, 90.0, True)
    assert cfg.state == tmp_path / "state" and cfg.rate_per_client == "10/second" and cfg.planner.reserve == 0.3
    # What is logged at start reads back as the same configuration.
    (tmp_path / "again.toml").write_text(describe_arguments(args.command_parser, args))
    again = from_arguments(ServerConfig, _parse(["server", "--config", str(tmp_path / "again.toml")]))
    assert again == cfg


def test_a_client_file_may_hold_its_required_options_and_its_secrets_are_not_shown(tmp_path):
    (tmp_path / "client.toml").write_text(
        'server = "http://127.0.0.1:1"\ndata = "mine.jsonl"\njoin_code = "s3cret-code"\nmemory_budget = "2GB"\n')
    args = _parse(["client", "--config", str(tmp_path / "client.toml")])
    cfg = from_arguments(ClientConfig, args)
    assert (args.server, str(args.data), cfg.join_code, cfg.memory_budget) == ("http://127.0.0.1:1", "mine.jsonl",
                                                                                "s3cret-code", 2e9)
    shown = describe_arguments(args.command_parser, args)
    assert "s3cret-code" not in shown and "# join_code = (given; not shown)" in shown
    assert 'server = "http://127.0.0.1:1"' in shown


@pytest.mark.parametrize("text, message", [
    ("local_step = 3\n", "no option 'local_step'"),
    ("local_steps = 2.5\n", "expected an integer"),
    ('local_steps = "many"\n', "invalid literal"),
    ('method = "fedsgd"\n', "not one of"),
    ("open_registration = 1\n", "expected true or false"),
    ("local_steps = \n", "not TOML"),
])
def test_a_wrong_file_is_refused_with_the_reason_and_no_traceback(tmp_path, caplog, text, message):
    (tmp_path / "bad.toml").write_text(text)
    assert main(["server", "--config", str(tmp_path / "bad.toml")]) == 2
    assert message in caplog.text and "Traceback" not in caplog.text


def test_a_server_runs_from_a_config_file_and_logs_its_configuration(tmp_path):
    (tmp_path / "operator-token").write_text("t0ken\n")
    (tmp_path / "server.toml").write_text(
        'model = "tiny-llama"\nlocal_steps = 3\nbatch_size = 2\nmax_len = 400\n'
        f'operator_token_file = "{tmp_path / "operator-token"}"\n')
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "wb") as stderr:
        server = server_process(tmp_path / "state", port, "--config", str(tmp_path / "server.toml"), stderr=stderr)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/settings", timeout=10) as r:
            settings = json.loads(r.read())
    finally:
        server.terminate()
        server.wait(30)
    assert (settings["model"], settings["local_steps"], settings["batch_size"]) == ("tiny-llama", 3, 2)
    text = log.read_text()
    assert "configuration (as a --config file)" in text and "local_steps = 3" in text
    assert f'state = "{tmp_path / "state"}"' in text  # the flag over the file's default
    assert "t0ken" not in text


def test_config_is_in_the_help_of_server_and_client():
    for command in ("server", "client"):
        out = subprocess.run([sys.executable, "-m", "app", command, "--help"], capture_output=True, text=True, check=True)
        assert "--config FILE" in out.stdout and "TOML" in out.stdout
