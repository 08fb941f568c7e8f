"""Production serving under gunicorn (threaded workers), started by ``lbp-cds serve``."""

from __future__ import annotations

import gc
import logging
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from lbp_cds.config import Settings
from lbp_cds.observability import configure_logging

log = logging.getLogger(__name__)


def _child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


class GunicornApp(BaseApplication):
    """gunicorn running ``create_app(settings)`` in each worker.

    Args:
        settings: the service settings (bind address, workers, threads, timeouts).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        s = self.settings
        options = {
            "bind": f"{s.host}:{s.port}",
            "workers": s.workers,
            "threads": s.threads,
            "worker_class": "gthread",
            "graceful_timeout": s.graceful_timeout_seconds,
            "timeout": max(30, int(s.fhir_deadline_seconds * 3)),
            "keepalive": s.keepalive_seconds,
            "accesslog": None,
            "errorlog": "-",
            "loglevel": s.log_level.lower(),
            "child_exit": _child_exit,
            "proc_name": "lbp-cds",
            # No control socket: it would be written to $HOME, read-only in our container.
            "control_socket_disable": True,
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:  # type: ignore[override]  # a Flask app is the WSGI callable
        from lbp_cds.app import create_app

        configure_logging(self.settings.log_level)
        app = create_app(self.settings)
        tune_gc()
        tune_malloc()
        return app


def tune_gc() -> None:
    """Keep garbage collection off the request path's critical latency.

    A 1 MB prefetch allocates a few hundred thousand objects that live for the whole request;
    with CPython's default thresholds they trigger hundreds of collections per request, and the
    full ones walk the knowledge pack too. The pack is frozen out of collection (it lives as
    long as the worker) and young collections run less often.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLDS[0], GC_THRESHOLDS[1], GC_THRESHOLDS[2])


GC_THRESHOLDS = (50_000, 20, 20)

# glibc's mallopt parameters (malloc.h) and the values set: buffers up to 32 MiB (a hook body,
# its JSON output) come from the heap, and the heap keeps up to 64 MiB of freed memory.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MALLOC_MMAP_THRESHOLD = 32 * 1024 * 1024
MALLOC_TRIM_THRESHOLD = 64 * 1024 * 1024


def tune_malloc() -> bool:
    """Keep a worker's large buffers in its heap between calls (glibc only; else a no-op).

    By default glibc serves each megabyte-sized request body from a fresh mmap and returns the
    heap's free top to the kernel: every such call then faulted in 250-400 fresh pages
    (0.4-0.7 ms of kernel time per call; measured with /proc/<pid>/stat under wrk). Held in
    the heap, they cost none; the price is resident memory that stays at the high-water mark.

    Returns:
        True when glibc accepted both settings.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return False  # not glibc (musl, macOS): its allocator has its own policy
    if mallopt is None:
        return False
    ok: bool = mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) == 1
    trimmed: bool = mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD) == 1
    return trimmed and ok


def run(settings: Settings) -> int:
    """Check that the application builds, then serve it until SIGTERM/SIGINT.

    Returns:
        The process exit code.
    """
    from lbp_cds import create_app

    configure_logging(settings.log_level)
    app = create_app(settings)  # fail here, with a clear message, rather than in every worker
    app.extensions["lbp_cds"].store.engine.dispose()
    if settings.dev:
        log.warning("=" * 60)
        log.warning("lbp-cds is running WITHOUT client authentication (--dev)")
        log.warning("=" * 60)
    log.info("serving", extra={"bind": f"{settings.host}:{settings.port}",
                               "workers": settings.workers, "threads": settings.threads})
    GunicornApp(settings).run()
    return 0
