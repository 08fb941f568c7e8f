"""Verify the JWT a CDS client sends with every call (CDS Hooks 2.0, "Trusting CDS Clients").

A call carries ``Authorization: Bearer <JWT>``, signed by the client with an asymmetric key.
``JwtVerifier.verify`` accepts it only when all of this holds:

* the header names an algorithm from a fixed, configured list (never ``none``, never HS*),
  ``typ`` is ``JWT`` and a ``kid`` is given;
* ``iss`` is a configured ``TrustedClient``; the key is the ``kid`` of that client's JWK Set
  (inline, from a file read once at start, or fetched from the client's ``jwks_url``);
* a ``jku`` header, if present, is one the client may name: its ``jwks_url`` or one of the URLs
  listed under its ``jku`` (compared exactly). A listed ``jku`` only *names* the key set: the
  keys are still the client's configured ones (pinned keys are never fetched; a ``jwks_url`` is
  the only URL ever fetched). Any other ``jku`` is refused without being fetched;
* the signature verifies; ``aud`` names the endpoint being called; ``exp``, ``iat`` and
  ``nbf`` (if present) fit the clock with a small leeway; the lifetime ``exp - iat`` is short;
* ``tenant`` is allowed, when the client has a tenant allowlist;
* ``jti`` has not been seen before (checked last, so only otherwise valid tokens use the store).

Anything else raises ``AuthenticationError``, whose message is a fixed reason for our logs and
whose ``category`` is the coarse reason the caller is told (the HTTP layer answers 401 with the
category and the request id under which the reason is logged). Neither the exception nor the
log contains the token or any part of it; the log names the ``iss``, which is an issuer URL,
not a patient identifier.

Unverified header and claims are read only to find ``iss``, ``kid`` and ``jku``. The algorithms
handed to the signature check come from configuration and the key's type, never from the token.
"""

from __future__ import annotations

import binascii
import heapq
import ipaddress
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import jwt
import requests
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from lbp_cds.egress import EgressRule
from lbp_cds.errors import AuthenticationError, ConfigError

logger = logging.getLogger(__name__)

#: Asymmetric JWS algorithms this module knows how to match to a key type.
SUPPORTED_ALGORITHMS: frozenset[str] = frozenset(
    {
        "ES256",
        "ES384",
        "ES512",
        "ES256K",
        "RS256",
        "RS384",
        "RS512",
        "PS256",
        "PS384",
        "PS512",
        "EdDSA",
    }
)

_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHMS_BY_CURVE: Mapping[str, frozenset[str]] = {
    "P-256": frozenset({"ES256"}),
    "P-384": frozenset({"ES384"}),
    "P-521": frozenset({"ES512"}),
    "secp256k1": frozenset({"ES256K"}),
}
_OKP_CURVES = frozenset({"Ed25519", "Ed448"})
# JWK members that only a private (or symmetric) key has (RFC 7518 §6.2.2, §6.3.2, §6.4).
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_MIN_RSA_BITS = 2048

#: Longest token accepted; CDS Hooks tokens are a few hundred bytes.
MAX_TOKEN_LENGTH = 16_384
#: Longest ``jti`` accepted (it becomes a key in the replay store).
MAX_JTI_LENGTH = 256
#: Largest JWK Set body read from a ``jwks_url``.
MAX_JWKS_BYTES = 262_144

_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_LOOPBACK_HOSTS = frozenset({"localhost"})
_CLIENT_FIELDS = frozenset(
    {"iss", "jwks", "jwks_file", "jwks_url", "jku", "tenant", "fhir_servers", "allow_private",
     "smart"}
)
_SMART_FIELDS = frozenset({"client_id", "iss"})

# The categories a refused caller is told (the exact reason goes to the log only).
NO_TOKEN = "no bearer token, or not a compact JWS"
BAD_HEADER = "token header not acceptable (alg, typ, kid, crit or jku)"
UNTRUSTED = "issuer, key or jku not trusted"
BAD_SIGNATURE = "signature does not verify"
BAD_TIME = "token expired, not yet valid or too long-lived"
BAD_AUDIENCE = "aud is not the URL of the endpoint called"
BAD_CLAIMS = "a claim is missing, malformed or not allowed (iss, exp, iat, jti, tenant)"
REPLAY = "token already used (jti)"
NO_KEYS = "the client's JWK Set could not be fetched (jwks_url)"


