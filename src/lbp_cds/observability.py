"""Structured logs and Prometheus metrics.

Logs are JSON lines on stderr with the request id and the hookInstance; they never contain a
token, a patient identifier or a name (``tests/test_observability.py`` runs whole scenarios and
searches the logs). Metrics follow gunicorn's process model: with several workers they are
aggregated through ``PROMETHEUS_MULTIPROC_DIR``, which ``lbp-cds serve`` sets up.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from contextvars import ContextVar
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

request_id_var: ContextVar[str] = ContextVar("request_id", default="")
hook_instance_var: ContextVar[str] = ContextVar("hook_instance", default="")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUESTS = Counter("lbp_cds_requests_total", "HTTP requests by endpoint, service, hook, status",
                   ["endpoint", "service", "hook", "status"])
LATENCY = Histogram("lbp_cds_request_seconds", "HTTP request latency by endpoint, service, hook",
                    ["endpoint", "service", "hook"], buckets=LATENCY_BUCKETS)
CARDS = Counter("lbp_cds_cards_total", "Cards issued by rule and indicator",
                ["service", "rule", "indicator"])
CARDS_SILENT = Counter("lbp_cds_cards_silent_total", "Cards of rules run silently (recorded, "
                       "not shown) by rule and indicator", ["service", "rule", "indicator"])
FHIR_FETCH = Histogram("lbp_cds_fhir_fetch_seconds", "Time to fetch one prefetch key from the "
                       "EHR's FHIR server", ["key", "outcome"], buckets=LATENCY_BUCKETS)
FHIR_FAILURES = Counter("lbp_cds_fhir_fetch_failures_total", "Prefetch keys that could not be "
                        "fetched", ["key"])
PRECONDITION_FAILED = Counter("lbp_cds_precondition_failed_total", "412 answers by service",
                              ["service"])
AUTH_FAILURES = Counter("lbp_cds_auth_failures_total", "Refused client JWTs", ["endpoint"])
PARSE_FAILURES = Counter("lbp_cds_unparsable_resources_total", "FHIR resources skipped because "
                         "they did not parse", ["resource_type"])
STORE_FAILURES = Counter("lbp_cds_store_failures_total", "Store writes that failed",
                         ["operation"])
FEEDBACK = Counter("lbp_cds_feedback_total", "Feedback entries received", ["outcome"])
KNOWLEDGE = Gauge("lbp_cds_knowledge_info", "1 for the knowledge pack this replica serves, by the "
                  "first 12 hex digits of its SHA-256", ["digest"], multiprocess_mode="livemax")


def metrics_payload() -> tuple[bytes, str]:
    """The metrics exposition (aggregated across workers when multiprocess mode is on)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


# Attributes of a LogRecord that are not the caller's `extra`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
# Keys that must never reach a log line, whatever a caller passes as `extra`.
_FORBIDDEN = {"token", "access_token", "authorization", "patient", "patient_id", "patientId",
              "name", "birthDate", "jwt"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, hookInstance, extras."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid, hook_instance = request_id_var.get(), hook_instance_var.get()
        if rid:
            doc["request_id"] = rid
        if hook_instance:
            doc["hook_instance"] = hook_instance
        for key, value in vars(record).items():
            if key in _STANDARD or key.startswith("_"):
                continue
            doc[key] = "[redacted]" if key in _FORBIDDEN else value
        if record.exc_info and record.exc_info[0] is not None:
            # The type and the frames, not the message: exception messages (pydantic's above all)
            # quote the data that failed, which may be a patient's.
            doc["exception"] = record.exc_info[0].__name__
            doc["trace"] = "".join(traceback.format_tb(record.exc_info[2]))
        return json.dumps(doc, default=str)


def configure_logging(level: str = "INFO", stream: Any = None) -> None:
    """Send every log record of the process as JSON lines to ``stream`` (default stderr)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("urllib3", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
