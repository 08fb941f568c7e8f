"""The exceptions of lbp-cds, and how each one reaches the caller.

Every error a request can meet is a ``CdsError``; each knows its HTTP status and renders as a
FHIR ``OperationOutcome`` whose issues name the offending field. Nothing else reaches the caller:
an unexpected exception becomes a 500 OperationOutcome without internals.

::

    CdsError                         (500)
     +-- RequestError                (400) malformed JSON, schema violations, wrong hook
     |    +-- JsonTooDeep            (400) nesting deeper than allowed
     |    +-- FhirServerRefused      (400) fhirServer not allowed for this client (egress.py)
     +-- AuthenticationError         (401) any JWT failure; the body names only its category
     +-- ServiceNotFound             (404) unknown service id
     +-- PayloadTooLarge             (413) body larger than allowed
     +-- UnsupportedMediaType        (415) not application/json
     +-- PreconditionFailed          (412) required FHIR data could not be obtained
     +-- UnprocessableFeedback       (422) feedback well-formed but about nothing we issued
     +-- StoreUnavailable            (503) the database did not answer; the client may retry

    KnowledgeError                   not an HTTP error: the knowledge pack is inconsistent; the
                                     service refuses to start and says where.
    ConfigError                      a setting is invalid; the service refuses to start.

Catch ``CdsError`` at the HTTP boundary only (``api.py``); below it, raise the most specific class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Issue:
    """One problem, located.

    Args:
        location: where the problem is, as a dotted path into the request (``context.patientId``)
            or a prefetch key; empty when it concerns the whole body.
        message: what is wrong, in words an integrator can act on.
        code: the FHIR ``issue-type`` code (``invalid``, ``required``, ``not-found`` ...).
    """

    location: str
    message: str
    code: str = "invalid"

    def as_fhir(self, severity: str = "error") -> dict[str, Any]:
        """Return the issue as an ``OperationOutcome.issue`` element."""
        issue: dict[str, Any] = {
            "severity": severity,
            "code": self.code,
            "diagnostics": self.message,
        }
        if self.location:
            issue["expression"] = [self.location]
        return issue


class CdsError(Exception):
    """Base of every error that reaches an HTTP caller."""

    status = 500
    default_code = "exception"

    def __init__(self, message: str, issues: list[Issue] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.issues = issues or [Issue("", message, self.default_code)]

    def operation_outcome(self) -> dict[str, Any]:
        """Render the error as a FHIR R4 OperationOutcome."""
        return {
            "resourceType": "OperationOutcome",
            "issue": [issue.as_fhir() for issue in self.issues],
        }


class RequestError(CdsError):
    """The request body is not a valid CDS Hooks request for this service (400)."""

    status = 400
    default_code = "invalid"


class JsonTooDeep(RequestError):
    """The JSON nests deeper than the configured limit (400)."""

    default_code = "too-costly"


class FhirServerRefused(RequestError):
    """The request's ``fhirServer`` is not a place this client may make us connect (400).

    Raised before any connection: the URL is outside the client's ``fhir_servers``, or its host
    resolves to an address of a kind the client's entry does not allow (``egress.py``).
    """

    default_code = "forbidden"


class AuthenticationError(CdsError):
    """The caller could not be authenticated (401).

    The body names only the reason's category (``category``: "token expired or not yet
    valid", "issuer, key or jku not trusted" ...) and where the exact reason is: the service's
    log, under the response's ``X-Request-Id``. The message (the exact reason) is for the log.
    """

    status = 401
    default_code = "login"

    def __init__(self, message: str, issues: list[Issue] | None = None, *,
                 category: str = "") -> None:
        super().__init__(message, issues)
        self.category = category

    def operation_outcome(self, request_id: str = "") -> dict[str, Any]:
        """Render the refusal: its category and where the reason is logged; nothing else.

        Args:
            request_id: the ``X-Request-Id`` of the response, named in the text.
        """
        where = f"X-Request-Id {request_id}" if request_id else "the response's X-Request-Id"
        return {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "login",
                       "diagnostics": f"Unauthorized: {self.category or 'token refused'}. "
                                      f"The exact reason is in the service's log under {where}."}],
        }


class ServiceNotFound(CdsError):
    """No CDS service with that id (404)."""

    status = 404
    default_code = "not-found"


class PayloadTooLarge(CdsError):
    """The body exceeds the configured size (413)."""

    status = 413
    default_code = "too-costly"


class UnsupportedMediaType(CdsError):
    """The body is not ``application/json`` (415)."""

    status = 415
    default_code = "not-supported"


class PreconditionFailed(CdsError):
    """Data the service needs is neither prefetched nor obtainable from the FHIR server (412)."""

    status = 412
    default_code = "not-found"


class UnprocessableFeedback(CdsError):
    """Feedback that is valid JSON of the right shape but cannot be accepted (422)."""

    status = 422
    default_code = "processing"


class StoreUnavailable(CdsError):
    """The store could not be read or written (503): nothing was stored, a retry is safe."""

    status = 503
    default_code = "transient"


class KnowledgeError(Exception):
    """The knowledge pack in ``cds_services/`` is inconsistent; the message says where."""


class ConfigError(Exception):
    """A setting has an invalid value; the message names the environment variable."""