@dataclass(frozen=True)
class TrustedClient:
    """A CDS client we accept tokens from, and where its public keys are.

    Exactly one of ``jwks``, ``jwks_file`` and ``jwks_url`` is set.

    Args:
        iss: the ``iss`` claim the client's tokens carry, compared exactly.
        jwks: an inline JWK Set (``{"keys": [...]}``), public keys only.
        jwks_file: a file holding the JWK Set; read once when the verifier is built.
        jwks_url: the URL of the client's JWK Set (https, or http on a loopback host). A token
            may name it as its ``jku``; it is fetched with ``requests``.
        jku: more ``jku`` values a token of this client may name (compared exactly). They are
            never fetched: a token naming one is verified with the client's configured keys
            (the HL7 sandbox always sends its ``jku``; a hospital pins the keys offline).
        tenants: the ``tenant`` claim values allowed; ``None`` means the claim is not checked.
        fhir_servers: the FHIR base URLs this client's ``fhirServer`` may name (``egress.py``);
            empty: the client may not make the service fetch anything.
        allow_private: the client's FHIR servers may be on loopback or private addresses
            (tests, on-premises EHRs); link-local, multicast and reserved never are.
        smart_client_id: the intake app's SMART ``client_id`` at this EHR (its registration);
            None: the EHR does not launch the app.
        smart_iss: the FHIR base URLs this EHR launches the intake app with (``iss``, compared
            without a trailing slash): the app's allowlist.
    """

    iss: str
    jwks: dict[str, Any] | None = None
    jwks_file: Path | None = None
    jwks_url: str | None = None
    tenants: frozenset[str] | None = None
    jku: frozenset[str] = frozenset()
    fhir_servers: tuple[str, ...] = ()
    allow_private: bool = False
    smart_client_id: str | None = None
    smart_iss: tuple[str, ...] = ()

    @property
    def allowed_jku(self) -> frozenset[str]:
        """Every ``jku`` a token of this client may name."""
        return (self.jku | {self.jwks_url}) if self.jwks_url else self.jku

    def egress(self) -> EgressRule:
        """Where this client may make the service fetch FHIR."""
        return EgressRule.for_client(self.iss, self.fhir_servers, self.allow_private)


class ReplayCache(Protocol):
    """A short-term store of the token ids already used (``iss|jti``)."""

    def claim(self, key: str, expires_at: float) -> bool:
        """Record ``key`` until ``expires_at`` (epoch seconds).

        Args:
            key: the replay key, ``f"{iss}|{jti}"``.
            expires_at: when the key may be forgotten (the token's ``exp`` plus leeway).

        Returns:
            True the first time a key is claimed, False if it is still held (a replay).
        """
        ...


class MemoryReplayCache:
    """An in-process ``ReplayCache`` for tests and development; thread-safe.

    Entries are forgotten once their expiry has passed. Each process has its own store, so
    several workers or replicas need a shared cache instead.

    Args:
        clock: returns the current time in epoch seconds; share the verifier's clock.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def claim(self, key: str, expires_at: float) -> bool:
        """Record ``key`` until ``expires_at``.

        Args:
            key: the replay key.
            expires_at: when the key may be forgotten, in epoch seconds.

        Returns:
            True if the key was not held, False if it is (a replay).
        """
        with self._lock:
            now = self._clock()
            self._purge(now)
            held_until = self._expiry.get(key)
            if held_until is not None and held_until > now:
                return False
            self._expiry[key] = expires_at
            heapq.heappush(self._heap, (expires_at, key))
            return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._expiry)

    def _purge(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            expires_at, key = heapq.heappop(self._heap)
            if self._expiry.get(key) == expires_at:
                del self._expiry[key]


@dataclass(frozen=True)
class _Key:
    """A public key and the algorithms it may verify."""

    key: Any
    algorithms: frozenset[str]


class _RemoteKeySet:
    """The cached JWK Set of one client's ``jwks_url``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.keys: dict[str, _Key] = {}
        self.fetched_at: float | None = None
        self.last_attempt: float | None = None
        self.lock = threading.Lock()


class _FetchError(Exception):
    """A JWK Set could not be fetched or used; the message is safe to log."""


# --------------------------------------------------------------------------- configuration


def load_clients(path: Path) -> list[TrustedClient]:
    """Read the trusted clients from a YAML file.

    The file looks like::

        clients:
          - iss: https://ehr.example.org/
            jwks_file: keys/ehr.json          # relative to this file's folder
            jku: https://ehr.example.org/.well-known/jwks.json   # optional: one or a list
            tenant: 2ddd6c3a-8e9a-44c6-a305-52111ad302a2   # optional: one id or a list
            fhir_servers: [https://ehr.example.org/fhir/r4]  # optional: one or a list
            allow_private: false              # optional: FHIR server on a private address
          - iss: https://other.example.org
            jwks_url: https://other.example.org/.well-known/jwks.json
          - iss: https://third.example.org
            jwks: {keys: [{kty: EC, crv: P-384, kid: k1, x: ..., y: ...}]}

    Args:
        path: the YAML file.

    Returns:
        The clients, in file order, with ``jwks_file`` made absolute.

    Raises:
        ConfigError: the file cannot be read or parsed, an entry has an unknown field, no key
            source or more than one, a ``jwks_file`` cannot be read or holds no usable public
            key, a ``jwks`` has no keys, a ``jwks_url`` is not https, a ``jku`` or a
            ``fhir_servers`` entry is not an http(s) URL, or an ``iss`` repeats.
    """
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"trusted clients file {path}: cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"trusted clients file {path}: not valid YAML ({exc})") from None
    if not isinstance(document, dict) or set(document) != {"clients"}:
        raise ConfigError(f"trusted clients file {path}: expected a mapping with one key 'clients'")
    entries = document["clients"]
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"trusted clients file {path}: 'clients' must be a non-empty list")
    clients = [_client_from_entry(entry, i, path) for i, entry in enumerate(entries)]
    _check_clients(clients)
    return clients


