"""Where the service may connect to fetch FHIR, and connections held to what was checked.

A hook request names its FHIR server (``fhirServer``), so without a check any caller could make
the service connect anywhere: a cloud metadata address, a database port on the host, the
hospital's internal network (server-side request forgery), with the caller's token on top. This
module is the only place that decides where FHIR fetches go. Three checks, all before any byte
is sent:

1. **The URL** (``EgressRule.check_url``): http or https, no user info, no ``.``/``..`` path
   segments; under one of the client's ``fhir_servers`` (same scheme, host and port, and a path
   that equals the listed path or continues it after a ``/``). In dev mode (no client) any URL
   passes this step.
2. **The addresses** (``approve``): the host is resolved once, by an injected resolver
   (``socket.getaddrinfo`` by default), and *every* address must be an ordinary global unicast
   address. Loopback and private addresses (RFC 1918, 100.64/10, fc00::/7) pass only for a
   client whose entry says ``allow_private: true`` (dev mode allows loopback); link-local
   (169.254/16 with the metadata address, fe80::/10), multicast, unspecified and reserved
   addresses never do. An IPv4 address embedded in IPv6 (``::ffff:10.0.0.1``, 6to4, NAT64) is
   judged as that IPv4 address.
3. **The connection** (``PinnedAdapter``): the socket is opened to the address that was checked,
   never to a fresh resolution of the name (no DNS rebinding between check and connect); the
   host name is kept for the ``Host`` header, TLS SNI and the certificate check. Environment
   proxies are not used. Redirects are not followed (callers pass ``allow_redirects=False``; a
   3xx is a failed fetch). Every URL fetched under one approval (``next`` links included) must
   stay on the approved origin and under the allowed paths (``Approved.check``).

A refusal of step 1 or 2 is a ``FhirServerRefused`` (400, an OperationOutcome saying why). A host
name that does not resolve is not a refusal but an unreachable server (``Unresolvable``).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util import connection as urllib3_connection

from lbp_cds.errors import FhirServerRefused, Issue

#: ``socket.getaddrinfo``'s shape: (host, port, family, type) -> [(family, type, proto, canonname,
#: sockaddr)]; tests map host names to the addresses they need.
Resolver = Callable[..., Sequence[tuple[Any, ...]]]

_DEFAULT_PORTS = {"http": 80, "https": 443}
#: Address kinds a client's ``allow_private: true`` lets through.
PRIVATE_KINDS = frozenset({"loopback", "private", "shared"})
#: Address kinds dev mode lets through.
DEV_KINDS = frozenset({"loopback"})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SHARED = ipaddress.ip_network("100.64.0.0/10")
#: Pools kept by a ``PinnedAdapter`` (one per origin and checked address); the oldest is closed.
MAX_POOLS = 64


class Unresolvable(Exception):
    """The FHIR server's host name did not resolve; the message is safe to log."""


@dataclass(frozen=True)
class Base:
    """A FHIR base URL split into what the prefix match compares."""

    scheme: str
    host: str
    port: int
    path: str  # without a trailing slash; "" for the root

    @property
    def origin(self) -> tuple[str, str, int]:
        """(scheme, host, port)."""
        return self.scheme, self.host, self.port

    def covers(self, other: Base) -> bool:
        """True if ``other`` is this URL or below it (whole path segments only)."""
        return other.origin == self.origin and (
            other.path == self.path or other.path.startswith(self.path + "/"))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def parse_base(url: str) -> Base:
    """Split an http(s) URL for the prefix match.

    Args:
        url: an absolute URL.

    Returns:
        Its scheme and host (lower case), effective port and path (no trailing slash).

    Raises:
        ValueError: not an absolute http(s) URL with a host, user info present, a bad port, or
            a ``.``/``..`` path segment (also percent-encoded); the message says which.
    """
    if not isinstance(url, str) or not url:
        raise ValueError("not a URL")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("not a valid URL (bad port or host)") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError("only http and https URLs can be fetched")
    if not parts.hostname:
        raise ValueError("the URL has no host")
    if "@" in parts.netloc:
        raise ValueError("user info (user:password@) is not allowed in the URL")
    segments = parts.path.split("/")
    if any(unquote(s) in (".", "..") for s in segments):
        raise ValueError("'.' and '..' path segments are not allowed")
    host = parts.hostname.lower().rstrip(".")
    return Base(scheme, host, port or _DEFAULT_PORTS[scheme], parts.path.rstrip("/"))


