"""The application factory: load and check the knowledge, open the store, wire the API."""

from __future__ import annotations

import contextlib
import logging
import socket
import tempfile
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
from flask import Flask
from flask_cors import CORS

from lbp_cds import admin, api, egress, intake, knowledge, observability, pama, smart
from lbp_cds.auth import JwtVerifier, TrustedClient, load_clients
from lbp_cds.cards import KNOWLEDGE_DIGEST_SHOWN
from lbp_cds.config import Settings
from lbp_cds.errors import ConfigError
from lbp_cds.fhir_data import FetchPolicy, FhirFetcher
from lbp_cds.rules import RuleEngine
from lbp_cds.store import Store

log = logging.getLogger(__name__)


def create_app(
    config: Settings | None = None,
    *,
    clock: Callable[[], datetime] | None = None,
    session: requests.Session | None = None,
    resolver: egress.Resolver = socket.getaddrinfo,
) -> Flask:
    """Build the application: load and check the knowledge, open the store, wire the API.

    Args:
        config: settings (default: from the ``LBP_CDS_*`` environment).
        clock: the clock hook calls use (tests and scenarios fix it).
        session: the ``requests.Session`` used towards FHIR servers and JWKS URLs (tests: a
            transport of their own). Default: a plain session for JWKS URLs, and for FHIR
            servers ``egress.pinned_session``, which connects only to approved addresses.
        resolver: resolves FHIR server host names for the egress check (tests map names).

    Returns:
        The Flask application.

    Raises:
        ConfigError: bad settings, or authentication on without any trusted client.
        KnowledgeError: the knowledge pack is inconsistent.
    """
    settings = config or Settings.from_env()
    pack = knowledge.load(settings.knowledge_path,
                          Path(settings.parameters_file) if settings.parameters_file else None)
    engine = RuleEngine(pack)
    pama.rater_for(engine)  # pama.yaml's condition trees compiled (and checked) at start-up
    intake.load_form(pack)  # the intake app's form file checked against the pack at start-up
    _ = pack.code_universe  # built once, here, not on the first hook call
    observability.KNOWLEDGE.labels(pack.digest[:KNOWLEDGE_DIGEST_SHOWN]).set(1)
    log.info("knowledge loaded", extra={"knowledge_digest": pack.digest, "root": str(pack.root),
                                        "rules": len(pack.rules), "services": len(pack.services)})
    silent = settings.silent_rule_ids(r.id for r in pack.rules) | pack.silent_rules
    if silent:
        log.warning("rules run silently: recorded, not shown", extra={"rules": sorted(silent)})
    store = Store(settings.database_url)
    store.migrate()
    http = session or requests.Session()  # JWKS URLs (from the clients file, not requests)
    verifier = None
    clients: list[TrustedClient] = []
    if settings.dev:
        log.warning("DEV MODE: client authentication is OFF; never expose this instance")
    else:
        if not settings.public_base_url:
            raise ConfigError(
                "LBP_CDS_PUBLIC_BASE_URL is required when authentication is on: a JWT's `aud` "
                "is checked against this service's public URL, never against the Host header "
                "a caller sends")
        if not settings.clients_file:
            raise ConfigError(
                "no trusted CDS clients: set LBP_CDS_CLIENTS_FILE (or --clients FILE), "
                "or run with --dev for local development without authentication")
        clients = load_clients(Path(settings.clients_file))
        if not clients:
            raise ConfigError(f"{settings.clients_file} lists no clients")
        for client in clients:
            if not client.fhir_servers:
                log.warning("trusted client has no fhir_servers: its calls that name a "
                            "fhirServer will be refused (400)", extra={"iss": client.iss})
        verifier = JwtVerifier(clients, store, algorithms=settings.algorithms,
                               leeway_seconds=settings.jwt_leeway_seconds, session=http)
    policy = FetchPolicy(
        connect_timeout=settings.fhir_connect_timeout_seconds,
        read_timeout=settings.fhir_read_timeout_seconds,
        deadline=settings.fhir_deadline_seconds,
        max_pages=settings.fhir_max_pages,
        page_size=settings.fhir_page_size,
        max_resources=settings.fhir_max_resources,
        max_response_bytes=settings.fhir_max_response_bytes,
        parallelism=settings.fhir_parallelism,
        allow_http=settings.fhir_allow_http,
    )
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["lbp_cds"] = api.Runtime(
        settings=settings, knowledge=pack, engine=engine, store=store, verifier=verifier,
        fetcher=FhirFetcher(session, policy, resolver=resolver), policy=policy,
        clock=clock or api.now_utc, silent=silent, clients=tuple(clients),
    )
    app.register_blueprint(api.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(smart.bp)
    if settings.dev:
        from lbp_cds import smart_dev

        app.register_blueprint(smart_dev.bp)  # the dev launcher: never outside dev mode
    api.errors_to_outcome(app)
    origins = list(settings.origins) or (["*"] if settings.dev else [])
    if origins:
        CORS(app, origins=origins, methods=["GET", "POST", "OPTIONS"],
             allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
             expose_headers=["Origin", "Accept", "Content-Location", "Location",
                             "X-Requested-With", "X-Request-Id"],
             max_age=600)
    return app


@contextlib.contextmanager
def offline_app(clock: Callable[[], datetime], **overrides: Any) -> Iterator[Flask]:
    """The service's application for in-process evaluation (``lbp-cds evaluate``,
    ``lbp-cds simulate``): the environment's settings and pack, no client authentication, and a
    throw-away SQLite store, disposed of on the way out.

    Args:
        clock: the clock the hook calls use.
        overrides: settings that differ from the environment's (``public_base_url``...).
    """
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.from_env(dev=True, database_url=f"sqlite:///{tmp}/offline.sqlite3",
                                     **overrides)
        app = create_app(settings, clock=clock)
        try:
            yield app
        finally:
            app.extensions["lbp_cds"].store.engine.dispose()
