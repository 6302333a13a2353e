"""What operators see of a running server: Prometheus metrics (`GET /metrics`) and an HTML status
page (`GET /status`), both beside the JSON of `GET /v1/status` and built from the same snapshot.

Request counts, latencies and bytes are counted in memory from the server's start (Prometheus
handles a counter that restarts from zero). What the run itself has done, its rounds, trained
steps, uploads and each client's loss, is read from SQLite at every scrape, so those numbers go on
across a restart as the run does.
"""

from __future__ import annotations

import time

import jinja2
from aiohttp import web
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


HISTORY = 20  # rounds the status page lists
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
UNMATCHED = "unmatched"  # the route label of a path no route serves: one series, not one per path
# A `_created` timestamp per series doubles the scrape and says nothing here (process-wide setting).
disable_created_metrics()
_PAGES = jinja2.Environment(loader=jinja2.PackageLoader("server", "templates"),
                            autoescape=jinja2.select_autoescape(), undefined=jinja2.StrictUndefined)


def snapshot(state) -> dict:
    """The run now, as `GET /v1/status` answers it: the open round, uploads, and per client its
    plan, budget, predictions, mean loss (this round's, or the last round's before it has any) and
    whether it uploaded this round (one read of the uploads: the count and the flags agree)."""
    losses = state.store.losses(state.round) or state.store.losses(state.round - 1)
    uploaded = set(state.store.uploaded(state.round))
    return {
        "round": state.round,
        "completed_rounds": state.store.completed_rounds(),
        "uploaded": len(uploaded),
        # list() copies in one step: the model thread adds clients while the event loop reads them.
        "clients": [_client(c, losses.get(c.id), c.id in uploaded) for c in list(state.trainer.clients.values())],
    }


def _client(client, loss: float | None, uploaded: bool) -> dict:
    plan, step = client.plan, client.plan.predicted_step
    out = {"id": client.id, "budget_mb": client.budget.memory_bytes / 2**20, "split": plan.split,
           "device_adapters": len(plan.ranks), "predicted_memory_mb": plan.predicted_memory.total / 2**20,
           "loss": loss, "measured": client.device is not None, "uploaded": uploaded}
    if client.budget.step_seconds is not None:
        out["step_seconds_budget"] = client.budget.step_seconds
    if step is not None:  # planned from its measurements: the whole process's peak, one step's seconds
        out |= {"predicted_peak_rss_mb": step.peak_rss_bytes / 2**20, "predicted_step_s": step.seconds}
    return out


def route_of(request: web.Request) -> str:
    """The route's pattern ('/v1/rounds/{round}/adapters'), so that label values stay few."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED


class Monitor:
    """The server's Prometheus registry: request instruments, the model thread's timings, and a
    collector that reads the run's state at each scrape."""

    def __init__(self, state):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("hsplitlora_http_requests", "HTTP requests answered, by route and status code",
                                ("route", "code"), registry=r)
        self.latency = Histogram("hsplitlora_http_request_seconds", "Seconds to answer a request, by route",
                                 ("route",), buckets=SECONDS, registry=r)
        self.received = Counter("hsplitlora_http_received_bytes", "Request body bytes, by route", ("route",), registry=r)
        self.sent = Counter("hsplitlora_http_sent_bytes", "Response body bytes, by route", ("route",), registry=r)
        self.step_seconds = Histogram(
            "hsplitlora_split_step_seconds",
            "Seconds of the model thread for one trained split step: checks, the client's server segment "
            "forward and backward, its optimizer step, encoding dL/dh", buckets=SECONDS, registry=r)
        self.retried = Counter("hsplitlora_split_steps_retried", "Split steps answered again from the retry cache, "
                               "not trained twice", registry=r)
        self.aggregation_seconds = Histogram(
            "hsplitlora_aggregation_seconds", "Seconds to aggregate a round: the aggregator, merging, re-planning "
            "its participants and writing the round's update", buckets=SECONDS, registry=r)
        r.register(_RunCollector(state))
        self.middleware = self._middleware()

    def _middleware(self):
        @web.middleware
        async def count_requests(request: web.Request, handler):
            start, code = time.perf_counter(), 500
            try:
                response = await handler(request)
                code = response.status
                return response
            except web.HTTPException as e:
                code = e.status
                raise
            finally:
                route = route_of(request)
                self.requests.labels(route, str(code)).inc()
                self.latency.labels(route).observe(time.perf_counter() - start)
                # What came off the wire, not Content-Length: a chunked body has none, and a
                # request refused before its body is read counts only what arrived.
                self.received.labels(route).inc(request.content.total_bytes)

        return count_requests

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Count a response's bytes once its headers are final (a file's length is known only then)."""
        self.sent.labels(route_of(request)).inc(response.content_length or 0)

    def exposition(self) -> web.Response:
        """The `/metrics` response in Prometheus' text format."""
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


