"""The operators' views of a real server on 127.0.0.1: Prometheus metrics and the HTML status page."""

import asyncio
from html.parser import HTMLParser

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from conftest import running_server, server_config
from edge_sdk.client import AsyncClient
from hsplitlora.data import load_e2e_train, shard


def _samples(text: str) -> dict[tuple, float]:
    """(sample name, sorted label items) -> value, from Prometheus' text format."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class _Cells(HTMLParser):
    """The text of every table cell, row by row."""

    def __init__(self):
        super().__init__()
        self.rows, self._cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def test_metrics_and_status_page_report_what_the_run_did(tmp_path, e2e_dir):
    shards = shard(load_e2e_train(e2e_dir)[:200], 2, iid=False)
    cfg = server_config(tmp_path)  # 2 clients per round, 2 local steps

    async def main():
        async with running_server(cfg) as (url, state), aiohttp.ClientSession() as s:
            async with s.get(url + "/metrics") as r:
                before = (r.status, r.headers["Content-Type"], _samples(await r.text()))
            clients = [AsyncClient(url, shards[0], memory_budget=12e6), AsyncClient(url, shards[1], memory_budget=40e6)]
            await asyncio.gather(*(c.run(rounds=1) for c in clients))
            async with s.post(url + "/v1/steps?round=2&step=0", data=b"x", headers={"Authorization": "Bearer nope"}) as r:
                assert r.status == 401
            async with s.get(url + "/no/such/path") as r:  # refused before routing: no token
                assert r.status == 401
            async def chunks():  # no Content-Length: sent chunked
                for size in (1000, 2000, 500):
                    yield b"x" * size

            async with s.post(url + "/v1/probe", data=chunks()) as r:
                assert r.status == 200 and (await r.json())["bytes"] == 3500
            async with s.post(url + "/v1/probe", data=b"y" * 700) as r:
                assert r.status == 200
            async with s.get(url + "/metrics") as r:
                after = _samples(await r.text())
            async with s.get(url + "/status") as r:
                page = (r.status, r.headers["Content-Type"], await r.text())
            ids = [c.client_id for c in clients]
            splits = [c.plan.split for c in clients]
            for c in clients:
                await c.close()
            return before, after, page, ids, splits

    before, after, (page_status, page_type, page), ids, splits = asyncio.run(main())

    status, content_type, fresh = before
    assert status == 200 and content_type.startswith("text/plain")
    assert fresh[("hsplitlora_round", ())] == 1 and fresh[("hsplitlora_clients_registered", ())] == 0
    assert fresh[("hsplitlora_split_steps_trained_total", ())] == 0

    steps = 2 * cfg.local_steps  # each client's round
    assert after[("hsplitlora_round", ())] == 2
    assert after[("hsplitlora_rounds_completed_total", ())] == 1
    assert after[("hsplitlora_clients_registered", ())] == 2
    assert after[("hsplitlora_split_steps_trained_total", ())] == steps
    assert after[("hsplitlora_split_step_seconds_count", ())] == steps
    assert after[("hsplitlora_split_step_seconds_sum", ())] > 0
    assert after[("hsplitlora_aggregation_seconds_count", ())] == 1
    assert after[("hsplitlora_round_uploads", ())] == 0 and after[("hsplitlora_round_uploads_needed", ())] == 2
    assert after[("hsplitlora_http_requests_total", (("code", "200"), ("route", "/v1/steps")))] == steps
    assert after[("hsplitlora_http_requests_total", (("code", "200"), ("route", "/v1/register")))] == 2
    assert after[("hsplitlora_http_requests_total", (("code", "401"), ("route", "/v1/steps")))] == 1
    assert after[("hsplitlora_http_requests_total", (("code", "401"), ("route", "unmatched")))] == 1
    assert after[("hsplitlora_http_request_seconds_count", (("route", "/v1/steps"),))] == steps + 1
    # Every step uploads activations and downloads a gradient of the same shape (fp16 both ways).
    assert after[("hsplitlora_http_received_bytes_total", (("route", "/v1/steps"),))] > 0
    assert after[("hsplitlora_http_sent_bytes_total", (("route", "/v1/steps"),))] > 0
    assert after[("hsplitlora_http_received_bytes_total", (("route", "/v1/probe"),))] == 3500 + 700
    for client_id, split, budget in zip(ids, splits, (12e6, 40e6)):
        assert after[("hsplitlora_client_split", (("client", client_id),))] == split
        assert after[("hsplitlora_client_budget_bytes", (("client", client_id),))] == budget
        assert after[("hsplitlora_client_train_loss", (("client", client_id),))] > 0

    assert page_status == 200 and page_type.startswith("text/html")
    cells = _Cells()
    cells.feed(page)
    by_client = {row[0]: row for row in cells.rows if row and row[0] in ids}
    assert set(by_client) == set(ids)
    for client_id, split in zip(ids, splits):
        assert by_client[client_id][1] == str(split)
        assert by_client[client_id][7] == "no"  # round 2 is open and nobody uploaded yet
    rounds = {row[0]: row for row in cells.rows if row and row[0] in ("1", "2")}
    assert rounds["1"][1] == "complete" and rounds["1"][4] == str(steps) and rounds["1"][6] == "2"
    assert rounds["2"][1] == "open" and rounds["2"][4] == "0"
    assert "2 requests refused (4xx)" in " ".join(page.split())
