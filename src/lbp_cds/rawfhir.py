"""Prefetch resources kept as JSON text until a rule needs them.

A patient-view prefetch can be a megabyte of FHIR: thousands of Observations, most of which no
rule ever reads past their code and date (a temperature from last year is outside every window).
Building a Python dict for every value of every resource, then freeing it, was half the cost of
a call. So the request body is split, not parsed:

- the CDS Hooks envelope (hook, context, fhirAuthorization, ...) is parsed in full, as before;
  members CDS Hooks 2.0 does not define are skipped (nothing reads them);
- each prefetch Bundle keeps its entries' resources as slices of the body (``msgspec.Raw``), and
  decodes of each only its *head*: the fields the record indexes on (type, id, patient reference,
  coded elements, dates: see ``CODE_PATHS``, ``DATE_PATHS``, ``PATIENT_REFERENCE_FIELDS``);
- a resource is decoded in full the first time the record hands it to a rule.

msgspec checks the JSON grammar of every skipped value while it splits (a malformed resource
fails the split, and the ordinary parser then answers with its usual error). Two things it does
not check there, and the code below does: UTF-8 validity (the whole body is checked up front) and
numbers beyond a double (``1e400``): a resource holding one fails when it is decoded, which is a
400 naming the resource. Unlike the ordinary parser, which refuses such a body whole, a resource
no rule reads is never decoded, so its number goes unseen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
import orjson

from lbp_cds.errors import Issue, RequestError

# Where each resource type carries the codes rules match on, and the date that places it in time.
CODE_PATHS: dict[str, tuple[tuple[str, ...], ...]] = {
    "Condition": (("code",),),
    "Observation": (("code",), ("valueCodeableConcept",), ("component", "code")),
    "MedicationRequest": (("medicationCodeableConcept",),),
    "Procedure": (("code",),),
    "ServiceRequest": (("code",),),
    "ImagingStudy": (("procedureCode",),),
    "DiagnosticReport": (("code",),),
}
DATE_PATHS: dict[str, tuple[str, ...]] = {
    "Observation": ("effectiveDateTime", "effectiveInstant", "effectivePeriod.start", "issued"),
    "Condition": ("onsetDateTime", "onsetPeriod.start", "recordedDate"),
    "Procedure": ("performedDateTime", "performedPeriod.start"),
    "MedicationRequest": ("authoredOn",),
    "ServiceRequest": ("authoredOn", "occurrenceDateTime"),
    "ImagingStudy": ("started",),
    "DiagnosticReport": ("effectiveDateTime", "effectivePeriod.start", "issued"),
    "QuestionnaireResponse": ("authored",),
}
PATIENT_REFERENCE_FIELDS = ("subject", "patient")
_T = TypeVar("_T")

# The head of a resource is decoded into small msgspec Structs rather than dicts: they are built
# and freed faster, and are not tracked by the garbage collector (JSON cannot make cycles). The
# fields are typed as FHIR types them (strings, arrays, objects), so the code reading heads needs
# no type checks: a value of another shape (a ``coding`` that is not an array, a numeric
# ``system``...) fails the split of its prefetch value, which is then parsed in full and read
# the ordinary way.
class _Coding(msgspec.Struct, gc=False):
    system: str | None = None
    code: str | None = None


class _Concept(msgspec.Struct, gc=False):
    coding: list[_Coding] | None = None


class _Reference(msgspec.Struct, gc=False):
    reference: str | None = None


class _Period(msgspec.Struct, gc=False):
    start: str | None = None


class _Component(msgspec.Struct, gc=False):
    code: _Concept | None = None


_NOT_FHIR = "lbp-cds:"  # no FHIR element name has a colon: these fields are set, never decoded


class LazyResource(msgspec.Struct, gc=False, rename={
        "raw": _NOT_FHIR + "raw", "search_mode": _NOT_FHIR + "mode",
        "key": _NOT_FHIR + "key", "index": _NOT_FHIR + "index"}):
    """A resource of a prefetch Bundle entry: its head decoded, the rest still JSON text.

    The fields are the top-level elements the record reads before a rule asks for the resource
    (``CODE_PATHS``, ``DATE_PATHS``, ``PATIENT_REFERENCE_FIELDS``, type and id); a check at
    import keeps them in step with those tables. ``raw``, ``search_mode`` (the entry's
    ``search.mode``), ``key`` and ``index`` (where it came from) are set after decoding.
    """

    resourceType: Any = None  # noqa: N815 (FHIR element names, as in the JSON)
    id: Any = None
    subject: _Reference | None = None
    patient: _Reference | None = None
    code: _Concept | None = None
    valueCodeableConcept: _Concept | None = None  # noqa: N815
    component: list[_Component] | None = None
    medicationCodeableConcept: _Concept | None = None  # noqa: N815
    procedureCode: _Concept | None = None  # noqa: N815
    effectiveDateTime: str | None = None  # noqa: N815
    effectiveInstant: str | None = None  # noqa: N815
    effectivePeriod: _Period | None = None  # noqa: N815
    issued: str | None = None
    onsetDateTime: str | None = None  # noqa: N815
    onsetPeriod: _Period | None = None  # noqa: N815
    recordedDate: str | None = None  # noqa: N815
    performedDateTime: str | None = None  # noqa: N815
    performedPeriod: _Period | None = None  # noqa: N815
    authoredOn: str | None = None  # noqa: N815
    occurrenceDateTime: str | None = None  # noqa: N815
    started: str | None = None
    authored: str | None = None
    raw: Any = None
    search_mode: Any = None
    key: str = ""
    index: int = 0

    def decode(self) -> dict[str, Any]:
        """The whole resource as a dict.

        Raises:
            RequestError: the resource holds a value JSON allows but no parser here can represent
                (a number beyond a double): a 400, as if the body had been parsed up front.
        """
        try:
            value: dict[str, Any] = _ANY.decode(self.raw)
        except _SPLIT_ERRORS as exc:
            where = f"prefetch.{self.key}.entry[{self.index}].resource"
            raise RequestError(f"Body is not valid JSON: {where}: {exc}",
                               [Issue(where, f"not valid JSON: {exc}", "invalid")]) from None
        return value

    def codings(self, resource_type: str) -> list[tuple[str, str]]:
        """(system, code) of every coding where the type carries the codes rules match on."""
        # Two copies of the coding loop, not one over a list of concepts: this runs for every
        # resource of the record, and building that list cost 0.6 ms over 1,400 Observations.
        out: list[tuple[str, str]] = []
        concepts, nested = _CODE_ATTRS.get(resource_type, _NO_CODE_ATTRS)
        for name in concepts:
            cc = getattr(self, name)
            if cc is not None and cc.coding:
                for c in cc.coding:
                    if c.system is not None and c.code is not None:
                        out.append((c.system, c.code))
        for name, sub in nested:
            for element in getattr(self, name) or ():
                cc = getattr(element, sub)
                if cc is not None and cc.coding:
                    for c in cc.coding:
                        if c.system is not None and c.code is not None:
                            out.append((c.system, c.code))
        return out

    def first_date(self, resource_type: str, parse: Callable[[str], _T | None]) -> _T | None:
        """The first of the type's date paths that ``parse`` accepts, parsed (None if none)."""
        for name, sub in _DATE_ATTRS.get(resource_type, ()):
            node = getattr(self, name)
            if sub and node is not None:
                node = getattr(node, sub)
            if node is not None:
                when = parse(node)
                if when is not None:
                    return when
        return None

    def patient_reference(self) -> str | None:
        """The first ``reference`` among ``PATIENT_REFERENCE_FIELDS``."""
        subject = self.subject
        if subject is not None and subject.reference is not None:
            return subject.reference
        patient = self.patient
        return patient.reference if patient is not None else None

    def __repr__(self) -> str:  # no content: it is PHI
        return f"LazyResource({self.resourceType!r}, {len(self.raw or b'')} bytes)"


