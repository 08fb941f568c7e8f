"""Test JWTs for trying a signed call (``lbp-cds token --dev``): development and testing only.

A real CDS client (the EHR) signs its own tokens with its own key; the service only verifies
them (``auth.JwtVerifier``). This module plays that client on a developer's machine: it reads a
private key (PEM, or a JWK / JWK Set JSON file), signs a token shaped as CDS Hooks 2.0 asks for
one endpoint, and gives the public JWK Set to put in the trusted clients file.

The token (CDS Hooks 2.0, "Trusting CDS Clients"):

* header: ``alg`` (from the key: ES384 for a P-384 key, RS384 for RSA), ``typ: JWT``, ``kid``
  (the JWK's ``kid``, else the key's RFC 7638 thumbprint), and ``jku`` only when asked;
* claims: ``iss`` (the client, as listed in the trusted clients file), ``aud`` (the exact URL of
  the endpoint called, e.g. ``http://127.0.0.1:8080/cds-services/lbp-triage``), ``iat`` (now),
  ``exp`` (at most five minutes later), ``jti`` (a new UUID: the service refuses a replay), and
  ``tenant`` when given.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

#: The longest lifetime ``lbp-cds token`` signs (CDS Hooks recommends five minutes at most).
MAX_LIFETIME_S = 300

_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
# RFC 7638 §3.2: the members of a public JWK that its thumbprint covers, by key type.
_THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"),
                       "OKP": ("crv", "kty", "x")}


class TokenError(Exception):
    """The key cannot be read or used, or an argument is out of range."""


@dataclass(frozen=True)
class SigningKey:
    """A private key read from a file, with what the token header needs.

    Attributes:
        key: the private key object (cryptography).
        kid: the key id the header names.
        alg: the JWS algorithm it signs with.
    """

    key: Any
    kid: str
    alg: str

    def public_jwk(self) -> dict[str, Any]:
        """The public half as a JWK with ``kid``, ``alg`` and ``use``, for a JWK Set."""
        jwk = _public_jwk(self.key)
        return {**jwk, "kid": self.kid, "alg": self.alg, "use": "sig"}


def read_key(path: Path, kid: str | None = None, alg: str | None = None) -> SigningKey:
    """Read a private key from a PEM file, a private JWK or a JWK Set holding one.

    Args:
        path: the file.
        kid: the key id to use (default: the JWK's ``kid``, else the RFC 7638 thumbprint); in a
            JWK Set, the key to pick.
        alg: the algorithm (default: the JWK's ``alg``, else by key type and curve).

    Returns:
        The key.

    Raises:
        TokenError: the file cannot be read, holds no private key, or the key type is not
            supported.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TokenError(f"cannot read the key file {path}: {exc.strerror}") from None
    jwk: dict[str, Any] | None = None
    if data.lstrip().startswith(b"{"):
        jwk = _private_jwk(data, path, kid)
        try:
            key: Any = jwt.PyJWK(jwk).key
        except jwt.PyJWTError as exc:
            raise TokenError(f"{path}: not a usable JWK ({exc})") from None
    else:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise TokenError(f"{path}: not an unencrypted PEM private key or a JWK ({exc})"
                             ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
                      | ed25519.Ed25519PrivateKey):
        raise TokenError(f"{path}: a private EC, RSA or Ed25519 key is needed")
    chosen_alg = alg or (jwk or {}).get("alg") or _default_alg(key)
    chosen_kid = kid or (jwk or {}).get("kid") or thumbprint(_public_jwk(key))
    return SigningKey(key, str(chosen_kid), str(chosen_alg))


def _private_jwk(data: bytes, path: Path, kid: str | None) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise TokenError(f"{path}: not valid JSON ({exc})") from None
    keys = doc.get("keys") if isinstance(doc, dict) and "keys" in doc else [doc]
    private = [k for k in keys or [] if isinstance(k, dict) and "d" in k
               and (kid is None or k.get("kid") == kid)]
    if not private:
        which = f" with kid {kid}" if kid else ""
        raise TokenError(f"{path}: holds no private JWK{which} (a private JWK has \"d\")")
    return dict(private[0])


def _default_alg(key: Any) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        alg = _EC_ALGORITHMS.get(key.curve.name)
        if alg is None:
            raise TokenError(f"EC curve {key.curve.name} is not supported")
        return alg
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS384"
    return "EdDSA"


def _public_jwk(key: Any) -> dict[str, Any]:
    public = key.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    return {k: v for k, v in dict(jwk).items() if k in ("kty", "crv", "x", "y", "n", "e")}


def thumbprint(public_jwk: dict[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint of a public JWK (base64url, no padding)."""
    members = _THUMBPRINT_MEMBERS[str(public_jwk["kty"])]
    canonical = json.dumps({m: public_jwk[m] for m in members}, separators=(",", ":"),
                           sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def check_audience(aud: str) -> str:
    """The endpoint URL, checked to be an absolute http(s) URL.

    Raises:
        TokenError: it is not.
    """
    parts = urlsplit(aud)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TokenError(f"--aud must be the endpoint's full URL (e.g. "
                         f"http://127.0.0.1:8080/cds-services/lbp-triage), not {aud!r}")
    return aud


def sign(key: SigningKey, iss: str, aud: str, *, lifetime_s: int = MAX_LIFETIME_S,
         tenant: str | None = None, jku: str | None = None, now: float | None = None,
         jti: str | None = None) -> str:
    """Sign a CDS client token for one endpoint.

    Args:
        key: the signing key.
        iss: the client's issuer, as the trusted clients file lists it.
        aud: the exact URL of the endpoint the token is for.
        lifetime_s: seconds from ``iat`` to ``exp`` (1 to 300).
        tenant: the ``tenant`` claim, if any.
        jku: a ``jku`` header (the URL of the client's JWK Set), if any.
        now: the issue time (epoch seconds; default: now).
        jti: the token id (default: a new UUID).

    Returns:
        The compact JWS.

    Raises:
        TokenError: the lifetime is out of range or ``aud`` is not a URL.
    """
    if not 1 <= lifetime_s <= MAX_LIFETIME_S:
        raise TokenError(f"the lifetime must be 1 to {MAX_LIFETIME_S} seconds, not {lifetime_s}")
    if not iss:
        raise TokenError("--iss must name the client")
    issued = int(now if now is not None else time.time())
    claims: dict[str, Any] = {"iss": iss, "aud": check_audience(aud), "iat": issued,
                              "exp": issued + lifetime_s, "jti": jti or str(uuid.uuid4())}
    if tenant:
        claims["tenant"] = tenant
    headers: dict[str, Any] = {"typ": "JWT", "kid": key.kid}
    if jku:
        headers["jku"] = jku
    return jwt.encode(claims, key.key, algorithm=key.alg, headers=headers)


def new_key(path: Path) -> None:
    """Write a new EC P-384 private key (PEM, mode 0600); never overwrite a file.

    Raises:
        TokenError: the file exists or cannot be written.
    """
    private = ec.generate_private_key(ec.SECP384R1())
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise TokenError(f"{path} exists; --new-key never overwrites a key") from None
    except OSError as exc:
        raise TokenError(f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