def _client_from_entry(entry: object, index: int, path: Path) -> TrustedClient:
    where = f"trusted clients file {path}, clients[{index}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: each client must be a mapping")
    unknown = sorted(str(k) for k in set(entry) - _CLIENT_FIELDS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(_CLIENT_FIELDS))}"
        )
    iss = entry.get("iss")
    if not isinstance(iss, str) or not iss:
        raise ConfigError(f"{where}: 'iss' must be a non-empty string")
    where = f"{where} (iss {iss})"

    jwks = entry.get("jwks")
    if jwks is not None and not isinstance(jwks, dict):
        raise ConfigError(f"{where}: 'jwks' must be a JWK Set mapping with 'keys'")
    jwks_file = entry.get("jwks_file")
    if jwks_file is not None:
        if not isinstance(jwks_file, str) or not jwks_file:
            raise ConfigError(f"{where}: 'jwks_file' must be a path")
        jwks_file = (path.parent / jwks_file).resolve()
    jwks_url = entry.get("jwks_url")
    if jwks_url is not None and not isinstance(jwks_url, str):
        raise ConfigError(f"{where}: 'jwks_url' must be a URL string")

    jku = _strings(entry.get("jku"), "jku", where)
    fhir_servers = _strings(entry.get("fhir_servers"), "fhir_servers", where)
    allow_private = entry.get("allow_private", False)
    if not isinstance(allow_private, bool):
        raise ConfigError(f"{where}: 'allow_private' must be true or false")

    smart_client_id, smart_iss = _smart_entry(entry.get("smart"), where)

    tenant = entry.get("tenant")
    tenants: frozenset[str] | None
    if tenant is None:
        tenants = None
    else:
        values = tenant if isinstance(tenant, list) else [tenant]
        if not values or not all(isinstance(v, str) and v for v in values):
            raise ConfigError(
                f"{where}: 'tenant' must be a non-empty string or a non-empty list of strings "
                "(quote ids that YAML would read as numbers)"
            )
        tenants = frozenset(values)
    return TrustedClient(
        iss=iss, jwks=jwks, jwks_file=jwks_file, jwks_url=jwks_url, tenants=tenants,
        jku=frozenset(jku), fhir_servers=tuple(fhir_servers), allow_private=allow_private,
        smart_client_id=smart_client_id, smart_iss=smart_iss,
    )


def _smart_entry(value: object, where: str) -> tuple[str | None, tuple[str, ...]]:
    """A client's ``smart: {client_id: ..., iss: URL or [URLs]}`` (the intake app)."""
    if value is None:
        return None, ()
    if not isinstance(value, dict) or set(value) - _SMART_FIELDS or not value.get("client_id"):
        raise ConfigError(f"{where}: 'smart' must be a mapping with 'client_id' (the intake "
                          "app's SMART client id at this EHR) and 'iss' (the FHIR base URL(s) "
                          "it launches the app with)")
    client_id = value["client_id"]
    if not isinstance(client_id, str):
        raise ConfigError(f"{where}: smart.client_id must be a string")
    issuers = _strings(value.get("iss"), "smart.iss", where)
    if not issuers:
        raise ConfigError(f"{where}: smart.iss must name the FHIR base URL(s) the EHR launches "
                          "the intake app with")
    for url in issuers:
        if not url.startswith(("https://", "http://")):
            raise ConfigError(f"{where}: smart.iss {url!r} is not an http(s) URL")
    return client_id, tuple(u.rstrip("/") for u in issuers)