class _RunCollector:
    """Gauges and counters of the run, read from the state at scrape time."""

    def __init__(self, state):
        self.state = state

    def collect(self):
        state = self.state
        now = snapshot(state)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield gauge("hsplitlora_round", "The open round's number", now["round"])
        yield CounterMetricFamily("hsplitlora_rounds_completed", "Rounds aggregated", value=now["completed_rounds"])
        yield CounterMetricFamily("hsplitlora_split_steps_trained", "Split steps trained (retries not counted)",
                                  value=state.store.steps_trained())
        yield CounterMetricFamily("hsplitlora_contributions_dropped", "Clients' round contributions left out of "
                                  "an aggregation since the server started (not finite, or an update over the "
                                  "limit of --max-update-ratio)", value=state.trainer.dropped)
        yield gauge("hsplitlora_clients_registered", "Clients registered", len(now["clients"]))
        yield gauge("hsplitlora_round_uploads", "Clients that uploaded their adapters in the open round", now["uploaded"])
        yield gauge("hsplitlora_round_uploads_needed", "Uploads that aggregate a round before its deadline",
                    state.cfg.clients_per_round)
        yield gauge("hsplitlora_round_open_seconds", "Seconds since the open round started",
                    time.time() - state.round_started)
        mib = 2**20  # the snapshot's sizes are MiB; Prometheus wants base units
        per_client = {
            "split": ("hsplitlora_client_split", "Transformer blocks the client's device runs", 1),
            "device_adapters": ("hsplitlora_client_device_adapters", "LoRA adapters in the client's device blocks", 1),
            "budget_mb": ("hsplitlora_client_budget_bytes", "The client's memory budget", mib),
            "predicted_memory_mb": ("hsplitlora_client_predicted_memory_bytes", "Training memory the plan predicts", mib),
            "loss": ("hsplitlora_client_train_loss", "Mean training loss of the client's steps in the open round "
                                                     "(the last round's before it has any)", 1),
        }
        for key, (name, doc, scale) in per_client.items():
            family = GaugeMetricFamily(name, doc, labels=["client"])
            for client in now["clients"]:
                if client[key] is not None:
                    family.add_metric([client["id"]], client[key] * scale)
            yield family


def render_status_page(state) -> str:
    """The HTML status page: the run's settings, the open round, every client, the recent rounds."""
    now = snapshot(state)
    cfg = state.cfg
    refused = sum(sample.value for metric in state.monitor.requests.collect() for sample in metric.samples
                  if sample.name.endswith("_total") and sample.labels["code"].startswith("4"))
    return _PAGES.get_template("status.html").render(
        status=now, cfg=cfg, history=state.store.round_history(HISTORY),
        round_open_s=time.time() - state.round_started, steps=state.store.steps_trained(), refused=int(refused),
        clock=time.strftime("%Y-%m-%d %H:%M:%S"), when=lambda t: time.strftime("%H:%M:%S", time.localtime(t)),
    )
