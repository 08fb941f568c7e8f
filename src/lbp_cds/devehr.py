"""An EHR stand-in for SMART App Launch 2.0: a real OAuth2 server before a real FHIR store.

Two users: the intake app's tests (``tests/smart_ehr.py``, in front of the suite's sekmet-fhir)
and the dev launcher (``/smart/dev``, dev mode only, in front of a loopback FHIR server such as
``make fhir``'s), which lets a new user try the app as an EHR would launch it. It is never
started outside dev mode.

What is real here, and why:

* **The authorization server is authlib's** (``authlib.integrations.flask_oauth2``): the
  authorization code grant with its PKCE extension (``CodeChallenge(required=True)``, narrowed to
  S256 as SMART 2.0 requires), code binding to client and redirect URI, RFC 6749 error responses
  (errors about the client or its redirect URI never redirect, the others do).  Only the SMART
  layer is ours: ``aud`` must name the FHIR base, ``launch`` must be a launch this EHR created,
  a standalone launch needs ``launch/patient`` and a signed-in patient, and the token response
  carries the launch context (``patient``, ``encounter``, ``appContext``, ``need_patient_banner``)
  and an RS256 ``id_token`` when ``openid`` was granted.
* **The FHIR data is sekmet-fhir's** (the suite's real FHIR server, :mod:`tests.fhir_server`).
  sekmet's own SMART support only does client_credentials with HS256 tokens, so this EHR is a
  *gateway*, as real EHRs are in front of their FHIR store: ``/fhir/...`` checks the access tokens
  this EHR issued (expiry, SMART v1 or v2 scopes, the patient compartment of a patient-context
  token) and forwards the request to sekmet with sekmet's own static token, then rewrites sekmet's
  base URL to the gateway's so ``fullUrl``, ``next`` links and ``Location`` stay on the gateway.
* The server is a real HTTP server (werkzeug, threaded, a free loopback port) that the app under
  test reaches over sockets; :meth:`SmartEhr.backend_down` makes the gateway meet a real refused
  connection (a bound, non-listening loopback port) and answer 502 as a gateway does.

What is simplified, or chosen (each one deliberate):

* No consent page: authorization is auto-approved for the launch's user, or for
  :attr:`SmartEhr.portal_patient` in a standalone launch.  Public clients only, no refresh tokens.
* Only ``patient/`` resource scopes (``permission-patient``), and only in the server's own syntax:
  a ``permission="v2"`` server grants ``patient/X.rs``-style scopes, a ``"v1"`` one only
  ``.read``/``.write``/``.*``; the granted scope is what was asked, narrowed to that and to the
  client's registered ceiling (an empty result is ``invalid_scope``).  ``fhirUser`` appears in
  the ``id_token`` only when the ``fhirUser`` scope was granted; with no user (``fhir_user=None``)
  neither ``openid`` nor ``fhirUser`` is granted.
* A patient-context token may search only with ``patient=``/``subject=`` naming its patient
  (``_id=`` on Patient), and search answers are filtered to its patient afterwards: sekmet
  *ignores* parameters it does not index (it indexes none on QuestionnaireResponse) and would
  otherwise answer with every patient's records.  A read by id is checked on the store's answer.
  Transactions and ``$operations`` are for the system token only.

Nothing here logs a token or a patient identifier: werkzeug's request log is off, and
:attr:`SmartEhr.token_log` keeps no ``code`` or ``code_verifier`` values (only whether they were
sent).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import jwt
import requests
from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc6749.errors import InvalidRequestError, InvalidScopeError
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc7636.challenge import compare_s256_code_challenge
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask, Response, request
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

FHIR_JSON = "application/fhir+json"


class Backend(Protocol):
    """The FHIR store behind the gateway: its base URL and the static token it accepts."""

    @property
    def base_url(self) -> str: ...

    @property
    def token(self) -> str | None: ...


@dataclass(frozen=True)
class FhirBackend:
    """A FHIR store given by URL and token (the dev launcher's: ``make fhir``)."""

    base_url: str
    token: str | None = None

#: How long an authorization code may wait for its token request (RFC 6749 4.1.2: short-lived).
CODE_LIFETIME_S = 60
#: The clinician an EHR launch runs for unless :meth:`SmartEhr.new_launch` names another.
DEFAULT_FHIR_USER = "Practitioner/smart-ehr-clinician"
UPSTREAM_TIMEOUT_S = 30.0
KEY_ID = "smart-ehr-1"

#: Scopes that are not about FHIR resources; ``launch/encounter`` is accepted, never required.
CONTEXT_SCOPES = ("openid", "fhirUser", "launch", "launch/patient", "launch/encounter")
CAPABILITIES = (
    "launch-ehr",
    "launch-standalone",
    "client-public",
    "context-ehr-patient",
    "context-standalone-patient",
    "sso-openid-connect",
    "permission-patient",
)
_V2_SCOPE = re.compile(r"^(patient|user|system)/([A-Z][A-Za-z]*|\*)\.(c?r?u?d?s?)$")
_V1_SCOPE = re.compile(r"^(patient|user|system)/([A-Z][A-Za-z]*|\*)\.(read|write|\*)$")
_V1_PERMISSIONS = {"read": "rs", "write": "cud", "*": "cruds"}
#: Resource elements that put a resource in a patient's compartment (enough for the app's data).
_PATIENT_ELEMENTS = ("subject", "patient", "beneficiary")
#: Request headers a FHIR client may send that the store must see.
_FORWARDED_REQUEST_HEADERS = (
    "Accept", "Content-Type", "If-None-Exist", "Prefer", "If-Match", "If-None-Match",
    "If-Modified-Since",
)
_FORWARDED_RESPONSE_HEADERS = ("Location", "Content-Location", "ETag", "Last-Modified")


# ----------------------------------------------------------------------------------- scopes


@dataclass(frozen=True)
class ResourceScope:
    """A SMART resource scope, v1 (``patient/Condition.read``) or v2 (``patient/Condition.rs``).

    Attributes:
        context: ``patient``, ``user`` or ``system``.
        resource_type: A FHIR resource type, or ``*``.
        permissions: The letters of ``cruds`` it grants (v1 ``read`` is ``rs``, ``write`` ``cud``).
        syntax: ``v1`` or ``v2``.
    """

    context: str
    resource_type: str
    permissions: frozenset[str]
    syntax: str

    def covers(self, other: ResourceScope) -> bool:
        """Whether this scope grants everything ``other`` asks for.

        Args:
            other: The scope asked for.

        Returns:
            True when context matches, the type matches (or this one is ``*``) and the
            permissions are a subset of this scope's.
        """
        return (
            self.context == other.context
            and self.resource_type in ("*", other.resource_type)
            and other.permissions <= self.permissions
        )

    def allows(self, resource_type: str, permission: str) -> bool:
        """Whether this scope allows one interaction on a resource type.

        Args:
            resource_type: e.g. ``QuestionnaireResponse``.
            permission: One letter of ``cruds``.

        Returns:
            True when it does.
        """
        return self.resource_type in ("*", resource_type) and permission in self.permissions


def parse_resource_scope(scope: str) -> ResourceScope | None:
    """Parse a SMART resource scope.

    Args:
        scope: One scope string.

    Returns:
        The parsed scope, or ``None`` when it is not a resource scope in v1 or v2 syntax (v2
        permissions must be non-empty and in ``cruds`` order; v2 query suffixes are not taken).
    """
    if match := _V1_SCOPE.match(scope):
        context, rtype, perm = match.groups()
        return ResourceScope(context, rtype, frozenset(_V1_PERMISSIONS[perm]), "v1")
    if (match := _V2_SCOPE.match(scope)) and match.group(3):
        context, rtype, perm = match.groups()
        return ResourceScope(context, rtype, frozenset(perm), "v2")
    return None


# ------------------------------------------------------------------------------ records


@dataclass
class _Client:
    """A registered public client (authlib's ``ClientMixin`` contract)."""

    client_id: str
    redirect_uris: list[str]
    scopes: list[str] | None
    ehr: SmartEhr = field(repr=False)

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str | None:
        # SMART apps always send redirect_uri; with several registered none is a safe default.
        return self.redirect_uris[0] if len(self.redirect_uris) == 1 else None

    def get_allowed_scope(self, scope: str | None) -> str | None:
        # None makes authlib answer invalid_scope: nothing asked, or nothing grantable.
        granted = [s for s in (scope or "").split() if self._may_ask(s)]
        return " ".join(dict.fromkeys(granted)) or None

    def _may_ask(self, scope: str) -> bool:
        if not self.ehr.supports_scope(scope):
            return False
        if self.scopes is None or scope in self.scopes:
            return True
        asked = parse_resource_scope(scope)
        return asked is not None and any(
            (ceiling := parse_resource_scope(s)) is not None and ceiling.covers(asked)
            for s in self.scopes
        )

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.redirect_uris  # exact match, no prefix or pattern

    def check_client_secret(self, client_secret: str) -> bool:
        return False  # public clients have none

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == "none"

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "authorization_code"


@dataclass(frozen=True)
class _Launch:
    """What the EHR knows when it launches an app (or what the portal knows, standalone)."""

    patient: str
    fhir_user: str | None
    encounter: str | None = None
    app_context: str | None = None


@dataclass
class _AuthCode:
    """An issued authorization code (authlib's ``AuthorizationCodeMixin`` contract)."""

    code: str
    client_id: str
    redirect_uri: str
    scope: str
    launch: _Launch
    code_challenge: str
    code_challenge_method: str
    nonce: str | None
    issued_at: float

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def is_expired(self) -> bool:
        return time.time() > self.issued_at + CODE_LIFETIME_S


@dataclass
class _Token:
    """An issued access token and what it may reach."""

    client_id: str
    scopes: list[str]
    launch: _Launch | None  # None for the system token
    expires_at: float
    revoked: bool = False

    def summary(self) -> dict[str, Any]:
        assert self.launch is not None
        return {
            "client_id": self.client_id,
            "scope": " ".join(self.scopes),
            "patient": self.launch.patient,
            "encounter": self.launch.encounter,
            "fhir_user": self.launch.fhir_user,
            "expires_at": self.expires_at,
            "expired": time.time() >= self.expires_at,
            "revoked": self.revoked,
        }


class _Refused(Exception):
    """A gateway refusal: HTTP status, OperationOutcome issue code, diagnostics."""

    def __init__(self, status: int, code: str, diagnostics: str) -> None:
        super().__init__(diagnostics)
        self.status, self.code, self.diagnostics = status, code, diagnostics


# ------------------------------------------------------------------------ authlib wiring


class _S256CodeChallenge(CodeChallenge):  # type: ignore[misc]
    """PKCE as SMART App Launch 2.0 has it: a code challenge is mandatory and only S256 counts.

    authlib's ``CodeChallenge(required=True)`` still accepts an authorization request without a
    challenge (it fails later, at the token endpoint) and takes ``plain`` (also the default when
    no method is sent); SMART 2.0 refuses both up front.
    """

    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]
    CODE_CHALLENGE_METHODS = {"S256": compare_s256_code_challenge}

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        data = grant.request.payload.data
        if self.required and not data.get("code_challenge"):
            raise InvalidRequestError("Missing 'code_challenge': PKCE is required")
        if data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("'code_challenge_method' must be S256")
        super().validate_code_challenge(grant, redirect_uri)


