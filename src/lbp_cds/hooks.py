"""CDS Hooks 2.0.1 wire types: JSON parsing, schema validation and typed views of the bodies.

The JSON Schemas in ``lbp_cds/schemas/`` (draft 2020-12) are the contract; this module compiles
each once at import, with a format checker of its own (``uuid``, ``uri``, ``date-time``: the
checkers ``jsonschema`` ships for ``uri`` and ``date-time`` silently accept everything unless
optional packages are installed, and its ``uuid`` checker accepts ``urn:uuid:`` and brace forms).

Incoming bodies (requests, feedback) are checked strictly on CDS Hooks structure and leniently
elsewhere: unknown extra fields are allowed, and embedded FHIR resources are only checked for a
``resourceType`` (their content is the business of the resource layer, which parses what it uses
with ``fhir.resources.R4B``). Outgoing bodies (responses, discovery) are checked strictly.

Every problem becomes an :class:`lbp_cds.errors.Issue` whose ``location`` is a dotted path
(``context.patientId``, ``prefetch.patient.resourceType``, ``cards[0].links[1].type``) and whose
message says in plain words what is wrong without echoing the offending value (it may be PHI).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import orjson
from jsonschema import Draft202012Validator, FormatChecker, ValidationError, validators
from jsonschema.protocols import Validator

from lbp_cds import rawfhir
from lbp_cds.errors import Issue, JsonTooDeep, RequestError

__all__ = [
    "Feedback",
    "FhirAuthorization",
    "HookRequest",
    "parse_feedback",
    "parse_hook_body",
    "parse_json",
    "parse_request",
    "request_issues",
    "response_issues",
    "services_issues",
]

# orjson refuses documents nested deeper than this, whatever ``max_depth`` says.
_ORJSON_MAX_DEPTH = 1024

# --------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------

_UUID_RE = re.compile(
    r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"
)

# RFC 3986 absolute URI: scheme ":" and then no whitespace, controls or characters that must be
# percent-encoded. ASCII only (an IRI is not a URI).
_URI_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:[^\s\x00-\x1f\x7f<>\"{}|\\^`]+")

# RFC 3339 section 5.6 date-time (a time zone is mandatory).
_DATE_TIME_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)


def _is_uuid(instance: object) -> bool:
    """Return whether ``instance`` is a UUID in its canonical 8-4-4-4-12 form (non-strings pass)."""
    return not isinstance(instance, str) or _UUID_RE.fullmatch(instance) is not None


def _is_absolute_uri(instance: object) -> bool:
    """Return whether ``instance`` is an absolute URI (non-strings pass).

    ``http`` and ``https`` URIs also need ``//`` and a host with a valid port, if any.
    """
    if not isinstance(instance, str):
        return True
    if not instance.isascii() or _URI_RE.fullmatch(instance) is None:
        return False
    scheme = instance.split(":", 1)[0].lower()
    if scheme not in ("http", "https"):
        return True
    try:
        parts = urlsplit(instance)
        _ = parts.port  # raises ValueError on a malformed port
    except ValueError:
        return False
    return instance[len(scheme) + 1 :].startswith("//") and bool(parts.hostname)


def _parse_date_time(value: str) -> datetime | None:
    """Parse an RFC 3339 date-time.

    Args:
        value: the text, e.g. ``2021-12-11T10:05:31Z`` or ``2021-12-11T11:05:31.5+01:00``.

    Returns:
        The instant as a timezone-aware UTC ``datetime`` (a leap second ``:60`` becomes
        ``:59.999999``), or ``None`` when ``value`` is not an RFC 3339 date-time.
    """
    match = _DATE_TIME_RE.fullmatch(value)
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in match.group(1, 2, 3, 4, 5, 6))
    fraction = match.group(7) or ""
    micro = int((fraction + "000000")[:6])
    if second == 60:
        second, micro = 59, 999_999
    if match.group(8):
        offset = timedelta(0)
    else:
        off_h, off_m = int(match.group(10)), int(match.group(11))
        if off_h > 23 or off_m > 59:
            return None
        offset = timedelta(hours=off_h, minutes=off_m)
        if match.group(9) == "-":
            offset = -offset
    try:
        local = datetime(year, month, day, hour, minute, second, micro, tzinfo=timezone(offset))
        return local.astimezone(UTC)
    except (ValueError, OverflowError):
        return None


def _is_date_time(instance: object) -> bool:
    """Return whether ``instance`` is an RFC 3339 date-time (non-strings pass)."""
    return not isinstance(instance, str) or _parse_date_time(instance) is not None


FORMAT_CHECKER = FormatChecker(formats=())
FORMAT_CHECKER.checks("uuid")(_is_uuid)
FORMAT_CHECKER.checks("uri")(_is_absolute_uri)
FORMAT_CHECKER.checks("date-time")(_is_date_time)

# --------------------------------------------------------------------------------------------
# Validators
# --------------------------------------------------------------------------------------------

_PATTERN_CACHE: dict[str, re.Pattern[str]] = {}


def _compile_ecma(pattern: str) -> re.Pattern[str]:
    """Compile a schema ``pattern`` so that a final ``$`` means end of input, as in ECMA-262.

    Python's ``$`` also matches before a trailing newline, so ``^[A-Za-z0-9\\-\\.]{1,64}$``
    would accept ``"123\\n"``.
    """
    compiled = _PATTERN_CACHE.get(pattern)
    if compiled is None:
        source = pattern
        if source.endswith("$") and not source.endswith("\\$"):
            source = source[:-1] + r"\Z"
        compiled = _PATTERN_CACHE[pattern] = re.compile(source)
    return compiled


def _pattern_keyword(
    validator: Validator, pattern: str, instance: Any, schema: dict[str, Any]
) -> Iterator[ValidationError]:
    """The ``pattern`` keyword with ECMA-262 end-of-input semantics for ``$``."""
    if validator.is_type(instance, "string") and _compile_ecma(pattern).search(instance) is None:
        yield ValidationError(f"does not match {pattern!r}")


_Validator: type[Validator] = validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator, {"pattern": _pattern_keyword}
)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` that refuses a JSON object with a repeated key."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _load_validator(name: str) -> Validator:
    """Load ``schemas/<name>.schema.json``, check it against the 2020-12 metaschema, compile it.

    Args:
        name: ``request``, ``response``, ``feedback`` or ``services``.

    Returns:
        A validator using :data:`FORMAT_CHECKER`.

    Raises:
        ValueError: the schema file repeats a key.
        jsonschema.SchemaError: the schema is not a valid draft 2020-12 schema.
    """
    text = (resources.files("lbp_cds") / "schemas" / f"{name}.schema.json").read_text("utf-8")
    schema = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    Draft202012Validator.check_schema(schema)
    for pattern in _patterns(schema):
        _compile_ecma(pattern)
    validator: Validator = _Validator(schema, format_checker=FORMAT_CHECKER)
    return validator


def _patterns(node: Any) -> Iterator[str]:
    """Yield every ``pattern`` keyword value in a schema (so a bad regex fails at import)."""
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, dict):
            value = current.get("pattern")
            if isinstance(value, str):
                yield value
            stack.extend(current.values())
        elif isinstance(current, list):
            stack.extend(current)


_REQUEST_VALIDATOR = _load_validator("request")
_RESPONSE_VALIDATOR = _load_validator("response")
_FEEDBACK_VALIDATOR = _load_validator("feedback")
_SERVICES_VALIDATOR = _load_validator("services")

# --------------------------------------------------------------------------------------------
# Errors -> Issues
# --------------------------------------------------------------------------------------------

_JSON_TYPE_WORDS = {
    "object": "a JSON object",
    "array": "an array",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "null",
}

_FORMAT_WORDS = {
    "uuid": "a UUID in its 8-4-4-4-12 hexadecimal form",
    "uri": "an absolute URL",
    "date-time": "an RFC 3339 date-time with a time zone, e.g. '2021-12-11T10:05:31Z'",
}

_ISSUE_CODES = {
    "required": "required",
    "dependentRequired": "required",
    "type": "structure",
    "additionalProperties": "structure",
}
_VALUE_KEYWORDS = frozenset(
    {
        "enum",
        "const",
        "pattern",
        "format",
        "minLength",
        "maxLength",
        "minItems",
        "minProperties",
        "minimum",
        "maximum",
    }
)

PathElement = str | int
_DIGITS = re.compile(r"(\d+)")
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_\-$]+")


def _location(path: Iterable[PathElement]) -> str:
    """Render a path as ``a.b[0].c``; a key that is not a plain name is quoted: ``a["x.y"]``."""
    text = ""
    for element in path:
        if isinstance(element, int):
            text += f"[{element}]"
        elif _PLAIN_KEY.fullmatch(element) is None:
            text += f"[{json.dumps(element)}]"
        else:
            text += f".{element}" if text else element
    return text


def _label(path: list[PathElement], root: str) -> str:
    """Name the last field of ``path`` with its indexes (``selections[0]``), or ``root``."""
    label = ""
    for element in reversed(path):
        if isinstance(element, int):
            label = f"[{element}]" + label
        else:
            return element + label
    return root + label if label else root


def _location_key(location: str) -> list[str | int]:
    """Sort key for a location: text alphabetically, array indexes numerically."""
    return [int(part) if index % 2 else part for index, part in enumerate(_DIGITS.split(location))]


def _join(values: Iterable[Any]) -> str:
    """Render allowed values as ``'a', 'b' or 'c'``."""
    words = [json.dumps(v) if not isinstance(v, str) else f"'{v}'" for v in values]
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " or " + words[-1]


@dataclass(frozen=True)
class _Failure:
    """The parts of a ``ValidationError`` that become issues, with plain types."""

    keyword: str
    value: Any
    instance: Any
    schema: dict[str, Any]
    path: list[PathElement]

    @classmethod
    def of(cls, error: ValidationError) -> _Failure:
        return cls(
            keyword=error.validator if isinstance(error.validator, str) else "",
            value=error.validator_value,
            instance=error.instance,
            schema=error.schema if isinstance(error.schema, dict) else {},
            path=list(error.absolute_path),
        )


def _default_message(failure: _Failure, label: str, name: str | None) -> str:
    """A plain-words message for a failed keyword that has no ``x-messages`` entry."""
    keyword, value = failure.keyword, failure.value
    if keyword in ("required", "dependentRequired"):
        return f"Required field '{name}' is missing"
    if keyword == "additionalProperties":
        return f"'{name}' is not a CDS Hooks field here; put custom data under 'extension'"
    if keyword == "type":
        types = [value] if isinstance(value, str) else list(value)
        return f"{label} must be " + " or ".join(_JSON_TYPE_WORDS.get(t, t) for t in types)
    if keyword == "enum":
        return f"{label} must be one of {_join(value)}"
    if keyword == "const":
        return f"{label} must be {_join([value])}"
    if keyword == "minLength":
        if value == 1:
            return f"{label} must not be empty"
        return f"{label} must have at least {value} characters"
    if keyword == "maxLength":
        length = len(failure.instance) if isinstance(failure.instance, str) else 0
        return f"{label} must have at most {value} characters (it has {length})"
    if keyword == "minItems":
        if value == 1:
            return f"{label} must not be an empty array"
        return f"{label} must have at least {value} items"
    if keyword == "minProperties":
        return f"{label} must not be an empty object"
    if keyword == "minimum":
        return f"{label} must be at least {value}"
    if keyword == "maximum":
        return f"{label} must be at most {value}"
    if keyword == "format":
        return f"{label} must be {_FORMAT_WORDS.get(value, value)}"
    if keyword == "pattern":
        return f"{label} has an invalid format"
    return f"{label} is not valid ({keyword})"


def _issue_code(keyword: str, message: str) -> str:
    """The FHIR issue-type code for a failed keyword."""
    if keyword in _ISSUE_CODES:
        return _ISSUE_CODES[keyword]
    if "(cds-" in message or "(ord-" in message:
        return "invariant"
    if keyword in _VALUE_KEYWORDS:
        return "value"
    return "invalid"


def _field_names(failure: _Failure) -> list[str]:
    """Name the fields a failure is about: the missing ones, or the unexpected ones."""
    instance = failure.instance if isinstance(failure.instance, dict) else {}
    if failure.keyword == "required":
        return [k for k in failure.value if k not in instance]
    if failure.keyword == "dependentRequired":
        return [
            dep
            for prop, deps in failure.value.items()
            if prop in instance
            for dep in deps
            if dep not in instance
        ]
    known = failure.schema.get("properties", {})
    patterns = [_compile_ecma(p) for p in failure.schema.get("patternProperties", {})]
    return [
        key
        for key in instance
        if key not in known and not any(p.search(str(key)) for p in patterns)
    ]


def _error_issues(error: ValidationError, root: str) -> Iterator[Issue]:
    """Turn one ``ValidationError`` into located issues (several for a multi-field failure)."""
    failure = _Failure.of(error)
    custom = failure.schema.get("x-messages", {}).get(failure.keyword)
    targets: list[tuple[list[PathElement], str | None]] = [(failure.path, None)]
    if failure.keyword in ("required", "dependentRequired", "additionalProperties"):
        targets = [([*failure.path, name], name) for name in _field_names(failure)]
    for target, name in targets:
        label = _label(target, root)
        parent = _label(target[:-1], root)
        if isinstance(custom, str):
            message = custom.replace("{field}", label).replace("{parent}", parent)
        else:
            message = _default_message(failure, label, name)
        yield Issue(_location(target), message, _issue_code(failure.keyword, message))


def _collect_issues(validator: Validator, doc: Any, root: str) -> list[Issue]:
    """Validate ``doc`` and return every issue, de-duplicated and sorted by path then message.

    Args:
        validator: one of the compiled validators.
        doc: the parsed JSON value.
        root: how messages name the whole document (``"The request body"``).

    Returns:
        The issues; ``[]`` when ``doc`` is valid.
    """
    found = {issue for error in validator.iter_errors(doc) for issue in _error_issues(error, root)}
    return sorted(found, key=lambda issue: (_location_key(issue.location), issue.message))


# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------


def parse_json(body: bytes, max_depth: int = 64, opaque: frozenset[str] = frozenset()) -> Any:
    """Parse a JSON body with orjson and refuse nesting deeper than ``max_depth``.

    Depth counts containers: ``1`` and ``"x"`` have depth 0, ``{}`` depth 1, ``{"a": [1]}``
    depth 2. The check walks the parsed value iteratively (no recursion).

    Args:
        body: the raw request body (UTF-8 JSON).
        max_depth: the deepest nesting accepted; at least 1.

    Returns:
        The parsed value (``dict``, ``list``, ``str``, ``int``, ``float``, ``bool`` or ``None``).

    Raises:
        RequestError: the body is not valid JSON (``"Body is not valid JSON: <what, where>"``).
        JsonTooDeep: the body nests deeper than ``max_depth`` (or than orjson's own limit).
        ValueError: ``max_depth`` is smaller than 1.
    """
    if max_depth < 1:
        raise ValueError("max_depth must be at least 1")
    limit = min(max_depth, _ORJSON_MAX_DEPTH)
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in exc.msg or "recursion" in exc.msg.lower():
            raise JsonTooDeep(f"JSON nests deeper than {limit} levels") from None
        raise RequestError(
            f"Body is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    _check_depth(doc, limit, opaque)
    return doc


def parse_hook_body(body: bytes, max_depth: int = 64) -> Any:
    """Parse a hook request body as :func:`parse_json` with the prefetch opaque, but faster.

    The resources of prefetch Bundles are kept as JSON text with their heads decoded (see
    :mod:`lbp_cds.rawfhir`); a body that does not split cleanly is parsed by :func:`parse_json`,
    whose errors it then raises.

    Raises:
        RequestError: as :func:`parse_json`.
        JsonTooDeep: as :func:`parse_json`.
        ValueError: ``max_depth`` is smaller than 1.
    """
    if max_depth < 1:
        raise ValueError("max_depth must be at least 1")
    doc = rawfhir.split_hook_body(body)
    if doc is None:
        return parse_json(body, max_depth, opaque=_PREFETCH)
    _check_depth(doc, min(max_depth, _ORJSON_MAX_DEPTH), _PREFETCH)
    return doc


_PREFETCH = frozenset({"prefetch"})


def _check_depth(doc: Any, limit: int, opaque: frozenset[str]) -> None:
    """Raise JsonTooDeep if ``doc`` nests deeper than ``limit``, walking level by level.

    One comprehension per level. Top-level keys named in ``opaque`` (the prefetch: a megabyte of
    FHIR resources) are not walked: no code of ours recurses into them (their FHIR validation
    bounds its own recursion), and the parsers cap all nesting.
    """
    if opaque and type(doc) is dict:
        level: list[Any] = [{k: v for k, v in doc.items() if k not in opaque}]
    else:
        level = [doc] if type(doc) in (dict, list) else []
    depth = 1
    while level:
        if depth > limit:
            raise JsonTooDeep(f"JSON nests deeper than {limit} levels")
        nxt: list[Any] = []
        for node in level:
            nxt += [c for c in (node.values() if type(node) is dict else node)
                    if type(c) is dict or type(c) is list]
        level = nxt
        depth += 1


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FhirAuthorization:
    """The ``fhirAuthorization`` of a request: a bearer token for ``fhirServer``.

    The access token is transient and secret: it is left out of ``repr`` and must never be
    logged or stored. The patient id is left out of ``repr`` too (it identifies a patient).

    Args:
        access_token: OAuth 2.0 bearer token.
        token_type: ``Bearer``.
        expires_in: lifetime in seconds.
        scope: the SMART scopes granted.
        subject: the OAuth 2.0 client id of this CDS Service at the client.
        patient: the patient the token is restricted to, when it has ``patient/`` scopes.
    """

    access_token: str = field(repr=False)
    token_type: str
    expires_in: int
    scope: str
    subject: str
    patient: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class HookRequest:
    """A validated CDS Hooks request.

    ``repr`` shows no context or prefetch content (it is PHI) and no access token.

    Args:
        hook: the hook that fired, e.g. ``patient-view``.
        hook_instance: the UUID of this invocation.
        context: the hook context, as sent.
        prefetch: prefetch results by key; ``{}`` when the client sent none. A value is a FHIR
            resource (possibly an OperationOutcome) or ``None`` (no data).
        fhir_server: base URL of the client's FHIR server, if given.
        fhir_authorization: the token for ``fhir_server``, if given.
        extension: the request's ``extension`` object, if given.
    """

    hook: str
    hook_instance: str
    context: dict[str, Any]
    prefetch: dict[str, Any]
    fhir_server: str | None = None
    fhir_authorization: FhirAuthorization | None = None
    extension: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return (
            f"HookRequest(hook={self.hook!r}, hook_instance={self.hook_instance!r}, "
            f"context_keys={sorted(self.context)!r}, prefetch_keys={sorted(self.prefetch)!r}, "
            f"fhir_server={self.fhir_server!r}, fhir_authorization={self.fhir_authorization!r})"
        )

    def _context_str(self, name: str) -> str | None:
        value = self.context.get(name)
        return value if isinstance(value, str) else None

    @property
    def patient_id(self) -> str | None:
        """``context.patientId`` (a FHIR id), or ``None`` when absent."""
        return self._context_str("patientId")

    @property
    def user_id(self) -> str | None:
        """``context.userId`` (``Type/id``), or ``None`` when absent."""
        return self._context_str("userId")

    @property
    def encounter_id(self) -> str | None:
        """``context.encounterId`` (a FHIR id), or ``None`` when absent."""
        return self._context_str("encounterId")

    @property
    def selections(self) -> list[str]:
        """``context.selections`` (``Type/id`` of the newly selected orders); ``[]`` when absent."""
        value = self.context.get("selections")
        if not isinstance(value, list):
            return []
        return [item for item in value if isinstance(item, str)]

    @property
    def draft_orders(self) -> list[dict[str, Any]]:
        """The resources of ``context.draftOrders.entry[].resource``; ``[]`` when absent."""
        bundle = self.context.get("draftOrders")
        if not isinstance(bundle, dict):
            return []
        entries = bundle.get("entry")
        if not isinstance(entries, list):
            return []
        return [
            entry["resource"]
            for entry in entries
            if isinstance(entry, dict) and isinstance(entry.get("resource"), dict)
        ]


def request_issues(doc: Any) -> list[Issue]:
    """Check a parsed body against ``request.schema.json``.

    Args:
        doc: the parsed JSON body.

    Returns:
        Every problem, sorted by location; ``[]`` when the request is valid.
    """
    return _collect_issues(_REQUEST_VALIDATOR, doc, "The request body")


def parse_request(doc: Any) -> HookRequest:
    """Validate a parsed CDS Hooks request and return its typed view.

    Checks the request structure, ``cds-r-1`` and, for the hooks of the Hook Library 1.0.1
    (patient-view, order-select, order-sign, encounter-start, encounter-discharge,
    appointment-book), the hook's context; the context of any other hook must only be an object.

    Args:
        doc: the parsed JSON body (see :func:`parse_json`).

    Returns:
        The request.

    Raises:
        RequestError: the request is invalid; ``issues`` holds every problem at once, sorted by
            location, each naming the field (``context.patientId``) and what is wrong.
    """
    issues = request_issues(doc)
    if issues:
        raise RequestError(_summary("CDS Hooks request", issues), issues)
    auth = doc.get("fhirAuthorization")
    authorization = None
    if auth is not None:
        authorization = FhirAuthorization(
            access_token=auth["access_token"],
            token_type=auth["token_type"],
            expires_in=int(auth["expires_in"]),
            scope=auth["scope"],
            subject=auth["subject"],
            patient=auth.get("patient"),
        )
    return HookRequest(
        hook=doc["hook"],
        hook_instance=doc["hookInstance"],
        context=doc["context"],
        prefetch=doc.get("prefetch", {}),
        fhir_server=doc.get("fhirServer"),
        fhir_authorization=authorization,
        extension=doc.get("extension"),
    )


def _summary(what: str, issues: list[Issue]) -> str:
    """The one-line message of a RequestError carrying ``issues``."""
    if len(issues) == 1:
        where = f"{issues[0].location}: " if issues[0].location else ""
        return f"Invalid {what}: {where}{issues[0].message}"
    return f"Invalid {what}: {len(issues)} problems"


# --------------------------------------------------------------------------------------------
# Feedback
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Feedback:
    """One validated feedback item.

    Args:
        card: the ``card.uuid`` the feedback is about.
        outcome: ``accepted`` or ``overridden``.
        accepted_suggestions: the accepted ``suggestion.uuid`` values (empty unless accepted).
        override_reason: the override reason Coding chosen by the user, if any.
        override_comment: the user's free-text comment, if any.
        outcome_timestamp: when the user acted (timezone-aware, UTC).
    """

    card: str
    outcome: str
    accepted_suggestions: tuple[str, ...]
    override_reason: dict[str, Any] | None
    override_comment: str | None
    outcome_timestamp: datetime


def parse_feedback(doc: Any) -> list[Feedback]:
    """Validate a parsed feedback body (``{"feedback": [...]}``) and return its items.

    Args:
        doc: the parsed JSON body.

    Returns:
        The feedback items, in order.

    Raises:
        RequestError: the body is invalid (``cds-fb-1..3``, timestamps ...); ``issues`` holds
            every problem at once, sorted by location.
    """
    issues = _collect_issues(_FEEDBACK_VALIDATOR, doc, "The feedback body")
    if issues:
        raise RequestError(_summary("CDS Hooks feedback", issues), issues)
    items: list[Feedback] = []
    for item in doc["feedback"]:
        reason = item.get("overrideReason") or {}
        timestamp = _parse_date_time(item["outcomeTimestamp"])
        if timestamp is None:  # pragma: no cover - the schema's date-time format excludes this
            raise RequestError("outcomeTimestamp is not an RFC 3339 date-time")
        items.append(
            Feedback(
                card=item["card"],
                outcome=item["outcome"],
                accepted_suggestions=tuple(s["id"] for s in item.get("acceptedSuggestions", ())),
                override_reason=reason.get("reason"),
                override_comment=reason.get("userComment"),
                outcome_timestamp=timestamp,
            )
        )
    return items


# --------------------------------------------------------------------------------------------
# Responses and discovery (our own output)
# --------------------------------------------------------------------------------------------


def response_issues(doc: Any) -> list[Issue]:
    """Check a CDS Service response against ``response.schema.json``.

    Args:
        doc: the response body as a JSON-like value.

    Returns:
        Every problem, sorted by location (``cards[0].summary`` ...); ``[]`` when valid.
    """
    return _collect_issues(_RESPONSE_VALIDATOR, doc, "The response")


def services_issues(doc: Any) -> list[Issue]:
    """Check a discovery document against ``services.schema.json``.

    Besides the schema, the same ``(hook, id)`` pair may not be listed twice (the same ``id``
    under different hooks is allowed: that is how stale guidance is updated).

    Args:
        doc: the discovery body as a JSON-like value.

    Returns:
        Every problem, sorted by location (``services[1].prefetch.patient`` ...); ``[]`` when
        valid.
    """
    issues = _collect_issues(_SERVICES_VALIDATOR, doc, "The discovery document")
    services = doc.get("services") if isinstance(doc, dict) else None
    if isinstance(services, list):
        seen: dict[tuple[str, str], int] = {}
        for index, service in enumerate(services):
            if not isinstance(service, dict):
                continue
            hook, service_id = service.get("hook"), service.get("id")
            if not (isinstance(hook, str) and isinstance(service_id, str)):
                continue
            key = (hook, service_id)
            if key in seen:
                issues.append(
                    Issue(
                        f"services[{index}].id",
                        f"Service id '{key[1]}' is already listed for hook '{key[0]}' "
                        f"at services[{seen[key]}]",
                        "duplicate",
                    )
                )
            else:
                seen[key] = index
    return sorted(issues, key=lambda issue: (_location_key(issue.location), issue.message))
