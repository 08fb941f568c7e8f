"""``/admin/burden``: the governance report a CDS committee reads, served by the service.

It exists only when ``LBP_CDS_ADMIN_TOKEN`` is set (otherwise 404, as any unknown path), and
answers only a request that carries that token as ``Authorization: Bearer <token>`` (401
otherwise, compared in constant time). The report holds counts per rule, knowledge digest and
week, never patient data; every text in it is escaped by ``report.burden_html``. The page loads
nothing from anywhere (its charts are inline SVG), and says so in its Content-Security-Policy.
"""

from __future__ import annotations

import hmac
from datetime import datetime, timezone

from flask import Blueprint, Response, abort, request

from lbp_cds.api import runtime
from lbp_cds.store import store_label
from lbp_cds.errors import RequestError

bp = Blueprint("admin", __name__)
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'"


@bp.get("/admin/burden")
def burden() -> Response:
    """The alert-burden report of the store (HTML), since ``?since=YYYY-MM-DD`` if given."""
    from lbp_cds import report

    rt = runtime()
    token = rt.settings.admin_token
    if not token:
        abort(404)
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(),
                                                             token.encode()):
        return Response("Unauthorized: /admin/burden needs the admin token as a Bearer token\n",
                        status=401, mimetype="text/plain",
                        headers={"WWW-Authenticate": 'Bearer realm="lbp-cds admin"'})
    since_text = request.args.get("since")
    since = None
    if since_text:
        try:
            since = datetime.fromisoformat(since_text).replace(tzinfo=timezone.utc)
        except ValueError:
            raise RequestError(f"since must be a date (YYYY-MM-DD), got {since_text!r}") from None
    rows = rt.store.burden(since)
    meta = {"database": store_label(rt.store), "rows": len(rows),
            "since": since.date().isoformat() if since else None,
            "generated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    page = report.burden_html(rows, meta)
    return Response(page, mimetype="text/html", headers={
        "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})