class _SmartCodeGrant(grants.AuthorizationCodeGrant):  # type: ignore[misc]
    """The authorization code grant plus SMART's launch checks and token response fields."""

    TOKEN_ENDPOINT_AUTH_METHODS = ["none"]  # public clients (client-public)

    @property
    def ehr(self) -> SmartEhr:
        return self.server.ehr  # type: ignore[no-any-return]

    def validate_authorization_request(self) -> str:
        redirect_uri: str = super().validate_authorization_request()
        try:
            self.launch_context = self.ehr._check_launch(self.request)
        except OAuth2Error as error:
            error.redirect_uri = redirect_uri  # client and redirect URI are known good here
            raise
        return redirect_uri

    def save_authorization_code(self, code: str, request: Any) -> None:
        data = request.payload.data
        self.ehr._codes[code] = _AuthCode(
            code=code,
            client_id=request.client.client_id,
            redirect_uri=request.payload.redirect_uri,
            scope=request.scope,
            launch=request.user,
            code_challenge=data["code_challenge"],
            code_challenge_method=data["code_challenge_method"],
            nonce=data.get("nonce"),
            issued_at=time.time(),
        )

    def query_authorization_code(self, code: str, client: _Client) -> _AuthCode | None:
        with self.ehr._lock:
            if code in self.ehr._used_codes:
                # RFC 6749 4.1.2: a code used twice revokes what it was exchanged for.
                for token in self.ehr._used_codes[code]:
                    token.revoked = True
                return None
            item = self.ehr._codes.get(code)
        if item is None or item.client_id != client.client_id or item.is_expired():
            return None
        return item

    def delete_authorization_code(self, authorization_code: _AuthCode) -> None:
        with self.ehr._lock:
            self.ehr._codes.pop(authorization_code.code, None)
            self.ehr._used_codes.setdefault(authorization_code.code, [])

    def authenticate_user(self, authorization_code: _AuthCode) -> _Launch:
        return authorization_code.launch

    def save_token(self, token: dict[str, Any]) -> None:
        # The dict saved here is the one authlib sends back: SMART's context fields go in it.
        code: _AuthCode = self.request.authorization_code
        self.ehr._record_token(token, code)


