"""``lbp-cds token --dev``: the test JWTs it signs pass the service's own verifier.

Each token is checked with ``auth.JwtVerifier`` for a client configured as a hospital would
(a trusted clients file naming the public JWK Set that ``lbp-cds token --jwks`` printed), so the
README's signed call works as long as these do.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from lbp_cds.auth import JwtVerifier, MemoryReplayCache, TrustedClient, load_clients
from lbp_cds.cli import main
from lbp_cds.devtoken import MAX_LIFETIME_S, TokenError, read_key, sign, thumbprint
from lbp_cds.errors import AuthenticationError
from tests.conftest import SHARED

ISS = "https://ehr.example.org"
AUD = "http://127.0.0.1:8080/cds-services/lbp-triage"
JWT_DIR = SHARED / "data" / "jwt"


def verifier_for(clients: list[TrustedClient]) -> JwtVerifier:
    return JwtVerifier(clients, MemoryReplayCache())


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["token", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_cli_token_verifies_for_a_client_configured_from_its_jwks(tmp_path, capsys):
    key = tmp_path / "dev-key.pem"
    code, jwks, _ = cli(capsys, "--dev", "--key", str(key), "--new-key", "--jwks")
    assert code == 0 and key.stat().st_mode & 0o777 == 0o600
    (tmp_path / "dev-jwks.json").write_text(jwks)
    (tmp_path / "clients.yaml").write_text(f"clients:\n  - iss: {ISS}\n"
                                           "    jwks_file: dev-jwks.json\n")
    verifier = verifier_for(load_clients(tmp_path / "clients.yaml"))

    code, token, err = cli(capsys, "--dev", "--key", str(key), "--iss", ISS, "--aud", AUD)
    assert code == 0 and err == ""
    claims = verifier.verify(f"Bearer {token.strip()}", AUD)

    assert claims["iss"] == ISS and claims["aud"] == AUD
    assert 0 < claims["exp"] - claims["iat"] <= MAX_LIFETIME_S
    assert uuid.UUID(claims["jti"])
    header = jwt.get_unverified_header(token.strip())
    public = json.loads(jwks)["keys"][0]
    assert header == {"alg": "ES384", "typ": "JWT", "kid": public["kid"]}
    assert public["kid"] == thumbprint(public) and "d" not in public
    # One use: the verifier refuses the same jti twice, so the README signs one per call.
    with pytest.raises(AuthenticationError, match="replay"):
        verifier.verify(f"Bearer {token.strip()}", AUD)


def test_the_audience_is_the_exact_endpoint(tmp_path):
    key = tmp_path / "k.pem"
    main(["token", "--dev", "--key", str(key), "--new-key", "--jwks"])
    signing = read_key(key)
    verifier = verifier_for([TrustedClient(ISS, jwks={"keys": [signing.public_jwk()]})])
    token = sign(signing, ISS, AUD)
    with pytest.raises(AuthenticationError, match="aud"):
        verifier.verify(f"Bearer {token}", AUD.replace("lbp-triage", "lbp-imaging-order-sign"))
    assert verifier.verify(f"Bearer {token}", AUD)["aud"] == AUD


def test_an_rsa_pem_key_signs_rs384(tmp_path):
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "rsa.pem"
    path.write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    signing = read_key(path, kid="rsa-1")
    assert (signing.alg, signing.kid) == ("RS384", "rsa-1")
    verifier = verifier_for([TrustedClient(ISS, jwks={"keys": [signing.public_jwk()]})])
    assert verifier.verify(f"Bearer {sign(signing, ISS, AUD, tenant='t1')}", AUD)["tenant"] == "t1"


@pytest.mark.shared
def test_the_sandbox_key_pair_signs_as_the_sandbox_does(capsys):
    """The CDS Hooks Sandbox's published pair: its JWK (with kid and alg) and its PEM."""
    public = JWT_DIR / "cds-hooks-sandbox-jwks.json"
    client = TrustedClient("https://sandbox.cds-hooks.org", jwks_file=public)
    kid = json.loads(public.read_text())["keys"][0]["kid"]
    for key_file, extra in (("cds-hooks-sandbox-jwk-keypair.json", ()),
                            ("cds-hooks-sandbox-ec-private-key.pem", ("--kid", kid))):
        code, token, err = cli(capsys, "--dev", "--key", str(JWT_DIR / key_file), "--iss",
                               client.iss, "--aud", AUD, *extra)
        assert code == 0, err
        assert jwt.get_unverified_header(token.strip())["kid"] == kid
        assert verifier_for([client]).verify(f"Bearer {token.strip()}", AUD)["iss"] == client.iss


def test_it_refuses_without_dev_and_prints_no_token(tmp_path, capsys):
    code, out, err = cli(capsys, "--key", str(tmp_path / "k.pem"), "--new-key", "--iss", ISS,
                         "--aud", AUD)
    assert code == 2 and out == "" and "--dev" in err
    assert not (tmp_path / "k.pem").exists()


def test_help_explains_the_claims(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["token", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "DEVELOPMENT AND TESTING ONLY" in text
    for claim in ("iss", "aud", "exp", "iat", "jti", "kid"):
        assert f"{claim} " in text


def test_refusals_name_the_problem(tmp_path, capsys):
    key = tmp_path / "k.pem"
    assert cli(capsys, "--dev", "--key", str(key), "--new-key", "--jwks")[0] == 0
    code, _, err = cli(capsys, "--dev", "--key", str(key), "--new-key", "--jwks")
    assert code == 2 and "never overwrites" in err
    code, out, err = cli(capsys, "--dev", "--key", str(key), "--iss", ISS, "--aud", AUD,
                         "--lifetime", "301")
    assert code == 2 and out == "" and "1 to 300 seconds" in err
    code, _, err = cli(capsys, "--dev", "--key", str(key), "--iss", ISS, "--aud", "/cds-services")
    assert code == 2 and "full URL" in err
    code, _, err = cli(capsys, "--dev", "--key", str(key), "--iss", ISS)
    assert code == 2 and "--aud" in err
    (tmp_path / "public.json").write_text(json.dumps({"keys": [read_key(key).public_jwk()]}))
    code, _, err = cli(capsys, "--dev", "--key", str(tmp_path / "public.json"), "--jwks")
    assert code == 2 and "no private JWK" in err
    with pytest.raises(TokenError, match="cannot read"):
        read_key(tmp_path / "absent.pem")