# The same tables as attribute names of the head: for each type, the elements holding a
# CodeableConcept, and (element, member) pairs for arrays of elements holding one
# (``component.code``); the dates as (element, member or "").
_CODE_ATTRS: dict[str, tuple[tuple[str, ...], tuple[tuple[str, str], ...]]] = {
    rtype: (tuple(p[0] for p in paths if len(p) == 1),
            tuple((p[0], p[1]) for p in paths if len(p) == 2))
    for rtype, paths in CODE_PATHS.items()}
_NO_CODE_ATTRS: tuple[tuple[str, ...], tuple[tuple[str, str], ...]] = ((), ())
_DATE_ATTRS: dict[str, tuple[tuple[str, str], ...]] = {
    rtype: tuple((p.split(".")[0], p.split(".")[1] if "." in p else "") for p in paths)
    for rtype, paths in DATE_PATHS.items()}


def _check_head_fields() -> None:
    fields = set(LazyResource.__struct_fields__)
    wanted = {"resourceType", "id", *PATIENT_REFERENCE_FIELDS}
    wanted |= {path[0] for paths in CODE_PATHS.values() for path in paths}
    wanted |= {name for attrs in _DATE_ATTRS.values() for name, _sub in attrs}
    too_deep = any(len(p) > 2 for paths in CODE_PATHS.values() for p in paths) or any(
        p.count(".") > 1 for paths in DATE_PATHS.values() for p in paths)
    # pragma: no cover (a programming error, caught by any test run)
    if not wanted <= fields or too_deep or PATIENT_REFERENCE_FIELDS != ("subject", "patient"):
        raise RuntimeError("LazyResource no longer matches CODE_PATHS, DATE_PATHS or "
                           f"PATIENT_REFERENCE_FIELDS (lacks {sorted(wanted - fields)})")