class _SmartAuthorizationServer(AuthorizationServer):  # type: ignore[misc]
    def __init__(self, app: Flask, ehr: SmartEhr) -> None:
        self.ehr = ehr
        super().__init__(app, query_client=ehr._clients.get, save_token=lambda t, r: None)


class _QuietRequestHandler(WSGIRequestHandler):
    """werkzeug's handler without the access log: request lines carry launch ids and codes."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        return None


# ------------------------------------------------------------------------------- the EHR


class SmartEhr:
    """An EHR stand-in: SMART authorization server plus FHIR gateway in front of sekmet.

    Args:
        backend: The FHIR store the gateway forwards to (with its static token).
        token_lifetime: Access token lifetime in seconds.
        permission: ``"v2"`` (SMART 2.0 scopes, ``patient/X.rs``) or ``"v1"`` (``.read``/
            ``.write`` only); the other syntax is never granted.
        clients: Clients to register at once: ``{client_id: {"redirect_uris": [...],
            "scopes": "..."}}`` (``scopes`` optional), as :meth:`register_client` takes them.

    Attributes:
        backend: The sekmet server.
        portal_patient: The patient signed in to the portal, for standalone launches; ``None``
            makes a standalone authorization answer ``access_denied``.
        system_token: A bearer token with full access through the gateway, no scope or
            compartment checks (what an EHR passes a CDS service as ``fhirAuthorization``).
        authorize_log: One dict per ``/auth/authorize`` request: its parameters, ``status``,
            ``error`` (or None) and, on success, ``code_issued: True`` (never the code).
        token_log: One dict per ``/auth/token`` request: its parameters without ``code`` and
            ``code_verifier``, ``code_sent``/``code_verifier_sent`` booleans, ``status``, ``error``.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        token_lifetime: int = 300,
        permission: str = "v2",
        clients: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        if permission not in ("v1", "v2"):
            raise ValueError("permission must be 'v1' or 'v2'")
        self.backend = backend
        self.token_lifetime = token_lifetime
        self.permission = permission
        self.portal_patient: str | None = None
        self.system_token = secrets.token_urlsafe(32)
        self.authorize_log: list[dict[str, Any]] = []
        self.token_log: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._clients: dict[str, _Client] = {}
        self._launches: dict[str, _Launch] = {}
        self._codes: dict[str, _AuthCode] = {}
        self._used_codes: dict[str, list[_Token]] = {}
        self._tokens: dict[str, _Token] = {}
        self._upstream = backend.base_url
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""
        for client_id, spec in (clients or {}).items():
            self.register_client(client_id, list(spec["redirect_uris"]), spec.get("scopes"))

    # ------------------------------------------------------------------ lifecycle

    @property
    def iss(self) -> str:
        """The FHIR base URL (the app's ``iss``, the ``aud`` it must ask for)."""
        return f"{self.base_url}/fhir"

    def start(self) -> SmartEhr:
        """Serve on a free loopback port in a background thread.

        Returns:
            This EHR, started.
        """
        if self._server is not None:
            return self
        app = self._build_app()
        self._server = make_server(
            "127.0.0.1", 0, app, threaded=True, request_handler=_QuietRequestHandler
        )
        self.base_url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="smart-ehr", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket.  Safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=10)
        server.server_close()

    def __enter__(self) -> SmartEhr:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------- test controls

    def register_client(
        self, client_id: str, redirect_uris: list[str], scopes: str | None = None
    ) -> None:
        """Register a public client (``token_endpoint_auth_method: none``).

        Args:
            client_id: Its id.
            redirect_uris: The exact redirect URIs it may use.
            scopes: The most it may be granted, space-separated (a wildcard scope such as
                ``patient/*.rs`` covers the narrower ones); ``None`` for anything supported.
        """
        self._clients[client_id] = _Client(
            client_id, list(redirect_uris), scopes.split() if scopes is not None else None, self
        )

    def new_launch(
        self,
        patient: str,
        *,
        app_context: str | None = None,
        fhir_user: str | None = DEFAULT_FHIR_USER,
        encounter: str | None = None,
    ) -> str:
        """Create an EHR launch, as the EHR does before opening an app's launch URL.

        Args:
            patient: The patient id in context.
            app_context: The string returned as ``appContext`` (CDS Hooks passes a card link's
                ``appContext`` this way), or None.
            fhir_user: The signed-in user as ``Type/id``; None for no user (then ``openid`` and
                ``fhirUser`` are not granted).
            encounter: The encounter id in context, or None.

        Returns:
            The opaque ``launch`` value to append to the app's launch URL.
        """
        launch_id = secrets.token_urlsafe(16)
        self._launches[launch_id] = _Launch(patient, fhir_user, encounter, app_context)
        return launch_id

    def expire_tokens(self) -> None:
        """Make every access token issued so far expired (the system token stays valid)."""
        now = time.time()
        with self._lock:
            for token in self._tokens.values():
                if token.launch is not None:
                    token.expires_at = min(token.expires_at, now - 1)

    @contextlib.contextmanager
    def backend_down(self) -> Iterator[None]:
        """While inside, the gateway forwards to a loopback port nobody listens on (502).

        The port stays bound (not listening) throughout, so no other process can take it and
        every connection attempt is refused by the kernel.

        Yields:
            Nothing.
        """
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            self._upstream = f"http://127.0.0.1:{sock.getsockname()[1]}/fhir"
            try:
                yield
            finally:
                self._upstream = self.backend.base_url

    @property
    def issued(self) -> list[dict[str, Any]]:
        """One dict per issued access token, in issue order: client_id, scope, patient,
        encounter, fhir_user, expires_at (epoch seconds), expired, revoked.  No token values."""
        with self._lock:
            return [t.summary() for t in self._tokens.values() if t.launch is not None]

    # ----------------------------------------------------------- SMART semantics

    def supports_scope(self, scope: str) -> bool:
        """Whether this server grants a scope at all (before any client's ceiling).

        Args:
            scope: One scope string.

        Returns:
            True for the context scopes and for ``patient/`` resource scopes in this server's
            permission syntax.
        """
        if scope in CONTEXT_SCOPES:
            return True
        parsed = parse_resource_scope(scope)
        return (parsed is not None and parsed.context == "patient"
                and parsed.syntax == self.permission)

    def scopes_supported(self) -> list[str]:
        """The ``scopes_supported`` list of the discovery document."""
        if self.permission == "v2":
            resource = ["patient/*.rs", "patient/*.cruds", "patient/Patient.rs",
                        "patient/QuestionnaireResponse.cu"]
        else:
            resource = ["patient/*.read", "patient/*.write", "patient/*.*", "patient/Patient.read",
                        "patient/QuestionnaireResponse.write"]
        return [*CONTEXT_SCOPES, *resource]

    def _check_launch(self, req: Any) -> _Launch | None:
        """SMART's checks on an authorization request authlib found valid.

        Returns:
            The launch context, or None for a standalone launch with nobody signed in.

        Raises:
            OAuth2Error: invalid_request or invalid_scope (the caller adds the redirect).
        """
        data = req.payload.data
        aud = (data.get("aud") or "").rstrip("/")
        if aud != self.iss:
            raise InvalidRequestError("'aud' must be this EHR's FHIR base URL")
        granted = req.scope.split()
        launch_id = data.get("launch")
        if launch_id is not None:
            if "launch" not in granted:
                raise InvalidScopeError("an EHR launch must ask for the 'launch' scope")
            launch = self._launches.get(launch_id)
            if launch is None:
                raise InvalidRequestError("unknown 'launch'")
        else:
            if "launch/patient" not in granted:
                raise InvalidScopeError("a standalone launch must ask for 'launch/patient'")
            if self.portal_patient is None:
                return None  # -> access_denied
            launch = _Launch(self.portal_patient, f"Patient/{self.portal_patient}")
        if launch.fhir_user is None:  # nobody to identify
            req.scope = " ".join(s for s in granted if s not in ("openid", "fhirUser"))
        return launch

    def _record_token(self, token: dict[str, Any], code: _AuthCode) -> None:
        launch = code.launch
        scopes = str(token.get("scope", "")).split()
        now = time.time()
        record = _Token(code.client_id, scopes, launch, now + int(token["expires_in"]))
        with self._lock:
            self._tokens[token["access_token"]] = record
            self._used_codes.setdefault(code.code, []).append(record)
        token["patient"] = launch.patient
        if launch.encounter is not None:
            token["encounter"] = launch.encounter
        if launch.app_context is not None:
            token["appContext"] = launch.app_context
        token["need_patient_banner"] = True
        if "openid" in scopes and launch.fhir_user is not None:
            claims: dict[str, Any] = {
                "iss": self.iss,
                "aud": code.client_id,
                "sub": launch.fhir_user.replace("/", "-"),
                "iat": int(now),
                "exp": int(now) + self.token_lifetime,
            }
            if "fhirUser" in scopes:
                claims["fhirUser"] = f"{self.iss}/{launch.fhir_user}"
            if code.nonce:
                claims["nonce"] = code.nonce
            token["id_token"] = jwt.encode(
                claims, self._key, algorithm="RS256", headers={"kid": KEY_ID}
            )

    # ------------------------------------------------------------------ the app

    def _build_app(self) -> Flask:
        app = Flask("smart_ehr")
        app.config["OAUTH2_TOKEN_EXPIRES_IN"] = {"authorization_code": self.token_lifetime}
        server = _SmartAuthorizationServer(app, self)
        server.register_grant(_SmartCodeGrant, [_S256CodeChallenge(required=True)])

        @app.get("/fhir/.well-known/smart-configuration")
        def smart_configuration() -> Response:
            return _json_response(200, self._discovery())

        @app.get("/.well-known/jwks.json")
        def jwks() -> Response:
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self._key.public_key()))
            jwk.update(kid=KEY_ID, use="sig", alg="RS256")
            return _json_response(200, {"keys": [jwk]})

        @app.route("/auth/authorize", methods=["GET", "POST"])
        def authorize() -> Response:
            entry: dict[str, Any] = dict(request.values.items())
            self.authorize_log.append(entry)
            try:
                grant = server.get_consent_grant(end_user=None)
            except OAuth2Error as error:
                entry["error"] = error.error
                if error.redirect_uri:
                    response: Response = server.handle_error_response(None, error)
                else:  # RFC 6749 4.1.2.1: never redirect to an unverified place
                    response = Response(
                        f"<!doctype html><title>Authorization error</title><h1>{error.error}</h1>"
                        f"<p>{_html_escape(error.description or '')}</p>",
                        status=400, mimetype="text/html",
                    )
                entry["status"] = response.status_code
                return response
            response = server.create_authorization_response(
                grant_user=grant.launch_context, grant=grant
            )
            entry["status"] = response.status_code
            location = response.headers.get("Location", "")
            entry["error"] = _query_value(location, "error")
            entry["code_issued"] = _query_value(location, "code") is not None
            return response

        @app.post("/auth/token")
        def token() -> Response:
            secret_fields = ("code", "code_verifier", "client_secret")
            entry: dict[str, Any] = {
                k: v for k, v in request.form.items() if k not in secret_fields
            }
            entry["code_sent"] = bool(request.form.get("code"))
            entry["code_verifier_sent"] = bool(request.form.get("code_verifier"))
            self.token_log.append(entry)
            response: Response = server.create_token_response()
            entry["status"] = response.status_code
            body = response.get_json(silent=True) or {}
            entry["error"] = body.get("error")
            return response

        @app.get("/fhir/metadata")
        def metadata() -> Response:
            try:
                response = self._forward("metadata", check=None)
            except _Refused as refused:
                return _outcome_response(refused, self.iss)
            if response.status_code == 200:
                statement = json.loads(response.get_data())
                self._add_oauth_uris(statement)
                response.set_data(json.dumps(statement))
            return response

        @app.route("/fhir", methods=["GET", "POST"])
        @app.route("/fhir/<path:path>", methods=["GET", "POST", "PUT"])
        def gateway(path: str = "") -> Response:
            try:
                bearer = self._authenticate()
                check = None if bearer.launch is None else bearer
                return self._forward(path, check=check)
            except _Refused as refused:
                return _outcome_response(refused, self.iss)

        return app

    def _discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.iss,
            "jwks_uri": f"{self.base_url}/.well-known/jwks.json",
            "authorization_endpoint": f"{self.base_url}/auth/authorize",
            "token_endpoint": f"{self.base_url}/auth/token",
            "grant_types_supported": ["authorization_code"],
            "response_types_supported": ["code"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["none"],
            "scopes_supported": self.scopes_supported(),
            "capabilities": [*CAPABILITIES, f"permission-{self.permission}"],
        }

    def _add_oauth_uris(self, statement: dict[str, Any]) -> None:
        # What a SMART server states in its CapabilityStatement (older clients look here).
        extension = {
            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
            "extension": [
                {"url": "authorize", "valueUri": f"{self.base_url}/auth/authorize"},
                {"url": "token", "valueUri": f"{self.base_url}/auth/token"},
            ],
        }
        for rest in statement.get("rest", []) or []:
            rest["security"] = {
                "service": [{"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                    "code": "SMART-on-FHIR"}]}],
                "extension": [extension],
            }

    # --------------------------------------------------------------- the gateway

    def _authenticate(self) -> _Token:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise _Refused(401, "login", "a bearer access token is required")
        value = value.strip()
        if secrets.compare_digest(value, self.system_token):
            return _Token("system", ["system/*.cruds"], None, float("inf"))
        with self._lock:
            token = self._tokens.get(value)
        if token is None or token.revoked:
            raise _Refused(401, "login", "the access token is not known here (or was revoked)")
        if time.time() >= token.expires_at:
            raise _Refused(401, "expired", "the access token has expired")
        return token

    def _forward(self, path: str, check: _Token | None) -> Response:
        """Check the request against a token (None: no checks), forward it, rewrite the answer.

        Raises:
            _Refused: 403 when the token does not cover the request.
        """
        params = [(k, self._to_upstream(v)) for k, v in request.args.items(multi=True)]
        body = request.get_data() if request.method in ("POST", "PUT") else None
        then = None if check is None else self._authorize_request(check, path, params, body)
        response = self._send(request.method, path, params, body)
        if check is not None and then is not None and response.status_code == 200:
            answer = json.loads(response.get_data())
            if then == "read":  # a read by id: only the store knows whose record it is
                self._require_compartment(check, answer, "read")
            else:
                response.set_data(json.dumps(self._only_compartment(check, answer)))
        return response

    def _send(
        self, method: str, path: str, params: Sequence[tuple[str, str]], body: bytes | None
    ) -> Response:
        headers = {h: v for h in _FORWARDED_REQUEST_HEADERS if (v := request.headers.get(h))}
        headers.setdefault("Accept", FHIR_JSON)
        if self.backend.token:
            headers["Authorization"] = f"Bearer {self.backend.token}"
        url = f"{self._upstream}/{path}" if path else self._upstream
        try:
            upstream = requests.request(
                method, url, params=list(params), data=body, headers=headers,
                timeout=UPSTREAM_TIMEOUT_S, allow_redirects=False,
            )
        except requests.RequestException as exc:
            raise _Refused(
                502, "transient",
                f"the FHIR server behind this gateway could not be reached ({type(exc).__name__})",
            ) from None
        base = self.backend.base_url
        content = upstream.content.replace(base.encode(), self.iss.encode())
        response = Response(content, status=upstream.status_code)
        response.headers["Content-Type"] = upstream.headers.get("Content-Type", FHIR_JSON)
        for name in _FORWARDED_RESPONSE_HEADERS:
            if name in upstream.headers:
                response.headers[name] = upstream.headers[name].replace(base, self.iss)
        return response

    def _to_upstream(self, value: str) -> str:
        # Absolute references to the gateway in search values name the store's resources.
        return value.replace(self.iss, self.backend.base_url)

    def _authorize_request(
        self, token: _Token, path: str, params: Sequence[tuple[str, str]], body: bytes | None
    ) -> str | None:
        """Decide whether an app token may make this request.

        Returns:
            What must still be checked in the store's answer: ``"read"`` (a read by id: whose
            record is it?), ``"search"`` (drop entries of other patients: a store may ignore a
            ``patient`` parameter it does not index, as sekmet does for QuestionnaireResponse),
            or None.

        Raises:
            _Refused: 403 ``forbidden`` with the reason.
        """
        assert token.launch is not None
        patient = token.launch.patient
        parts = [p for p in path.split("/") if p]
        method = request.method
        if not parts or any(p.startswith("$") for p in parts):
            raise _Refused(403, "forbidden",
                           "transactions and operations are not open to app tokens here")
        rtype = parts[0]
        is_search = (method == "GET" and len(parts) == 1) or (
            method in ("GET", "POST") and len(parts) == 2 and parts[1] == "_search")
        if is_search:
            self._require_scope(token, rtype, "s")
            query = list(params)
            if method == "POST":  # POST _search: parameters in the form body
                query += list(request.form.items(multi=True))
            self._require_search_compartment(patient, rtype, query)
            return "search"
        if method == "GET" and len(parts) == 3 and rtype == "Patient" and parts[2][:1].isupper():
            self._require_scope(token, parts[2], "s")  # compartment search Patient/id/Type
            self._require_same_patient(patient, parts[1])
            return "search"
        if method == "GET" and (len(parts) == 2 or (len(parts) == 4 and parts[2] == "_history")):
            self._require_scope(token, rtype, "r")
            if rtype == "Patient":
                self._require_same_patient(patient, parts[1])
                return None
            return "read"
        if method == "POST" and len(parts) == 1:
            self._require_scope(token, rtype, "c")
            self._require_compartment(token, _json_body(body), "write")
            return None
        if method == "PUT" and len(parts) in (1, 2):
            self._require_scope(token, rtype, "u")
            resource = _json_body(body)
            self._require_compartment(token, resource, "write")
            if len(parts) == 2:
                if rtype == "Patient":
                    self._require_same_patient(patient, parts[1])
                current = self._send("GET", path, [], None)
                if current.status_code == 200:  # no overwriting another patient's record
                    self._require_compartment(token, json.loads(current.get_data()), "write")
            return None
        raise _Refused(403, "forbidden", f"{method} on this path is not open to app tokens here")

    @staticmethod
    def _require_scope(token: _Token, rtype: str, permission: str) -> None:
        for scope in token.scopes:
            parsed = parse_resource_scope(scope)
            if parsed and parsed.context == "patient" and parsed.allows(rtype, permission):
                return
        verb = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}[permission]
        raise _Refused(403, "forbidden",
                       f"the access token's scopes do not allow {verb} of {rtype}")

    def _require_same_patient(self, patient: str, named: str) -> None:
        if self._patient_id(named) != patient:
            raise _Refused(403, "forbidden", "the access token does not cover that patient")

    def _require_search_compartment(
        self, patient: str, rtype: str, query: Sequence[tuple[str, str]]
    ) -> None:
        names = ("_id",) if rtype == "Patient" else ("patient", "subject")
        values = [v for k, v in query if k.split(":")[0] in names]
        named = [self._patient_id(item) for v in values for item in v.split(",")]
        if not named:
            raise _Refused(403, "forbidden",
                           f"a search with a patient-context token must name its patient "
                           f"({' or '.join(n + '=' for n in names)})")
        if any(n != patient for n in named):
            raise _Refused(403, "forbidden", "the access token does not cover that patient")

    def _require_compartment(self, token: _Token, resource: Any, action: str) -> None:
        assert token.launch is not None
        if not isinstance(resource, dict):
            raise _Refused(400, "invalid", "the body is not a JSON resource")
        if resource.get("resourceType") == "Patient":
            refs = [f"Patient/{resource.get('id', '')}"]
        else:
            refs = [
                v["reference"] for key in _PATIENT_ELEMENTS
                if isinstance(v := resource.get(key), dict) and isinstance(v.get("reference"), str)
            ]
        if action == "write" and not refs:
            raise _Refused(403, "forbidden",
                           "the resource names no patient: the access token does not cover it")
        for ref in refs:
            if self._patient_id(ref) != token.launch.patient:
                raise _Refused(403, "forbidden", "the access token does not cover that patient")

    def _only_compartment(self, token: _Token, bundle: Any) -> Any:
        """Drop the entries of a search Bundle that name a patient other than the token's."""
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            return bundle
        kept = []
        for entry in bundle.get("entry", []) or []:
            try:
                self._require_compartment(token, entry.get("resource"), "read")
            except _Refused:
                continue
            kept.append(entry)
        if len(kept) != len(bundle.get("entry", []) or []):
            bundle.pop("total", None)  # the store's count included what was dropped
        bundle["entry"] = kept
        return bundle

    def _patient_id(self, reference: str) -> str | None:
        """The patient id a search value or reference names (``id``, ``Patient/id``, absolute)."""
        ref = reference.strip()
        for base in (self.iss, self.backend.base_url):
            if ref.startswith(base + "/"):
                ref = ref[len(base) + 1:]
        if "/" not in ref:
            return ref or None
        rtype, _, rest = ref.partition("/")
        return rest.split("/")[0] if rtype == "Patient" else None


# ---------------------------------------------------------------------------- helpers


def _json_response(status: int, body: Any) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


def _outcome_response(refused: _Refused, realm: str) -> Response:
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": refused.code, "diagnostics": refused.diagnostics}],
    }
    response = Response(json.dumps(outcome), status=refused.status, mimetype=FHIR_JSON)
    if refused.status == 401:
        error = "" if refused.code == "login" and "required" in refused.diagnostics else (
            f', error="invalid_token", error_description="{refused.diagnostics}"')
        response.headers["WWW-Authenticate"] = f'Bearer realm="{realm}"{error}'
    return response


def _json_body(body: bytes | None) -> Any:
    try:
        return json.loads(body or b"")
    except ValueError:
        raise _Refused(400, "invalid", "the body is not JSON") from None


def _query_value(url: str, name: str) -> str | None:
    values = parse_qs(urlsplit(url).query).get(name)
    return values[0] if values else None


def _html_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def s256(verifier: str) -> str:
    """The PKCE S256 challenge of a verifier (for tests and apps that build requests by hand).

    Args:
        verifier: The code verifier.

    Returns:
        ``BASE64URL(SHA256(verifier))`` without padding.
    """
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