def _strings(value: object, name: str, where: str) -> list[str]:
    """A field that holds one string or a list of them (absent: empty)."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) and v for v in values):
        raise ConfigError(f"{where}: '{name}' must be a URL or a list of URLs")
    return list(values)


def _check_clients(clients: Iterable[TrustedClient]) -> dict[str, dict[str, _Key] | None]:
    """Validate clients and load their static key sets.

    Returns:
        For each ``iss``, its keys by ``kid`` (all algorithms the key type allows), or ``None``
        for a client whose keys come from ``jwks_url``.

    Raises:
        ConfigError: as described in ``load_clients``.
    """
    static: dict[str, dict[str, _Key] | None] = {}
    for client in clients:
        if not isinstance(client, TrustedClient):
            raise ConfigError(
                f"trusted client must be a TrustedClient, not {type(client).__name__}"
            )
        if not isinstance(client.iss, str) or not client.iss:
            raise ConfigError("trusted client: 'iss' must be a non-empty string")
        where = f"trusted client {client.iss}"
        if client.iss in static:
            raise ConfigError(f"{where}: duplicate iss")
        sources = [
            name
            for name, value in (
                ("jwks", client.jwks),
                ("jwks_file", client.jwks_file),
                ("jwks_url", client.jwks_url),
            )
            if value is not None
        ]
        if len(sources) != 1:
            raise ConfigError(
                f"{where}: give exactly one key source (jwks, jwks_file or jwks_url); "
                f"got {', '.join(sources) if sources else 'none'}"
            )
        if client.tenants is not None and (
            not isinstance(client.tenants, (frozenset, set))
            or not client.tenants
            or not all(isinstance(t, str) and t for t in client.tenants)
        ):
            raise ConfigError(f"{where}: 'tenants' must be a non-empty set of non-empty strings")

        _check_client_urls(client, where)
        if client.jwks_url is not None:
            _check_jwks_url(client.jwks_url, where)
            static[client.iss] = None
            continue
        if client.jwks_file is not None:
            jwks_path = Path(client.jwks_file)
            try:
                jwks: object = json.loads(jwks_path.read_text(encoding="utf-8"))
            except OSError as exc:
                raise ConfigError(
                    f"{where}: cannot read jwks_file {jwks_path} ({exc.strerror})"
                ) from None
            except ValueError as exc:
                raise ConfigError(f"{where}: jwks_file {jwks_path} is not JSON ({exc})") from None
            where = f"{where}, jwks_file {jwks_path}"
        else:
            jwks = client.jwks
        static[client.iss] = _static_keys(jwks, where)
    return static


def _check_client_urls(client: TrustedClient, where: str) -> None:
    """The ``jku`` allowlist and the FHIR servers: well-formed http(s) URLs."""
    if not isinstance(client.jku, frozenset) or not isinstance(client.fhir_servers, tuple):
        raise ConfigError(f"{where}: 'jku' must be a frozenset and 'fhir_servers' a tuple")
    if not isinstance(client.allow_private, bool):
        raise ConfigError(f"{where}: 'allow_private' must be a bool")
    for url in client.jku:
        try:
            parts = urlsplit(url)
            ok = parts.scheme in ("https", "http") and bool(parts.hostname)
        except (ValueError, TypeError, AttributeError):
            ok = False
        if not ok:
            raise ConfigError(f"{where}: jku {url!r} must be an absolute http(s) URL")
    try:
        client.egress()
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: fhir_servers: {exc}") from None


def _check_jwks_url(url: str, where: str) -> None:
    if not isinstance(url, str) or not url:
        raise ConfigError(f"{where}: 'jwks_url' must be a URL string")
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        raise ConfigError(f"{where}: jwks_url {url!r} is not a valid URL") from None
    if not host:
        raise ConfigError(f"{where}: jwks_url {url!r} has no host")
    if parts.scheme == "https":
        return
    if parts.scheme == "http" and _is_loopback(host):
        return
    raise ConfigError(f"{where}: jwks_url {url!r} must use https (http only on a loopback host)")


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _static_keys(jwks: object, where: str) -> dict[str, _Key]:
    """Parse a configured JWK Set strictly: every key must be a usable public signing key."""
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        raise ConfigError(f"{where}: the JWK Set must be an object with a 'keys' list")
    if not jwks["keys"]:
        raise ConfigError(f"{where}: the JWK Set has no keys")
    keys: dict[str, _Key] = {}
    for i, jwk in enumerate(jwks["keys"]):
        try:
            kid, key = _parse_jwk(jwk)
        except ValueError as exc:
            raise ConfigError(f"{where}: keys[{i}]: {exc}") from None
        if kid in keys:
            raise ConfigError(f"{where}: keys[{i}]: kid {kid!r} is not unique in the JWK Set")
        keys[kid] = key
    return keys


def _parse_jwk(jwk: object) -> tuple[str, _Key]:
    """Turn one JWK into a public key and the algorithms its type allows.

    Args:
        jwk: one member of a JWK Set's ``keys``.

    Returns:
        The ``kid`` and the key.

    Raises:
        ValueError: the JWK is not a usable public signature key; the message says why.
    """
    if not isinstance(jwk, dict):
        raise ValueError("a JWK must be an object")
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid:
        raise ValueError("a JWK needs a non-empty 'kid'")
    kty = jwk.get("kty")
    if kty == "oct":
        raise ValueError(f"kid {kid!r}: symmetric keys (kty oct) are not allowed")
    private = sorted(_PRIVATE_MEMBERS & set(jwk))
    if private:
        raise ValueError(
            f"kid {kid!r}: contains private key material ({', '.join(private)}); "
            "configure the public JWK Set only"
        )
    if "use" in jwk and jwk["use"] != "sig":
        raise ValueError(f"kid {kid!r}: 'use' is not 'sig'")
    if "key_ops" in jwk and (
        not isinstance(jwk["key_ops"], list) or "verify" not in jwk["key_ops"]
    ):
        raise ValueError(f"kid {kid!r}: 'key_ops' does not include 'verify'")

    algorithm_class: type[Any]
    if kty == "RSA":
        allowed, algorithm_class = _RSA_ALGORITHMS, RSAAlgorithm
    elif kty == "EC":
        curve = jwk.get("crv")
        if not isinstance(curve, str) or curve not in _EC_ALGORITHMS_BY_CURVE:
            raise ValueError(f"kid {kid!r}: unsupported EC curve")
        allowed, algorithm_class = _EC_ALGORITHMS_BY_CURVE[curve], ECAlgorithm
    elif kty == "OKP":
        if jwk.get("crv") not in _OKP_CURVES:
            raise ValueError(f"kid {kid!r}: unsupported OKP curve")
        allowed, algorithm_class = frozenset({"EdDSA"}), OKPAlgorithm
    else:
        raise ValueError(f"kid {kid!r}: unsupported key type")

    if "alg" in jwk:
        if jwk["alg"] not in allowed:
            raise ValueError(f"kid {kid!r}: 'alg' does not fit the key type")
        allowed = frozenset({jwk["alg"]})

    try:
        key = algorithm_class.from_jwk(dict(jwk))
    except (jwt.PyJWTError, ValueError, TypeError, AttributeError, binascii.Error):
        raise ValueError(f"kid {kid!r}: not a valid {kty} public key") from None
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey) and key.key_size < _MIN_RSA_BITS:
        raise ValueError(f"kid {kid!r}: RSA key shorter than {_MIN_RSA_BITS} bits")
    return kid, _Key(key=key, algorithms=allowed)


def _check_algorithms(algorithms: object) -> frozenset[str]:
    if isinstance(algorithms, str) or not isinstance(algorithms, (tuple, list, frozenset, set)):
        raise ConfigError("JWT algorithms must be a tuple of algorithm names, e.g. ('ES384',)")
    if not algorithms:
        raise ConfigError("JWT algorithms: at least one algorithm is required")
    for name in algorithms:
        if not isinstance(name, str):
            raise ConfigError("JWT algorithms: each algorithm must be a string")
        if name.lower() == "none":
            raise ConfigError("JWT algorithms: 'none' is not allowed (CDS Hooks: SHALL NOT)")
        if name.upper().startswith("HS"):
            raise ConfigError(
                f"JWT algorithms: {name} is symmetric and not allowed (CDS Hooks: SHALL NOT)"
            )
        if name not in SUPPORTED_ALGORITHMS:
            raise ConfigError(
                f"JWT algorithms: {name!r} is not supported; "
                f"choose from {', '.join(sorted(SUPPORTED_ALGORITHMS))}"
            )
    return frozenset(algorithms)


# --------------------------------------------------------------------------- verification


class JwtVerifier:
    """Verifies CDS client JWTs against a list of trusted clients.

    Thread-safe: one instance serves all requests of a process.

    Args:
        clients: the trusted clients (see ``load_clients``).
        replay_cache: where used ``iss|jti`` pairs are recorded.
        algorithms: the JWS algorithms accepted; asymmetric only.
        leeway_seconds: clock skew tolerated on ``exp``, ``iat`` and ``nbf``.
        max_lifetime_seconds: the longest ``exp - iat`` accepted.
        session: the HTTP session used to fetch JWK Sets by URL; a new one if omitted.
        jwks_refresh_interval_seconds: a client's JWK Set URL is fetched at most once per this
            interval, however many unknown ``kid`` values arrive.
        fetch_timeout_seconds: connect/read timeout, and the total time budget of one fetch.
        clock: returns the current time in epoch seconds (tests fix it).
        jwks_max_age_seconds: a JWK Set fetched by URL is refreshed (rate-limited as above)
            once it is this old, so that keys the client withdrew stop working; if the
            refresh fails, the cached keys stay in use.

    Raises:
        ConfigError: an algorithm is ``none``, symmetric or unknown; a number is out of range;
            a client is invalid (see ``load_clients``); a static key set has no key usable with
            the configured algorithms.
    """

    def __init__(
        self,
        clients: list[TrustedClient],
        replay_cache: ReplayCache,
        *,
        algorithms: tuple[str, ...] = ("ES384", "RS384"),
        leeway_seconds: int = 30,
        max_lifetime_seconds: int = 3600,
        session: requests.Session | None = None,
        jwks_refresh_interval_seconds: float = 60.0,
        fetch_timeout_seconds: float = 3.0,
        clock: Callable[[], float] = time.time,
        jwks_max_age_seconds: float = 3600.0,
    ) -> None:
        self._algorithms = _check_algorithms(algorithms)
        for name, value, minimum in (
            ("leeway_seconds", leeway_seconds, 0),
            ("max_lifetime_seconds", max_lifetime_seconds, 1),
            ("jwks_refresh_interval_seconds", jwks_refresh_interval_seconds, 0),
            ("jwks_max_age_seconds", jwks_max_age_seconds, 0),
        ):
            number = _as_number(value)
            if number is None or number < minimum:
                raise ConfigError(f"JWT verifier: {name} must be a number >= {minimum}")
        timeout = _as_number(fetch_timeout_seconds)
        if timeout is None or timeout <= 0:
            raise ConfigError("JWT verifier: fetch_timeout_seconds must be a number > 0")

        self._leeway = float(leeway_seconds)
        self._max_lifetime = float(max_lifetime_seconds)
        self._refresh_interval = float(jwks_refresh_interval_seconds)
        self._max_age = float(jwks_max_age_seconds)
        self._fetch_timeout = float(fetch_timeout_seconds)
        self._clock = clock
        self._replay_cache = replay_cache
        self._owns_session = session is None
        self._session = session if session is not None else requests.Session()
        self._jws = jwt.PyJWS(options={"verify_signature": True})

        checked = _check_clients(clients)
        self._clients: dict[str, TrustedClient] = {client.iss: client for client in clients}
        self._static_keys: dict[str, dict[str, _Key]] = {}
        self._remote: dict[str, _RemoteKeySet] = {}
        for iss, keys in checked.items():
            client = self._clients[iss]
            if keys is None:
                assert client.jwks_url is not None
                self._remote[iss] = _RemoteKeySet(client.jwks_url)
                continue
            usable = self._restrict(keys)
            if not usable:
                raise ConfigError(
                    f"trusted client {iss}: no key can verify any of the configured algorithms "
                    f"({', '.join(sorted(self._algorithms))})"
                )
            self._static_keys[iss] = usable

    def close(self) -> None:
        """Close the HTTP session if the verifier created it."""
        if self._owns_session:
            self._session.close()

    def client(self, iss: str) -> TrustedClient:
        """The trusted client of a verified token's ``iss``.

        Raises:
            KeyError: ``iss`` is not a trusted client (never after ``verify`` accepted it).
        """
        return self._clients[iss]

    def verify(self, authorization_header: str | None, audience: str) -> dict[str, Any]:
        """Verify the bearer JWT of one call.

        Args:
            authorization_header: the raw ``Authorization`` header value, or None if absent.
            audience: the public URL of the endpoint being called, as clients address it
                (e.g. ``https://cds.example.org/cds-services/lbp``), built from the configured
                external base URL, never from the request's Host header.

        Returns:
            The token's claims (unknown claims such as ``sub`` included).

        Raises:
            AuthenticationError: the token is missing or fails any check; the message is a
                fixed reason for logs, without any part of the token.
            ValueError: ``audience`` is empty (a caller bug, not an authentication failure).
        """
        if not isinstance(audience, str) or not audience:
            raise ValueError("audience must be the non-empty URL of the endpoint called")
        iss: object = None
        step = NO_TOKEN  # the category of a refusal raised without one, by the step it is in
        try:
            token = _bearer_token(authorization_header)
            step = BAD_HEADER
            header, unverified = self._read_unverified(token)
            step = UNTRUSTED
            iss = unverified.get("iss")
            if not isinstance(iss, str) or not iss:
                raise AuthenticationError("iss claim missing or not a string",
                                          category=BAD_CLAIMS)
            client = self._clients.get(iss)
            if client is None:
                raise AuthenticationError("iss is not a trusted client")
            key = self._key_for(client, header)
            step = BAD_SIGNATURE
            claims = self._verified_claims(token, key)
            if claims.get("iss") != iss:  # same bytes; a guard against future refactoring
                raise AuthenticationError("iss changed between reads")
            step = BAD_CLAIMS
            expires_at = self._check_claims(claims, client, audience)
            jti = claims["jti"]
            if not self._replay_cache.claim(f"{iss}|{jti}", expires_at):
                raise AuthenticationError("jti already used (replay)", category=REPLAY)
        except AuthenticationError as exc:
            exc.category = exc.category or step
            logger.warning("JWT rejected: %s (iss=%s)", exc.message, _loggable(iss))
            raise
        logger.debug("JWT accepted (iss=%s)", _loggable(iss))
        return claims

    # -- steps of verify ------------------------------------------------------------------

    def _read_unverified(self, token: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Check the header and read the claims without trusting them (to find iss)."""
        try:
            decoded = self._jws.decode_complete(token, options={"verify_signature": False})
            header = decoded["header"]
            claims = _json_object(decoded["payload"])
        except (jwt.PyJWTError, ValueError, TypeError, RecursionError):
            raise AuthenticationError("token is not a well-formed JWS") from None
        if claims is None:
            raise AuthenticationError("token payload is not a JSON object")

        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() != "jwt":
            raise AuthenticationError("header typ is not JWT")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise AuthenticationError("header alg is not an allowed algorithm")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthenticationError("header kid missing")
        if "crit" in header:
            raise AuthenticationError("header crit names extensions we do not support")
        if "jku" in header and not isinstance(header["jku"], str):
            raise AuthenticationError("header jku is not a string")
        return header, claims

    def _key_for(self, client: TrustedClient, header: Mapping[str, Any]) -> _Key:
        """Find the key named by ``kid`` in the client's JWK Set; honour ``jku`` only if allowed."""
        kid: str = header["kid"]
        jku = header.get("jku")
        if jku is not None and jku not in client.allowed_jku:
            raise AuthenticationError("jku is not the allowlisted JWK Set URL of this iss",
                                      category=UNTRUSTED)
        static = self._static_keys.get(client.iss)
        if static is not None:
            key = static.get(kid)
        else:
            key = self._remote_key(client, self._remote[client.iss], kid)
        if key is None:
            raise AuthenticationError("kid not in the JWK Set of this iss")
        if header["alg"] not in key.algorithms:
            raise AuthenticationError("header alg does not fit the key")
        return key

    def _verified_claims(self, token: str, key: _Key) -> dict[str, Any]:
        """Verify the signature with ``key`` and return the claims."""
        try:
            decoded = self._jws.decode_complete(
                token,
                key=key.key,
                algorithms=sorted(key.algorithms),
                options={"verify_signature": True, "enforce_minimum_key_length": True},
            )
            claims = _json_object(decoded["payload"])
        except jwt.InvalidSignatureError:
            raise AuthenticationError("signature does not verify") from None
        except (jwt.PyJWTError, ValueError, TypeError, RecursionError):
            raise AuthenticationError("token cannot be verified") from None
        if claims is None:
            raise AuthenticationError("token payload is not a JSON object")
        return claims

    def _check_claims(
        self, claims: Mapping[str, Any], client: TrustedClient, audience: str
    ) -> float:
        """Check the registered claims; return when the replay key may be forgotten."""
        now = self._clock()
        exp = _time_claim(claims, "exp")
        iat = _time_claim(claims, "iat")
        if exp <= now - self._leeway:
            raise AuthenticationError("token expired (exp)", category=BAD_TIME)
        if iat > now + self._leeway:
            raise AuthenticationError("token issued in the future (iat)", category=BAD_TIME)
        if "nbf" in claims and _time_claim(claims, "nbf") > now + self._leeway:
            raise AuthenticationError("token not yet valid (nbf)", category=BAD_TIME)
        if exp < iat:
            raise AuthenticationError("exp is before iat", category=BAD_TIME)
        if exp - iat > self._max_lifetime:
            raise AuthenticationError("token lifetime (exp - iat) too long", category=BAD_TIME)

        if not _audience_matches(claims.get("aud"), audience):
            raise AuthenticationError("aud does not name this endpoint", category=BAD_AUDIENCE)

        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise AuthenticationError("jti claim missing or not a string")
        if len(jti) > MAX_JTI_LENGTH:
            raise AuthenticationError("jti claim too long")

        if client.tenants is not None:
            tenant = claims.get("tenant")
            if not isinstance(tenant, str) or tenant not in client.tenants:
                raise AuthenticationError("tenant missing or not allowed for this iss")
        return exp + self._leeway

    # -- JWK Sets by URL ------------------------------------------------------------------

    def _restrict(self, keys: Mapping[str, _Key]) -> dict[str, _Key]:
        """Keep the keys usable with the configured algorithms, narrowed to them."""
        usable: dict[str, _Key] = {}
        for kid, key in keys.items():
            algorithms = key.algorithms & self._algorithms
            if algorithms:
                usable[kid] = _Key(key=key.key, algorithms=algorithms)
        return usable

    def _remote_key(self, client: TrustedClient, remote: _RemoteKeySet, kid: str) -> _Key | None:
        """Return the key for ``kid`` from the cached JWK Set, fetching it when needed.

        A fetch happens when the ``kid`` is unknown or the set is older than the maximum age,
        and at most once per refresh interval per client. A failed fetch keeps the old cache.
        """
        key = remote.keys.get(kid)
        if key is not None and not self._is_stale(remote):
            return key
        # A known key in a stale set: refresh if no one else is, otherwise use it as is.
        if not remote.lock.acquire(blocking=key is None):
            return key
        try:
            key = remote.keys.get(kid)
            if key is not None and not self._is_stale(remote):
                return key  # another thread refreshed while we waited
            now = self._clock()
            last = remote.last_attempt
            if last is not None and 0 <= now - last < self._refresh_interval:
                return key  # rate limit: an unknown kid stays unknown until the interval ends
            remote.last_attempt = now
            try:
                remote.keys = self._fetch_jwks(remote.url)
                remote.fetched_at = now
            except _FetchError as exc:
                logger.warning("JWKS fetch failed (iss=%s): %s", _loggable(client.iss), exc)
                if key is None:
                    raise AuthenticationError("JWK Set could not be fetched",
                                              category=NO_KEYS) from None
                return key
            return remote.keys.get(kid)
        finally:
            remote.lock.release()

    def _is_stale(self, remote: _RemoteKeySet) -> bool:
        if remote.fetched_at is None:
            return True
        age = self._clock() - remote.fetched_at
        return age < 0 or age >= self._max_age

    def _fetch_jwks(self, url: str) -> dict[str, _Key]:
        """GET a JWK Set and return its usable keys by ``kid``.

        Raises:
            _FetchError: the request fails, times out, does not answer 200, is too large, is
                not a JWK Set, or holds no key usable with the configured algorithms.
        """
        deadline = time.monotonic() + self._fetch_timeout
        body = bytearray()
        try:
            with self._session.get(
                url,
                timeout=self._fetch_timeout,
                allow_redirects=False,
                stream=True,
                headers={"Accept": "application/jwk-set+json, application/json"},
            ) as response:
                if response.status_code != 200:
                    raise _FetchError(f"HTTP status {response.status_code}")
                for chunk in response.iter_content(chunk_size=16_384):
                    body.extend(chunk)
                    if len(body) > MAX_JWKS_BYTES:
                        raise _FetchError(f"body larger than {MAX_JWKS_BYTES} bytes")
                    if time.monotonic() > deadline:
                        raise _FetchError("timed out reading the body")
        except requests.RequestException as exc:
            raise _FetchError(type(exc).__name__) from None
        try:
            document = _json_object(bytes(body))
        except (ValueError, RecursionError):
            document = None
        if document is None or not isinstance(document.get("keys"), list):
            raise _FetchError("response is not a JWK Set")
        keys: dict[str, _Key] = {}
        duplicates: set[str] = set()
        for jwk in document["keys"]:
            try:
                kid, key = _parse_jwk(jwk)
            except ValueError as exc:
                logger.info("JWKS %s: skipped a key: %s", url, exc)
                continue
            if kid in keys:
                duplicates.add(kid)
            keys[kid] = key
        for kid in duplicates:  # an ambiguous kid selects no key
            logger.warning("JWKS %s: kid %r is not unique; its keys are ignored", url, kid)
            del keys[kid]
        usable = self._restrict(keys)
        if not usable:
            raise _FetchError("no key usable with the configured algorithms")
        return usable


# --------------------------------------------------------------------------- small helpers


def _bearer_token(authorization_header: object) -> str:
    """Return the token of ``Bearer <token>``; refuse anything else."""
    if authorization_header is None:
        raise AuthenticationError("no Authorization header")
    if not isinstance(authorization_header, str):
        raise AuthenticationError("Authorization header is not a string")
    parts = authorization_header.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        raise AuthenticationError("Authorization header is not 'Bearer <token>'")
    token = parts[1]
    if len(token) > MAX_TOKEN_LENGTH:
        raise AuthenticationError("token too long")
    if not _COMPACT_JWS.fullmatch(token):
        raise AuthenticationError("token is not a compact JWS")
    return token


def _json_object(data: bytes) -> dict[str, Any] | None:
    """Parse JSON text that must be an object; refuse NaN and Infinity.

    Raises:
        ValueError: not UTF-8 or not JSON (also for numbers too long to convert).
        RecursionError: nested too deeply.
    """
    value = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    return value if isinstance(value, dict) else None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"JSON constant {name} is not allowed")


def _as_number(value: object) -> float | None:
    """``value`` as a finite float; None if not a JSON number (bool excluded) or out of range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _time_claim(claims: Mapping[str, Any], name: str) -> float:
    if claims.get(name) is None:
        raise AuthenticationError(f"{name} claim missing")
    number = _as_number(claims[name])
    if number is None:
        raise AuthenticationError(f"{name} claim is not a finite number")
    return number


def _strip_slash(url: str) -> str:
    return url[:-1] if url.endswith("/") else url


def _audience_matches(aud: object, audience: str) -> bool:
    """True if ``aud`` (a string or a list of strings) names ``audience``."""
    if isinstance(aud, str):
        values = [aud]
    elif isinstance(aud, list) and aud and all(isinstance(a, str) for a in aud):
        values = aud
    else:
        return False
    expected = _strip_slash(audience)
    return any(_strip_slash(value) == expected for value in values)


def _loggable(value: object) -> str:
    """A log-safe rendering of an ``iss``: quoted, control characters escaped, shortened."""
    if value is None:
        return "-"
    if not isinstance(value, str):
        return f"<{type(value).__name__}>"
    return repr(value[:200] + ("..." if len(value) > 200 else ""))
