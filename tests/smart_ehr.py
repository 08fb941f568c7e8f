"""The ``smart_ehr`` fixture: ``lbp_cds.devehr.SmartEhr`` (authlib authorization server plus FHIR
gateway) in front of the session's sekmet-fhir server. See ``lbp_cds/devehr.py`` for what is real.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lbp_cds.devehr import SmartEhr, s256
from tests.fhir_server import FhirServer

__all__ = ["SmartEhr", "s256", "smart_ehr"]


@pytest.fixture
def smart_ehr(fhir_server: FhirServer) -> Iterator[SmartEhr]:
    """A started EHR stand-in in front of the session's sekmet server, no clients registered.

    Args:
        fhir_server: The session's sekmet server.

    Yields:
        The running :class:`SmartEhr`; it is stopped after the test.
    """
    with SmartEhr(fhir_server) as ehr:
        yield ehr
