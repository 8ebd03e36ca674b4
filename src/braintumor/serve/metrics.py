"""`GET /metrics`: the service's health in Prometheus' text format, for the monitoring a site already runs.

Requests and latency per endpoint, answers by what they said (tumor suspected, no tumor, uncertain, not read,
unreadable), refusals by reason code, the gate distances and calibrated P(tumor) of the answers, per key id and
served model version; the served model as an info gauge. Labels hold codes, key ids and versions only: never a
file name, a series name, a digest or a client address. Each app has a registry of its own (two apps in one
process do not mix their counts).
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

READ_STATUSES = {"read", "uncertain"}


def answer_kind(result: dict) -> str:
    """tumor_suspected, no_tumor, uncertain, not_read or unreadable."""
    if "error" in result:
        return "unreadable"
    if result["status"] == "uncertain":
        return "uncertain"
    if result["status"] not in READ_STATUSES:
        return "not_read"
    return "tumor_suspected" if result.get("label") == 1 else "no_tumor"


class ServiceMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "braintumor_requests", "HTTP requests answered", ["endpoint", "code"], registry=self.registry
        )
        self.latency = Histogram(
            "braintumor_request_seconds",
            "time to answer a request",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30),
            registry=self.registry,
        )
        self.answers = Counter(
            "braintumor_answers",
            "scan answers by what they said",
            ["answer", "key_id", "model_version"],
            registry=self.registry,
        )
        self.refusals = Counter(
            "braintumor_refusals",
            "scans not read or unreadable, by reason code",
            ["reason", "key_id", "model_version"],
            registry=self.registry,
        )
        self.gate = Histogram(
            "braintumor_gate_distance",
            "out-of-distribution gate distance of each answer (refused above 1)",
            ["key_id", "model_version"],
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2, 3, 5),
            registry=self.registry,
        )
        self.p_tumor = Histogram(
            "braintumor_p_tumor",
            "calibrated P(tumor) of each scan read",
            ["key_id", "model_version"],
            buckets=tuple(round(0.05 * k, 2) for k in range(1, 20)),
            registry=self.registry,
        )
        self.model = Gauge(
            "braintumor_model_info", "the model served (1)", ["name", "version", "model_sha256"], registry=self.registry
        )

    def serving(self, described: dict) -> None:
        """The served model now (an alias that moved replaces the previous one)."""
        self.model.clear()
        self.model.labels(str(described.get("name")), str(described.get("version")), described["model_sha256"]).set(1)

    def observe(self, results: list[dict], key_id: str, version) -> None:
        """Count one request's answers."""
        version = str(version)
        for result in results:
            self.answers.labels(answer_kind(result), key_id, version).inc()
            if "error" in result:
                self.refusals.labels(result["error"].split(":", 1)[0], key_id, version).inc()
                continue
            if result["status"] not in READ_STATUSES:
                self.refusals.labels(result.get("refusal", "other"), key_id, version).inc()
            if result.get("gate_distance") is not None:
                self.gate.labels(key_id, version).observe(result["gate_distance"])
            if result.get("probability") is not None:
                self.p_tumor.labels(key_id, version).observe(result["probability"])

    def middleware(self):
        """Count and time every request by its route's path template (never the path itself, which names a
        study in `/v1/studies/{uid}/predict`)."""

        async def timed(request: Request, call_next):
            started = time.perf_counter()
            response = await call_next(request)
            route = request.scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            self.requests.labels(endpoint, str(response.status_code)).inc()
            self.latency.labels(endpoint).observe(time.perf_counter() - started)
            return response

        return timed

    def routes(self, identify, described) -> APIRouter:
        """`GET /metrics` behind the `metrics` scope (`identify(presented key, scope)`: `Access.identify`;
        `described()`: the served model now). The key may come in `X-API-Key` or as `Authorization: Bearer
        <key>`, which is what a Prometheus scrape config sends."""
        routes = APIRouter()

        @routes.get("/metrics", response_class=Response)
        def metrics(request: Request):
            bearer = request.headers.get("authorization", "")
            token = bearer[7:].strip() if bearer[:7].lower() == "bearer " else None
            identify(request.headers.get("x-api-key") or token, "metrics")
            self.serving(described())
            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

        return routes