_check_head_fields()


class _RawEntry(msgspec.Struct, gc=False):
    resource: msgspec.Raw = msgspec.Raw(b"null")


class _RawBundle(msgspec.Struct, gc=False):
    entry: list[_RawEntry] | None = None


class _Search(msgspec.Struct, gc=False):
    mode: Any = None


class _HeadEntry(msgspec.Struct, gc=False):
    resource: LazyResource
    search: _Search | None = None


class _HeadBundle(msgspec.Struct):
    resourceType: Any = None  # noqa: N815 (the FHIR element name)
    type: Any = None
    total: Any = None
    link: Any = None
    entry: list[_HeadEntry] | None = None


_RAWS = msgspec.json.Decoder(_RawBundle)
_HEADS = msgspec.json.Decoder(_HeadBundle)
_ANY = msgspec.json.Decoder()
_SPLIT_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, RecursionError,
                 orjson.JSONDecodeError, UnicodeDecodeError)


_NONE = msgspec.Raw(b"")


class _Envelope(msgspec.Struct):
    """The members of a CDS Hooks 2.0 request; others are skipped (the service reads none)."""

    hook: msgspec.Raw = _NONE
    hookInstance: msgspec.Raw = _NONE  # noqa: N815 (the member names of the specification)
    fhirServer: msgspec.Raw = _NONE  # noqa: N815
    fhirAuthorization: msgspec.Raw = _NONE  # noqa: N815
    context: msgspec.Raw = _NONE
    extension: msgspec.Raw = _NONE
    prefetch: dict[str, msgspec.Raw] | None | msgspec.UnsetType = msgspec.UNSET


_ENVELOPE = msgspec.json.Decoder(_Envelope)
_ENVELOPE_FIELDS = tuple(f for f in _Envelope.__struct_fields__ if f != "prefetch")


def split_hook_body(body: bytes) -> dict[str, Any] | None:
    """Parse a hook request body, keeping the resources of prefetch Bundles as JSON text.

    Args:
        body: the raw request body.

    Returns:
        The body as ``orjson.loads`` would give it, except that the ``entry`` of each prefetch
        Bundle is a list of :class:`LazyResource` and members CDS Hooks 2.0 does not define are
        left out (nothing reads them); None when the body is anything but a JSON object
        whose every part splits cleanly: the caller then parses it the ordinary way, which also
        produces the ordinary error messages.
    """
    try:
        if not body.isascii():
            body.decode("utf-8")  # msgspec does not check UTF-8 in the values it skips
        top = _ENVELOPE.decode(body)
        doc: dict[str, Any] = {}
        for name in _ENVELOPE_FIELDS:
            raw = getattr(top, name)
            if len(raw):
                doc[name] = orjson.loads(memoryview(raw))
        if top.prefetch is not msgspec.UNSET:
            doc["prefetch"] = None if top.prefetch is None else {
                key: _split_value(key, value) for key, value in top.prefetch.items()}
    except _SPLIT_ERRORS:
        return None
    return doc


def _split_value(key: str, raw: msgspec.Raw) -> Any:
    """One prefetch value: a Bundle with lazy entries, else the value parsed in full.

    Two passes over the Bundle's text: one decodes each entry's head (and the Bundle's own
    type, total and links), one slices each entry's resource out of the text.
    """
    try:
        bundle = _HEADS.decode(raw)
    except msgspec.ValidationError:
        bundle = None  # not an object, an entry without a resource...: parsed as it is
    if bundle is None or bundle.resourceType != "Bundle" or not bundle.entry:
        return orjson.loads(memoryview(raw))
    raws = _RAWS.decode(raw).entry or []
    entries: list[LazyResource] = []
    for index, (entry, text) in enumerate(zip(bundle.entry, raws, strict=True)):
        head = entry.resource
        head.raw = text.resource
        head.search_mode = entry.search.mode if entry.search is not None else None
        head.key = key
        head.index = index
        entries.append(head)
    out: dict[str, Any] = {"resourceType": "Bundle", "entry": entries}
    for name in ("type", "total", "link"):
        value = getattr(bundle, name)
        if value is not None:
            out[name] = value
    return out
