"""lbp-cds: a CDS Hooks 2.0 service for low back pain radiating to the leg.

``create_app`` lives in ``lbp_cds.app`` and is imported on first use: importing the package must
not import the application (and with it prometheus_client) before ``lbp-cds serve`` has set up
the multiprocess metrics directory that gunicorn's workers share.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from lbp_cds.app import create_app

        return create_app
    raise AttributeError(f"module 'lbp_cds' has no attribute {name!r}")
