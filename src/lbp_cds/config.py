"""Every setting of lbp-cds, with its default, read from ``LBP_CDS_*`` environment variables.

The table in the README is generated from ``SETTINGS`` (``tests/test_config.py`` keeps them equal).
Values are validated when the application starts: a bad value stops the service with a message
naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lbp_cds.errors import ConfigError

PREFIX = "LBP_CDS_"


@dataclass(frozen=True)
class Settings:
    """The service's settings. Field names are the environment names without the prefix."""

    database_url: str = field(
        default="sqlite:///lbp-cds.sqlite3",
        metadata={"doc": "SQLAlchemy URL of the store (issued cards, feedback, JWT replay cache). "
                  "SQLite file by default; `postgresql+psycopg://...` for several replicas."},
    )
    dev: bool = field(
        default=False,
        metadata={"doc": "Run without client authentication (development only; logged loudly)."},
    )
    clients_file: str = field(
        default="",
        metadata={"doc": "YAML file of trusted CDS clients (iss, JWKS, tenant). Required unless dev."},
    )
    public_base_url: str = field(
        default="",
        metadata={"doc": "External base URL (e.g. `https://cds.example.org`) used as the JWT "
                  "audience behind proxies; empty: the URL the request arrived at."},
    )
    cors_origins: str = field(
        default="",
        metadata={"doc": "Comma-separated browser origins allowed by CORS; `*` only with dev."},
    )
    knowledge_dir: str = field(
        default="",
        metadata={"doc": "Folder of the knowledge pack; empty: the pack shipped with the package."},
    )
    parameters_file: str = field(
        default="",
        metadata={"doc": "YAML of site overrides for clinical parameters (values only), and "
                  "`silent_rules`: the rules run silently (see Going live)."},
    )
    silent_rules: str = field(
        default="",
        metadata={"doc": "Comma-separated rule ids (or `*` for all) run silently: evaluated and "
                  "stored as issued with `silent` marked, never shown (a go-live's silent "
                  "period; see Going live). Adds to the site parameters file's `silent_rules`."},
    )
    admin_token: str = field(
        default="",
        metadata={"doc": "Bearer token of the governance report at `/admin/burden` (counts per "
                  "rule, no patient data); empty: the page does not exist (404). A secret: "
                  "never logged."},
    )
    smart_client_id: str = field(
        default="lbp-cds-intake",
        metadata={"doc": "The intake app's SMART client id in dev mode (a loopback `iss`); "
                  "outside dev each EHR's id is `smart.client_id` in the clients file."},
    )
    smart_session_minutes: int = field(
        default=60,
        metadata={"doc": "How long an intake app session (and its unsaved answers) lives "
                  "without use; the EHR's token may end it sooner."},
    )
    smart_frame_ancestors: str = field(
        default="",
        metadata={"doc": "Space-separated origins allowed to show the intake app in a frame "
                  "(CSP `frame-ancestors`); empty: none. A framed app also needs "
                  "LBP_CDS_SMART_COOKIE_SAMESITE=None."},
    )
    smart_cookie_samesite: str = field(
        default="Lax",
        metadata={"doc": "SameSite of the intake app's session cookie: `Lax` (a new window or "
                  "tab) or `None` (the EHR frames the app from another site; https only)."},
    )
    fhir_connect_timeout_seconds: float = field(
        default=2.0, metadata={"doc": "Connect timeout of each FHIR request."})
    fhir_read_timeout_seconds: float = field(
        default=3.0, metadata={"doc": "Read timeout of each FHIR request."})
    fhir_deadline_seconds: float = field(
        default=4.0, metadata={"doc": "Overall deadline for all FHIR fetches of one hook call."})
    fhir_max_pages: int = field(
        default=50, metadata={"doc": "Most `next` pages followed per prefetch key."})
    fhir_page_size: int = field(
        default=500,
        metadata={"doc": "`_count` the service asks for when it searches the FHIR server itself "
                  "(servers may page smaller; templates sent to EHRs carry no `_count`)."},
    )
    fhir_max_resources: int = field(
        default=20000,
        metadata={"doc": "Most resources accepted per hook call (prefetch + fetch)."})
    fhir_max_response_bytes: int = field(
        default=20_000_000, metadata={"doc": "Largest FHIR response body read."})
    fhir_parallelism: int = field(
        default=8, metadata={"doc": "Concurrent FHIR requests per hook call."})
    fhir_allow_http: bool = field(
        default=True,
        metadata={"doc": "Accept `http://` fhirServer URLs (test servers); set false in production "
                  "to require https."},
    )
    max_body_bytes: int = field(
        default=20_000_000, metadata={"doc": "Largest request body accepted (413 above)."})
    max_json_depth: int = field(
        default=64, metadata={"doc": "Deepest JSON nesting accepted (400 above)."})
    jwt_algorithms: str = field(
        default="ES384,RS384",
        metadata={"doc": "Accepted JWT algorithms (asymmetric only; `none` and HS* refused)."},
    )
    jwt_leeway_seconds: int = field(
        default=30, metadata={"doc": "Clock skew allowed on exp, iat and nbf."})
    host: str = field(default="127.0.0.1", metadata={"doc": "Address `lbp-cds serve` binds."})
    port: int = field(default=8080, metadata={"doc": "Port `lbp-cds serve` binds."})
    workers: int = field(
        default=2, metadata={"doc": "gunicorn worker processes (one per core is a good start)."})
    threads: int = field(
        default=4, metadata={"doc": "Threads per worker (FHIR fetches wait on the network)."})
    keepalive_seconds: int = field(
        default=0, metadata={"doc": "HTTP keep-alive. 0 (a connection per call) spreads calls "
                             "over the workers; with keep-alive a few clients can all land on "
                             "one worker and leave a core idle."})
    graceful_timeout_seconds: int = field(
        default=20, metadata={"doc": "Time given to in-flight requests on shutdown."})
    log_level: str = field(default="INFO", metadata={"doc": "Log level (JSON logs to stderr)."})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from the environment, then apply keyword overrides.

        Args:
            environ: the environment to read (default ``os.environ``).
            **overrides: values that win over the environment (tests, CLI flags).

        Returns:
            Validated settings.

        Raises:
            ConfigError: a variable does not parse as its type, or a value is out of range.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = PREFIX + f.name.upper()
            if name in env:
                values[f.name] = _convert(name, env[name], f.type)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Check ranges and combinations.

        Raises:
            ConfigError: naming the variable at fault.
        """
        positive = ("fhir_connect_timeout_seconds", "fhir_read_timeout_seconds",
                    "fhir_deadline_seconds", "fhir_max_pages", "fhir_max_resources",
                    "fhir_max_response_bytes", "fhir_parallelism", "fhir_page_size",
                    "max_body_bytes",
                    "max_json_depth", "workers", "threads", "port", "smart_session_minutes")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{PREFIX}{name.upper()} must be positive")
        if self.keepalive_seconds < 0:
            raise ConfigError(f"{PREFIX}KEEPALIVE_SECONDS must be 0 or more")
        algorithms = self.algorithms
        for alg in algorithms:
            if alg.lower() == "none" or alg.upper().startswith("HS"):
                raise ConfigError(
                    f"{PREFIX}JWT_ALGORITHMS may not contain {alg}: CDS Hooks forbids `none` "
                    "and symmetric algorithms")
        if not algorithms:
            raise ConfigError(f"{PREFIX}JWT_ALGORITHMS is empty")
        if "*" in self.origins and not self.dev:
            raise ConfigError(f"{PREFIX}CORS_ORIGINS='*' is allowed only in dev mode")
        silent = self.silent
        if "*" in silent and len(silent) > 1:
            raise ConfigError(f"{PREFIX}SILENT_RULES is `*` (every rule) or a list of rule ids, "
                              "not both")
        if self.smart_cookie_samesite not in ("Lax", "Strict", "None"):
            raise ConfigError(f"{PREFIX}SMART_COOKIE_SAMESITE must be Lax, Strict or None")
        if self.smart_cookie_samesite == "None" and self.dev:
            raise ConfigError(f"{PREFIX}SMART_COOKIE_SAMESITE=None needs a Secure cookie, and "
                              "dev mode serves plain http: use Lax in dev mode")
        if any(o in ("*", "'unsafe-inline'") or ";" in o
               for o in self.smart_frame_ancestors.split()):
            raise ConfigError(f"{PREFIX}SMART_FRAME_ANCESTORS lists origins (https://ehr."
                              "example.org), not `*` or directives")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"{PREFIX}LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR")

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The accepted JWT algorithms as a tuple."""
        return tuple(a.strip() for a in self.jwt_algorithms.split(",") if a.strip())

    @property
    def origins(self) -> tuple[str, ...]:
        """The CORS origins as a tuple."""
        return tuple(o.strip() for o in self.cors_origins.split(",") if o.strip())

    @property
    def silent(self) -> tuple[str, ...]:
        """The silent rule ids as written (``*`` for all), without checking them against a pack.
        """
        return tuple(dict.fromkeys(r.strip() for r in self.silent_rules.split(",") if r.strip()))

    def silent_rule_ids(self, known: Iterable[str]) -> frozenset[str]:
        """The rules run silently, checked against the rule ids of the loaded pack.

        Args:
            known: every rule id of the knowledge pack.

        Returns:
            The silent rule ids (all of ``known`` for ``*``).

        Raises:
            ConfigError: a listed rule id is not in the pack (a typo would otherwise leave the
                rule live while the site believes it silent).
        """
        return resolve_silent(self.silent, known, f"{PREFIX}SILENT_RULES")

    @property
    def knowledge_path(self) -> Path | None:
        """The configured knowledge folder, or None for the bundled pack."""
        return Path(self.knowledge_dir) if self.knowledge_dir else None


def resolve_silent(listed: Iterable[str], known: Iterable[str], where: str) -> frozenset[str]:
    """Rule ids listed as silent (``*``: all of ``known``), each checked to be a known rule.

    Raises:
        ConfigError: naming ``where`` and the unknown ids.
    """
    listed = tuple(listed)
    known_ids = frozenset(known)
    if "*" in listed:
        return known_ids
    unknown = [r for r in listed if r not in known_ids]
    if unknown:
        raise ConfigError(
            f"{where} names rules the knowledge pack does not have: {', '.join(unknown)} "
            f"(its rules: {', '.join(sorted(known_ids))})")
    return frozenset(listed)


def _convert(name: str, raw: str, kind: Any) -> Any:
    kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    try:
        if kind == "bool":
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind}") from None
    return raw


def settings_table() -> str:
    """Return the Markdown table of every setting (used in the README)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for f in fields(Settings):
        default = f.default
        shown = f"`{default}`" if default not in ("", None) else "(empty)"
        if isinstance(default, bool):
            shown = f"`{str(default).lower()}`"
        rows.append(f"| `{PREFIX}{f.name.upper()}` | {shown} | {f.metadata['doc']} |")
    return "\n".join(rows)
