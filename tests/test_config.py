"""Settings: parsing, validation, and the README's table kept in step with the code."""

from __future__ import annotations

from pathlib import Path

import pytest

from lbp_cds.config import Settings, settings_table
from lbp_cds.errors import ConfigError

README = Path(__file__).resolve().parents[1] / "README.md"


def test_defaults_are_the_embedded_ones():
    s = Settings.from_env({})
    assert s.database_url.startswith("sqlite:///") and not s.dev
    assert s.algorithms == ("ES384", "RS384")


def test_environment_values_are_typed():
    s = Settings.from_env({"LBP_CDS_DEV": "true", "LBP_CDS_WORKERS": "3",
                           "LBP_CDS_FHIR_DEADLINE_SECONDS": "2.5",
                           "LBP_CDS_CORS_ORIGINS": "https://a.example, https://b.example"})
    assert s.dev and s.workers == 3 and s.fhir_deadline_seconds == 2.5
    assert s.origins == ("https://a.example", "https://b.example")


@pytest.mark.parametrize("env, message", [
    ({"LBP_CDS_WORKERS": "two"}, "LBP_CDS_WORKERS"),
    ({"LBP_CDS_DEV": "maybe"}, "LBP_CDS_DEV"),
    ({"LBP_CDS_PORT": "0"}, "LBP_CDS_PORT"),
    ({"LBP_CDS_JWT_ALGORITHMS": "RS384,HS256"}, "HS256"),
    ({"LBP_CDS_JWT_ALGORITHMS": "none"}, "none"),
    ({"LBP_CDS_CORS_ORIGINS": "*"}, "dev"),
    ({"LBP_CDS_LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
    ({"LBP_CDS_KEEPALIVE_SECONDS": "-1"}, "KEEPALIVE_SECONDS"),
])
def test_bad_values_name_the_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_readme_documents_every_setting_with_its_default():
    assert settings_table() in README.read_text(encoding="utf-8"), (
        "README.md's settings table is stale: paste the output of "
        "`python -c 'from lbp_cds.config import settings_table; print(settings_table())'`")


def test_authentication_needs_clients_and_a_public_url(tmp_path):
    from lbp_cds import create_app
    from tests.conftest import MINI

    base = {"database_url": f"sqlite:///{tmp_path}/s.sqlite3", "knowledge_dir": str(MINI)}
    with pytest.raises(ConfigError, match="PUBLIC_BASE_URL"):
        create_app(Settings(**base))
    with pytest.raises(ConfigError, match="CLIENTS_FILE"):
        create_app(Settings(public_base_url="https://cds.example.org", **base))