def address_kind(address: str) -> str:
    """What kind of address ``address`` is, for the egress check.

    Args:
        address: an IPv4 or IPv6 address (an IPv6 zone id is ignored).

    Returns:
        ``public`` for an ordinary global unicast address, otherwise one of ``unspecified``,
        ``loopback``, ``link-local``, ``multicast``, ``private``, ``shared`` (100.64/10),
        ``reserved`` or ``non-global``. An IPv4 address embedded in IPv6 (IPv4-mapped, 6to4,
        NAT64 64:ff9b::/96) is judged as that IPv4 address.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return address_kind(str(embedded))
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip in _SHARED:
        return "shared"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "non-global"
    return "public"


@dataclass(frozen=True)
class EgressRule:
    """Where one caller may make the service fetch FHIR.

    Args:
        fhir_servers: the allowed base URLs (prefix match); ``None``: any URL (dev mode only).
        allowed_kinds: address kinds allowed besides ``public`` (``PRIVATE_KINDS`` for a client
            with ``allow_private: true``; ``DEV_KINDS`` in dev mode).
        who: names the caller in refusal messages (``client https://ehr.example.org``).
    """

    fhir_servers: tuple[Base, ...] | None
    allowed_kinds: frozenset[str] = frozenset()
    who: str = "this client"

    @classmethod
    def dev(cls) -> EgressRule:
        """Dev mode: no client to hold to a list; loopback allowed, the rest checked."""
        return cls(None, DEV_KINDS, "dev mode")

    @classmethod
    def for_client(cls, iss: str, fhir_servers: Sequence[str], allow_private: bool
                   ) -> EgressRule:
        """The rule of a trusted client (its ``fhir_servers`` and ``allow_private``).

        Raises:
            ValueError: a listed URL is not a valid base (see ``parse_base``).
        """
        return cls(tuple(parse_base(u) for u in fhir_servers),
                   PRIVATE_KINDS if allow_private else frozenset(), f"client {iss}")

    def check_url(self, url: str) -> Base:
        """Step 1: the URL's form, and that it is under one of the allowed bases.

        Args:
            url: the request's ``fhirServer``.

        Returns:
            The parsed URL.

        Raises:
            FhirServerRefused: the URL is malformed or outside the list.
        """
        try:
            base = parse_base(url)
        except ValueError as exc:
            raise _refused(f"fhirServer cannot be fetched: {exc}") from None
        if self.fhir_servers is not None and not any(a.covers(base) for a in self.fhir_servers):
            listed = ", ".join(str(a) for a in self.fhir_servers) or "none"
            raise _refused(
                f"fhirServer {str(base)!r} is not one of the FHIR servers configured for "
                f"{self.who} (fhir_servers in the clients file: {listed}); nothing was fetched")
        return base

    def check_addresses(self, base: Base, addresses: Sequence[str]) -> None:
        """Step 2: every address the host resolved to must be of an allowed kind.

        Raises:
            FhirServerRefused: naming the first address refused and its kind.
        """
        for address in addresses:
            kind = address_kind(address)
            if kind != "public" and kind not in self.allowed_kinds:
                hint = (" (allowed only with allow_private: true in the client's entry)"
                        if kind in PRIVATE_KINDS else " (never allowed)")
                raise _refused(
                    f"fhirServer host {base.host!r} resolves to {address}, a {kind} address, "
                    f"which {self.who} may not make this service connect to{hint}; nothing "
                    "was fetched")


def _refused(message: str) -> FhirServerRefused:
    return FhirServerRefused(message, [Issue("fhirServer", message, "forbidden")])


@dataclass(frozen=True)
class Approved:
    """A FHIR server that passed the checks, and the address connections must go to.

    Args:
        base: the request's ``fhirServer``, parsed.
        address: the checked address every connection of this approval is opened to.
        prefixes: the paths fetches may reach on this origin (the client's listed bases on it;
            the ``fhirServer`` itself in dev mode).
    """

    base: Base
    address: str
    prefixes: tuple[Base, ...]

    def check(self, url: str) -> None:
        """Refuse a URL (a ``next`` link, say) that leaves the approved origin or paths.

        Raises:
            ValueError: the URL is malformed or outside; the message is safe to log.
        """
        target = parse_base(url)
        if target.origin != self.base.origin:
            raise ValueError("the URL leaves the approved FHIR server")
        if not any(p.covers(target) for p in self.prefixes):
            raise ValueError("the URL is outside the FHIR server's allowed paths")


def approve(url: str, rule: EgressRule, resolver: Resolver = socket.getaddrinfo) -> Approved:
    """Run steps 1 and 2 for a request's ``fhirServer``; nothing is sent to it.

    Args:
        url: the ``fhirServer``.
        rule: the caller's rule.
        resolver: resolves host names (``socket.getaddrinfo``'s signature); an IP literal is
            not passed to it.

    Returns:
        The approval whose ``address`` connections go to (the first address resolved).

    Raises:
        FhirServerRefused: refused by the URL or by an address (400).
        Unresolvable: the host name did not resolve.
    """
    base = rule.check_url(url)
    try:
        addresses = [str(ipaddress.ip_address(base.host))]
    except ValueError:
        try:
            infos = resolver(base.host, base.port, 0, socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise Unresolvable(f"the FHIR server's host name could not be resolved "
                               f"({type(exc).__name__})") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise Unresolvable("the FHIR server's host name resolved to no address")
    rule.check_addresses(base, addresses)
    prefixes = ((base,) if rule.fhir_servers is None
                else tuple(a for a in rule.fhir_servers if a.origin == base.origin))
    return Approved(base, addresses[0], prefixes)


# --------------------------------------------------------------------------- pinned connections


class _PinnedConnection(HTTPConnection):
    """An HTTP connection opened to a checked address; ``host`` stays the name (Host header)."""

    def __init__(self, *args: Any, lbp_address: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lbp_address = lbp_address

    def _new_conn(self) -> socket.socket:
        return _connect(self)


class _PinnedHTTPSConnection(HTTPSConnection):
    """An HTTPS connection opened to a checked address; SNI and the certificate check use the
    host name (``HTTPSConnection.connect`` wraps the socket ``_new_conn`` returns)."""

    def __init__(self, *args: Any, lbp_address: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lbp_address = lbp_address

    def _new_conn(self) -> socket.socket:
        return _connect(self)


def _connect(conn: _PinnedConnection | _PinnedHTTPSConnection) -> socket.socket:
    # As urllib3's HTTPConnection._new_conn, but to the checked address, never the name.
    try:
        return urllib3_connection.create_connection(
            (conn.lbp_address, conn.port), conn.timeout,
            source_address=conn.source_address, socket_options=conn.socket_options)
    except TimeoutError as exc:
        raise ConnectTimeoutError(
            conn, f"Connection to {conn.host} timed out. (connect timeout={conn.timeout})"
        ) from exc
    except OSError as exc:
        raise NewConnectionError(conn, f"Failed to establish a new connection: {exc}") from exc


class _PinnedPool(HTTPConnectionPool):
    ConnectionCls = _PinnedConnection


class _PinnedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _PinnedHTTPSConnection


_TLS_KEYS = ("cert_reqs", "ca_certs", "ca_cert_dir", "cert_file", "key_file")


class PinnedAdapter(HTTPAdapter):
    """A transport that sends a request only to the address its ``Approved`` names.

    ``FhirFetcher`` attaches the approval to each prepared request (``lbp_egress``); a request
    without one is refused (nothing reaches the network unchecked). Proxies are ignored: the
    address checked is the address connected. Pools are kept per (origin, address), at most
    ``MAX_POOLS``.
    """

    def __init__(self, pool_maxsize: int = 10) -> None:
        super().__init__(pool_connections=1, pool_maxsize=pool_maxsize, max_retries=0)
        self._maxsize = pool_maxsize
        self._pools: OrderedDict[tuple[Any, ...], HTTPConnectionPool] = OrderedDict()
        self._lock = threading.Lock()

    def get_connection_with_tls_context(
        self, request: requests.PreparedRequest, verify: Any,
        proxies: Any = None, cert: Any = None,
    ) -> HTTPConnectionPool:
        """The pool for the request's approved address (``proxies`` are not used)."""
        approved: Approved | None = getattr(request, "lbp_egress", None)
        if not isinstance(approved, Approved):
            raise requests.exceptions.ConnectionError(
                "refused: no egress approval for this request", request=request)
        try:
            approved.check(request.url or "")
        except ValueError as exc:
            raise requests.exceptions.ConnectionError(f"refused: {exc}",
                                                      request=request) from None
        _, tls = self.build_connection_pool_key_attributes(request, verify, cert)
        base = approved.base
        pool_kwargs: dict[str, Any] = dict(tls) if base.scheme == "https" else {
            k: v for k, v in tls.items() if k not in _TLS_KEYS}
        key = (*base.origin, approved.address, tuple(sorted(pool_kwargs.items())))
        with self._lock:
            pool = self._pools.get(key)
            if pool is not None:
                self._pools.move_to_end(key)
                return pool
            cls = _PinnedHTTPSPool if base.scheme == "https" else _PinnedPool
            pool = cls(base.host, base.port, maxsize=self._maxsize, block=False,
                       lbp_address=approved.address, **pool_kwargs)
            self._pools[key] = pool
            while len(self._pools) > MAX_POOLS:
                _, oldest = self._pools.popitem(last=False)
                oldest.close()
            return pool

    def close(self) -> None:
        """Close every pool."""
        with self._lock:
            for pool in self._pools.values():
                pool.close()
            self._pools.clear()
        super().close()


def pinned_session(pool_maxsize: int = 10) -> requests.Session:
    """A ``requests.Session`` for FHIR fetches: ``PinnedAdapter`` on http and https, nothing
    from the environment (no proxies, no ``.netrc`` credentials sent to a caller's server)
    except a CA bundle named by ``REQUESTS_CA_BUNDLE`` or ``CURL_CA_BUNDLE``."""
    session = requests.Session()
    session.trust_env = False
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        session.verify = bundle
    adapter = PinnedAdapter(pool_maxsize)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
