"""Server-rendered HTML pages (the SMART intake app): one Jinja2 environment and ``render``.

Templates live in ``templates/`` (``smart/base.html``, ``smart/intake.html``); they carry no inline
script or style, so the pages work under a Content-Security-Policy that allows only the files
under the app's static prefix. Autoescaping is on and an undefined variable is an error, not an
empty string: a page missing its context fails in the tests, not in front of a patient.
"""

from __future__ import annotations

from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined

from lbp_cds.intake import form_strings

env = Environment(
    loader=PackageLoader("lbp_cds", "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
# A typed answer (or what the form sent) as the strings its fields hold.
env.filters["form_strings"] = form_strings


def render(template: str, **context: Any) -> str:
    """Render a template with its context.

    Args:
        template: a path under ``templates/`` (``smart/intake.html``).
        **context: the template's variables (each template says which it needs).

    Returns:
        The HTML.

    Raises:
        jinja2.TemplateError: the template is missing, or uses a variable not given.
    """
    return env.get_template(template).render(**context)
