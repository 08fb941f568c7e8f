"""Load and cross-check the knowledge pack (``cds_services/``) once, at start-up.

The format is documented in ``docs/knowledge-format.md``. Loading fails with a
``KnowledgeError`` that names the file and the entry at fault; a service never starts on an
inconsistent pack. Condition trees are compiled (and their facts checked) by ``rules.py``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import yaml

from lbp_cds.errors import KnowledgeError

ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
EXTENSION_BASE = "https://lbp-cds.example.org/fhir/StructureDefinition/"
TEXT_PATTERN_URL = EXTENSION_BASE + "order-text-pattern"
NAME_EXCLUSION_URL = EXTENSION_BASE + "ingredient-name-exclusion-pattern"
PREFETCH_TOKEN = re.compile(r"\{\{\s*([^}]+?)\s*\}\}")
ALLOWED_TOKENS = {
    "context.patientId", "context.encounterId", "context.userId", "userPractitionerId",
    "userPractitionerRoleId", "userPatientId", "userRelatedPersonId",
}


def normalize_code(system: str, code: str) -> str:
    """Return the form a code is compared in: ICD-10-CM without its dot, upper case."""
    if system == ICD10CM:
        return code.replace(".", "").strip().upper()
    return code.strip()


@dataclass(frozen=True)
class Parameter:
    """A named threshold or setting, with where it comes from."""

    name: str
    value: Any
    unit: str | None
    source: str | None
    note: str
    convention: bool


@dataclass(frozen=True)
class Currency:
    """How problem-list entries of one value set count (``problem-list.yaml``).

    ``counts`` is ``current`` (clinical status active, recurrence or relapse, or none given, and
    not abated), ``ever`` (any clinical status: a history of cancer, osteoporosis, a transplant)
    or ``recent`` (current, and its onset, else its recorded date, within ``within_days``).
    ``ruled_out_by``: value sets of Conditions (any status) or Procedures that, on record at any
    time, mean an entry cannot count (an appendectomy and appendicitis). ``ended_by``: value sets
    whose entry dated after an entry's onset ends it (a delivery and a pregnancy).
    ``episode_gap_days``: for the set that defines an episode (``symptom_duration``), an entry
    this long before the next belongs to an earlier episode (HEDIS: 180 days).
    """

    valueset: str
    counts: str
    within_days: Any = None
    ruled_out_by: tuple[str, ...] = ()
    ended_by: tuple[str, ...] = ()
    episode_gap_days: Any = None
    source: str = ""
    note: str = ""


CURRENCIES = ("current", "ever", "recent")


@dataclass(frozen=True)
class Citation:
    """A guideline a rule or card cites."""

    id: str
    label: str
    url: str | None
    topic: dict[str, str] | None


@dataclass(frozen=True)
class Orderable:
    """Something a card may suggest ordering: a study, a lab, a referral."""

    id: str
    display: str
    kind: str
    codes: tuple[dict[str, str], ...]
    modality: str | None = None
    ionizing: bool = False


@dataclass(frozen=True)
class ValueSet:
    """A value set reduced to what matching needs: exact codes and is-a prefixes per system."""

    id: str
    url: str
    title: str
    exact: Mapping[str, frozenset[str]]
    prefixes: Mapping[str, tuple[str, ...]]
    exclude_exact: Mapping[str, frozenset[str]]
    exclude_prefixes: Mapping[str, tuple[str, ...]]
    text_patterns: tuple[re.Pattern[str], ...] = ()
    ingredient_names: re.Pattern[str] | None = None
    # Dose forms and routes that take a drug recognised by its ingredient's name out of the set
    # (a steroid cream is not a systemic steroid).
    name_exclusions: re.Pattern[str] | None = None

    def contains(self, system: str | None, code: str | None) -> bool:
        """Tell whether ``system|code`` is a member.

        Args:
            system: the code system URI.
            code: the code (ICD-10-CM with or without its dot).

        Returns:
            True when included and not excluded.
        """
        if not system or not code:
            return False
        norm = normalize_code(system, code)
        if norm in self.exclude_exact.get(system, ()):
            return False
        if norm.startswith(self.exclude_prefixes.get(system, ())):
            return False
        if norm in self.exact.get(system, ()):
            return True
        prefixes = self.prefixes.get(system)
        return prefixes is not None and norm.startswith(prefixes)

    def names_ingredient(self, text: str | None) -> bool:
        """Tell whether a drug's name (an RxNorm display or free text) names an ingredient of
        the value set, in a dose form the set does not exclude: the fallback for product codes
        the ConceptMap does not know."""
        return bool(text) and self.ingredient_names is not None and bool(
            self.ingredient_names.search(text or "")) and not self.excludes_by_name(text)

    def excludes_by_name(self, text: str | None) -> bool:
        """Tell whether a dose form or route (free text) takes a drug recognised by its name out
        of the value set (``ingredient-name-exclusion-pattern``)."""
        return bool(text) and self.name_exclusions is not None and bool(
            self.name_exclusions.search(text or ""))

    def matches_text(self, text: str | None) -> bool:
        """Tell whether free text matches one of the value set's order-text patterns."""
        return bool(text) and any(p.search(text or "") for p in self.text_patterns)


@dataclass(frozen=True)
class CodeUniverse:
    """The codes worth indexing: exact codes per system, and systems matched by prefix.

    Some value set could contain ``system|code`` (code normalized) when ``system`` is in
    ``prefixed_systems`` or ``code`` in ``exact[system]``; ``PatientRecord`` tests this inline,
    once per coding of the record.
    """

    exact: Mapping[str, frozenset[str]]
    prefixed_systems: frozenset[str]


@dataclass(frozen=True)
class Service:
    """One discovery entry: a service id served for one hook."""

    id: str
    hook: str
    title: str
    description: str
    prefetch: Mapping[str, str]
    required: tuple[str, ...]
    usage_requirements: str | None = None
    folder: str = ""

    def discovery(self) -> dict[str, Any]:
        """Return the discovery document entry (no empty fields)."""
        entry: dict[str, Any] = {
            "hook": self.hook,
            "title": self.title,
            "description": self.description,
            "id": self.id,
        }
        if self.prefetch:
            entry["prefetch"] = dict(self.prefetch)
        if self.usage_requirements:
            entry["usageRequirements"] = self.usage_requirements
        return entry


@dataclass(frozen=True)
class Phrase:
    """How a card names an unknown: clinical words, and the patients it can apply to."""

    say: str
    sex: str | None = None
    min_age: float | None = None
    max_age: float | None = None

    def applies(self, sex: str | None, age: float | None) -> bool:
        """Whether this can matter for the patient (unknown sex or age: it might)."""
        return admits(self, sex, age)


class Limits(Protocol):
    """Sex and age limits: a card's phrase, an intake question."""

    @property
    def sex(self) -> str | None: ...

    @property
    def min_age(self) -> float | None: ...

    @property
    def max_age(self) -> float | None: ...


def admits(limits: Limits, sex: str | None, age: float | None) -> bool:
    """Whether a patient of this sex and age is within the limits (unknown: they may be)."""
    if limits.sex and sex and sex != limits.sex:
        return False
    if age is not None and limits.min_age is not None and age < limits.min_age:
        return False
    return not (age is not None and limits.max_age is not None and age > limits.max_age)


@dataclass(frozen=True)
class CardStyle:
    """``card-style.yaml``: the card budget and the words for what could not be checked."""

    summary_chars: int = 140
    detail_words: Mapping[str, int] = field(
        default_factory=lambda: {"info": 120, "warning": 120, "critical": 180})
    static_words: Mapping[str, int] = field(
        default_factory=lambda: {"info": 70, "warning": 70, "critical": 120})
    evidence_lines: int = 3
    not_checked_named: int = 3
    rules: Mapping[str, Phrase] = field(default_factory=dict)  # in danger order
    topics: Mapping[str, Phrase] = field(default_factory=dict)


@dataclass(frozen=True)
class AskSpec:
    """A rule's ask state: when ``when`` (the known part) holds and the rule is unknown only
    because of the topics in ``about``, the card asks instead of staying silent."""

    indicator: str
    when: Any
    about: tuple[str, ...]
    silent_beside: tuple[str, ...] = ("critical",)


@dataclass(frozen=True)
class RuleSpec:
    """A rule as written in ``rules.yaml`` (trees still raw; ``rules.py`` compiles them)."""

    id: str
    title: str
    rationale: str
    sources: tuple[str, ...]
    hooks: tuple[str, ...]
    category: str
    indicator: str
    when: Any
    card: str
    escalate: tuple[tuple[str, Any], ...] = ()
    notes: tuple[tuple[str, Any], ...] = ()
    silent_beside: tuple[str, ...] = ()
    for_each_order: str | None = None
    folder: str = ""
    ask: AskSpec | None = None


PAMA_RATINGS = ("appropriate", "not-appropriate", "no-criteria-apply")
PAMA_HOOKS = ("order-select", "order-sign")


@dataclass(frozen=True)
class PamaLevel:
    """A rating level a criterion gives a study ("Usually appropriate") and its PAMA code."""

    id: str
    text: str
    pama: str


@dataclass(frozen=True)
class PamaCriterion:
    """An appropriate use criterion (an ACR variant, say): the level it gives each study."""

    id: str
    source: str
    text: str
    ratings: Mapping[str, str]


@dataclass(frozen=True)
class PamaEntry:
    """One line of ``pama.yaml`` ``decide``: a fired ``rule`` or a ``when`` tree, and what it
    gives: a ``criterion``, ``rating: no-criteria-apply`` (with ``text``) or ``withhold``."""

    rule: str | None
    when: Any
    criterion: str | None
    rating: str | None
    text: str
    withhold: str | None
    withhold_if_record_incomplete: bool


@dataclass(frozen=True)
class Pama:
    """``pama.yaml``: how judged imaging orders get an appropriateness rating (``pama.py``)."""

    guide: str
    qcdsm: str
    also_in_extension: bool
    services: tuple[str, ...]
    orders: str
    levels: Mapping[str, PamaLevel]
    studies: tuple[tuple[str, str], ...]
    criteria: Mapping[str, PamaCriterion]
    decide: tuple[PamaEntry, ...]
    not_rated: Mapping[str, str]


@dataclass
class Knowledge:
    """The whole pack, loaded and cross-checked."""

    root: Path
    parameters: dict[str, Parameter]
    citations: dict[str, Citation]
    orderables: dict[str, Orderable]
    override_system: str
    override_reasons: dict[str, dict[str, str]]
    valuesets: dict[str, ValueSet]
    ingredient_map: dict[str, frozenset[str]]
    questionnaire: dict[str, Any]
    services: list[Service]
    rules: list[RuleSpec]
    cards: dict[str, dict[str, Any]]
    categories: dict[str, dict[str, str]] = field(default_factory=dict)
    # Which problem-list entries count, by value set id (``problem-list.yaml``; absent: current).
    problem_list: dict[str, Currency] = field(default_factory=dict)
    style: CardStyle = field(default_factory=CardStyle)
    # Appropriateness ratings of imaging orders (``pama.yaml``; absent: none are given).
    pama: Pama | None = None
    valueset_use: set[str] = field(default_factory=set)
    # value set id -> the facts whose `valueset` argument names it (recorded by ``RuleEngine``).
    valueset_facts: dict[str, set[str]] = field(default_factory=dict)
    # SHA-256 of the pack as loaded (``pack_digest``): which reviewed knowledge gave a card.
    digest: str = ""
    # Rules the site parameters file runs silently (``silent_rules``): evaluated and stored,
    # never shown. ``LBP_CDS_SILENT_RULES`` adds to these (``app.create_app``).
    silent_rules: frozenset[str] = frozenset()
    _universe: CodeUniverse | None = field(default=None, repr=False)

    @property
    def questionnaire_url(self) -> str:
        """Canonical URL of the intake questionnaire."""
        return str(self.questionnaire.get("url", ""))

    def questionnaire_items(self) -> set[str]:
        """Every linkId of the intake questionnaire."""
        found: set[str] = set()
        stack = list(self.questionnaire.get("item", []))
        while stack:
            item = stack.pop()
            found.add(item.get("linkId", ""))
            stack.extend(item.get("item", []))
        return found

    @property
    def code_universe(self) -> CodeUniverse:
        """Every code any value set (or the RxNorm map) holds: the record indexes only these."""
        if self._universe is None:
            exact: dict[str, set[str]] = {}
            prefixed: set[str] = set()
            for vs in self.valuesets.values():
                for system, codes in vs.exact.items():
                    exact.setdefault(system, set()).update(codes)
                prefixed.update(s for s, p in vs.prefixes.items() if p)
            exact.setdefault(RXNORM, set()).update(self.ingredient_map)
            self._universe = CodeUniverse(
                {s: frozenset(c) for s, c in exact.items()}, frozenset(prefixed))
        return self._universe

    def currency(self, vs_id: str) -> Currency | None:
        """How entries of a value set count on a problem list; None: the rule's own arguments."""
        return self.problem_list.get(vs_id)

    @property
    def episode_valueset(self) -> str | None:
        """The value set that defines the episode (its ``problem-list.yaml`` entry has
        ``episode_gap_days``; at most one does), or None when the pack defines none."""
        return next((vs_id for vs_id, cur in self.problem_list.items()
                     if cur.episode_gap_days is not None), None)

    def services_with_id(self, service_id: str) -> list[Service]:
        """Every discovery entry with that id (the same id may serve several hooks)."""
        return [s for s in self.services if s.id == service_id]

    def param(self, value: Any) -> Any:
        """Resolve ``$name`` to the parameter's value; leave literals as they are.

        Raises:
            KnowledgeError: an unknown parameter name.
        """
        if isinstance(value, str) and value.startswith("$"):
            name = value[1:]
            if name not in self.parameters:
                raise KnowledgeError(f"unknown parameter ${name}")
            return self.parameters[name].value
        return value

    def medication_valueset(self, vs_id: str) -> ValueSet:
        """The value set widened with the RxNorm products whose ingredients it holds.

        EHRs order products (SCD/SBD), value sets list ingredients: the ConceptMap bridges them.
        """
        key = vs_id + "+products"
        if key not in self.valuesets:
            base = self.valueset(vs_id)
            products = frozenset(
                product for product, ingredients in self.ingredient_map.items()
                if any(base.contains(RXNORM, i) for i in ingredients)
            )
            exact = dict(base.exact)
            exact[RXNORM] = exact.get(RXNORM, frozenset()) | products
            self.valuesets[key] = replace(base, id=key, exact=exact)
        self.valueset_use.add(vs_id)
        return self.valuesets[key]

    def valueset(self, vs_id: str) -> ValueSet:
        """Return a value set by id, recording that it is used.

        Raises:
            KnowledgeError: no such value set.
        """
        if vs_id not in self.valuesets:
            raise KnowledgeError(f"unknown value set {vs_id!r}")
        self.valueset_use.add(vs_id)
        return self.valuesets[vs_id]


def default_root() -> Path:
    """Find the bundled pack: inside the installed package, else the checkout's folder."""
    packaged = resources.files("lbp_cds").joinpath("cds_services")
    if packaged.is_dir():
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parents[2] / "cds_services"
    if checkout.is_dir():
        return checkout
    raise KnowledgeError("no knowledge pack found: set LBP_CDS_KNOWLEDGE_DIR")


def load(root: Path | None = None, parameters_file: Path | None = None) -> Knowledge:
    """Load the knowledge pack.

    Args:
        root: the pack's folder (default: the bundled pack).
        parameters_file: optional YAML of site overrides ``{parameters: {name: value}}``,
            and the rules the site runs silently (``silent_rules: [RULE-ID, ...]`` or ``"*"``).

    Returns:
        The loaded pack; rule trees are checked by ``rules.RuleEngine``.

    Raises:
        KnowledgeError: naming the file and the entry at fault.
    """
    root = root or default_root()
    if not root.is_dir():
        raise KnowledgeError(f"knowledge folder {root} does not exist")
    parameters = _load_parameters(root / "parameters.yaml")
    if parameters_file:
        _apply_overrides(parameters, parameters_file)
    citations = _load_citations(root / "citations.yaml")
    orderables = _load_orderables(root / "orderables.yaml")
    categories = {
        str(kind): {k: str(v) for k, v in coding.items() if k in ("system", "code", "display")}
        for kind, coding in (_yaml(root / "orderables.yaml").get("categories") or {}).items()
    }
    override_doc = _yaml(root / "override-reasons.yaml")
    override_system = str(override_doc.get("system", ""))
    override_reasons = {
        rid: {"system": str(r.get("system", override_system)), "code": str(r.get("code", rid)),
              "display": str(r["display"])}
        for rid, r in (override_doc.get("reasons") or {}).items()
    }
    valuesets = {p.stem: _load_valueset(p) for p in sorted((root / "valuesets").glob("*.json"))}
    ingredient_map = _load_conceptmap(root / "conceptmaps" / "rxnorm-product-ingredient.json")
    questionnaire = _json(root / "questionnaires" / "lbp-intake.json")
    services: list[Service] = []
    rules: list[RuleSpec] = []
    cards: dict[str, dict[str, Any]] = {}
    for folder in sorted(p for p in root.iterdir() if (p / "service.yaml").is_file()):
        services.extend(_load_services(folder))
        if (folder / "rules.yaml").is_file():
            rules.extend(_load_rules(folder))
        if (folder / "cards.yaml").is_file():
            for card_id, card in (_yaml(folder / "cards.yaml").get("cards") or {}).items():
                if card_id in cards:
                    raise KnowledgeError(f"{folder.name}/cards.yaml: card {card_id} defined twice")
                cards[card_id] = card
    knowledge = Knowledge(
        root=root, parameters=parameters, citations=citations, orderables=orderables,
        override_system=override_system, override_reasons=override_reasons,
        valuesets=valuesets, ingredient_map=ingredient_map, questionnaire=questionnaire,
        services=services, rules=rules, cards=cards, categories=categories,
        problem_list=_load_problem_list(root / "problem-list.yaml"),
        style=_load_style(root / "card-style.yaml"),
        pama=_load_pama(root / "pama.yaml"),
        digest=pack_digest(root, parameters_file),
        silent_rules=(_site_silent_rules(parameters_file, [r.id for r in rules])
                      if parameters_file else frozenset()),
    )
    _cross_check(knowledge)
    return knowledge


def pack_digest(root: Path, parameters_file: Path | None = None) -> str:
    """SHA-256 over the pack: every file of its folder (relative path and bytes, in path order;
    hidden files and Python caches left out), then the site parameters file, if any.

    Any change to the pack, a comment included, gives a new digest; the same files give the same
    digest wherever they lie (a checkout, the wheel, the image).
    """
    digest = hashlib.sha256()
    files = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.is_file() and not any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
            files.append((rel.as_posix(), path))
    for rel_name, path in sorted(files):
        data = path.read_bytes()
        digest.update(f"{rel_name}\0{len(data)}\0".encode())
        digest.update(data)
    if parameters_file is not None:
        data = parameters_file.read_bytes()
        digest.update(f"site parameters\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def _yaml(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KnowledgeError(f"{path} is missing") from None
    except yaml.YAMLError as exc:
        raise KnowledgeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise KnowledgeError(f"{path}: expected a mapping at the top")
    return doc


def _json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KnowledgeError(f"{path} is missing") from None
    except json.JSONDecodeError as exc:
        raise KnowledgeError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise KnowledgeError(f"{path}: expected a JSON object")
    return doc


def _load_parameters(path: Path) -> dict[str, Parameter]:
    out: dict[str, Parameter] = {}
    for name, spec in (_yaml(path).get("parameters") or {}).items():
        if not isinstance(spec, dict) or "value" not in spec:
            raise KnowledgeError(f"{path.name}: parameter {name} needs a value")
        out[name] = Parameter(
            name=name, value=spec["value"], unit=spec.get("unit"), source=spec.get("source"),
            note=str(spec.get("note", "")), convention=bool(spec.get("convention", False)),
        )
    return out


def _apply_overrides(parameters: dict[str, Parameter], path: Path) -> None:
    doc = _yaml(path)
    for name, value in (doc.get("parameters") or {}).items():
        if name not in parameters:
            raise KnowledgeError(f"{path}: unknown parameter {name}")
        old = parameters[name]
        if type(value) is not type(old.value) and not (
            isinstance(value, int | float) and isinstance(old.value, int | float)
        ):
            raise KnowledgeError(f"{path}: parameter {name} must be like {old.value!r}")
        parameters[name] = Parameter(name, value, old.unit, old.source,
                                     f"{old.note} (site override)".strip(), old.convention)


def _site_silent_rules(path: Path, rule_ids: list[str]) -> frozenset[str]:
    """The site file's ``silent_rules``: a list of rule ids, or ``"*"`` for every rule."""
    raw = _yaml(path).get("silent_rules")
    if raw is None:
        return frozenset()
    if raw == "*":
        return frozenset(rule_ids)
    if not isinstance(raw, list) or not all(isinstance(r, str) for r in raw):
        raise KnowledgeError(f"{path}: silent_rules is a list of rule ids, or \"*\" for all")
    unknown = [r for r in raw if r not in rule_ids]
    if unknown:
        raise KnowledgeError(f"{path}: silent_rules names rules the knowledge pack does not "
                             f"have: {', '.join(unknown)}")
    return frozenset(raw)


def _load_citations(path: Path) -> dict[str, Citation]:
    out = {}
    for cid, spec in (_yaml(path).get("citations") or {}).items():
        if not spec.get("label"):
            raise KnowledgeError(f"{path.name}: citation {cid} needs a label")
        out[cid] = Citation(cid, str(spec["label"]), spec.get("url"), spec.get("topic"))
    return out


def _load_orderables(path: Path) -> dict[str, Orderable]:
    out = {}
    for oid, spec in (_yaml(path).get("orderables") or {}).items():
        codes = tuple(
            {k: str(v) for k, v in c.items() if k in ("system", "code", "display")}
            for c in spec.get("codes") or []
        )
        if not codes or not spec.get("display"):
            raise KnowledgeError(f"{path.name}: orderable {oid} needs display and codes")
        out[oid] = Orderable(oid, str(spec["display"]), str(spec.get("kind", "imaging")), codes,
                             spec.get("modality"), bool(spec.get("ionizing", False)))
    return out


def _split_include(
    path: Path, includes: Iterable[dict[str, Any]]
) -> tuple[dict[str, frozenset[str]], dict[str, tuple[str, ...]]]:
    exact: dict[str, set[str]] = {}
    prefixes: dict[str, set[str]] = {}
    for inc in includes:
        system = inc.get("system")
        if not system:
            raise KnowledgeError(f"{path.name}: include without system")
        for concept in inc.get("concept", []):
            exact.setdefault(system, set()).add(normalize_code(system, str(concept["code"])))
        for flt in inc.get("filter", []):
            if flt.get("op") != "is-a" or flt.get("property") != "concept":
                raise KnowledgeError(f"{path.name}: only 'concept is-a' filters are supported")
            if system != ICD10CM:
                raise KnowledgeError(
                    f"{path.name}: is-a filters are read as code prefixes, which is right only "
                    f"for ICD-10-CM; list the {system} concepts instead")
            value = normalize_code(system, str(flt["value"]))
            prefixes.setdefault(system, set()).add(value)
    return (
        {s: frozenset(c) for s, c in exact.items()},
        {s: tuple(sorted(p)) for s, p in prefixes.items()},
    )


def _load_valueset(path: Path) -> ValueSet:
    doc = _json(path)
    if doc.get("resourceType") != "ValueSet":
        raise KnowledgeError(f"{path.name}: not a ValueSet")
    if doc.get("id") != path.stem:
        raise KnowledgeError(f"{path.name}: id {doc.get('id')!r} differs from the file name")
    compose = doc.get("compose") or {}
    exact, prefixes = _split_include(path, compose.get("include", []))
    ex_exact, ex_prefixes = _split_include(path, compose.get("exclude", []))
    patterns: list[re.Pattern[str]] = []
    exclusions: list[re.Pattern[str]] = []
    for ext in doc.get("extension", []):
        if ext.get("url") in (TEXT_PATTERN_URL, NAME_EXCLUSION_URL):
            try:
                compiled = re.compile(ext["valueString"], re.IGNORECASE)
            except re.error as exc:
                raise KnowledgeError(f"{path.name}: bad {ext['url'].rsplit('/', 1)[1]}: "
                                     f"{exc}") from None
            (patterns if ext["url"] == TEXT_PATTERN_URL else exclusions).append(compiled)
    if len(exclusions) > 1:
        raise KnowledgeError(f"{path.name}: one ingredient-name-exclusion-pattern at most")
    if not exact and not prefixes:
        raise KnowledgeError(f"{path.name}: the value set has no codes")
    # RxNorm ingredient concepts are named by their display ("gabapentin"); products, whose
    # displays carry strengths and forms, are not names.
    names = sorted({
        str(c["display"]).strip().lower()
        for inc in compose.get("include", []) if inc.get("system") == RXNORM
        for c in inc.get("concept", [])
        if c.get("display") and not any(ch.isdigit() for ch in str(c["display"]))
    })
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(n) for n in names) + r")\b",
                         re.IGNORECASE) if names else None
    return ValueSet(path.stem, str(doc.get("url", "")), str(doc.get("title", path.stem)),
                    exact, prefixes, ex_exact, ex_prefixes, tuple(patterns), pattern,
                    exclusions[0] if exclusions else None)


def _load_conceptmap(path: Path) -> dict[str, frozenset[str]]:
    doc = _json(path)
    mapping: dict[str, set[str]] = {}
    for group in doc.get("group", []):
        for element in group.get("element", []):
            targets = {str(t["code"]) for t in element.get("target", []) if t.get("code")}
            mapping.setdefault(str(element["code"]), set()).update(targets)
    return {k: frozenset(v) for k, v in mapping.items()}


def _load_services(folder: Path) -> list[Service]:
    out = []
    for spec in _yaml(folder / "service.yaml").get("services") or []:
        for key in ("id", "hook", "description"):
            if not spec.get(key):
                raise KnowledgeError(f"{folder.name}/service.yaml: a service lacks {key}")
        prefetch = {str(k): str(v) for k, v in (spec.get("prefetch") or {}).items()}
        required = tuple(spec.get("required") or ())
        for key in required:
            if key not in prefetch:
                raise KnowledgeError(
                    f"{folder.name}/service.yaml: required key {key} has no prefetch template")
        for key, template in prefetch.items():
            for token in PREFETCH_TOKEN.findall(template):
                if token not in ALLOWED_TOKENS:
                    raise KnowledgeError(
                        f"{folder.name}/service.yaml: prefetch {key} uses token {{{{{token}}}}}, "
                        "which CDS Hooks 2.0 does not define")
        out.append(Service(
            id=str(spec["id"]), hook=str(spec["hook"]), title=str(spec.get("title", "")),
            description=str(spec["description"]), prefetch=prefetch, required=required,
            usage_requirements=spec.get("usageRequirements"), folder=folder.name,
        ))
    return out


def _load_rules(folder: Path) -> list[RuleSpec]:
    out = []
    for spec in _yaml(folder / "rules.yaml").get("rules") or []:
        rid = spec.get("id", "?")
        for key in ("id", "title", "rationale", "sources", "hooks", "category", "indicator",
                    "when", "card"):
            if key not in spec:
                raise KnowledgeError(f"{folder.name}/rules.yaml: rule {rid} lacks {key}")
        out.append(RuleSpec(
            id=str(spec["id"]), title=str(spec["title"]), rationale=str(spec["rationale"]),
            sources=tuple(spec["sources"]), hooks=tuple(spec["hooks"]),
            category=str(spec["category"]), indicator=str(spec["indicator"]),
            when=spec["when"], card=str(spec["card"]),
            escalate=tuple((str(e["indicator"]), e["when"]) for e in spec.get("escalate") or []),
            notes=tuple((str(n["id"]), n["when"]) for n in spec.get("notes") or []),
            silent_beside=tuple(spec.get("silent_beside") or ()),
            for_each_order=spec.get("for_each_order"), folder=folder.name,
            ask=_ask_spec(spec.get("ask"), f"{folder.name}/rules.yaml rule {rid}"),
        ))
    return out


def _ask_spec(raw: Any, where: str) -> AskSpec | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - {"indicator", "when", "about", "silent_beside"}:
        raise KnowledgeError(f"{where}: ask takes indicator, when, about and silent_beside")
    about = raw.get("about")
    if not raw.get("when") or not isinstance(about, list) or not about:
        raise KnowledgeError(f"{where}: ask needs when (the known part) and a list 'about'")
    return AskSpec(str(raw.get("indicator", "info")), raw["when"], tuple(str(a) for a in about),
                   tuple(raw.get("silent_beside", ("critical",))))


INDICATORS = ("info", "warning", "critical")


def _load_problem_list(path: Path) -> dict[str, Currency]:
    """``problem-list.yaml``: how entries of each listed value set count (optional file)."""
    if not path.is_file():
        return {}
    out: dict[str, Currency] = {}
    for vs_id, entry in (_yaml(path).get("valuesets") or {}).items():
        where = f"problem-list.yaml {vs_id}"
        if not isinstance(entry, dict):
            raise KnowledgeError(f"{where}: expected a mapping")
        unknown = set(entry) - {"counts", "within_days", "ruled_out_by", "ended_by",
                                "episode_gap_days", "source", "note"}
        if unknown:
            raise KnowledgeError(f"{where}: unknown keys {sorted(unknown)}")
        counts = entry.get("counts")
        if counts not in CURRENCIES:
            raise KnowledgeError(f"{where}: counts must be one of {CURRENCIES}, not {counts!r}")
        if (counts == "recent") != ("within_days" in entry):
            raise KnowledgeError(f"{where}: within_days goes with counts: recent, and only there")
        out[str(vs_id)] = Currency(
            str(vs_id), counts, entry.get("within_days"),
            tuple(str(v) for v in entry.get("ruled_out_by") or ()),
            tuple(str(v) for v in entry.get("ended_by") or ()),
            entry.get("episode_gap_days"),
            str(entry.get("source") or ""), str(entry.get("note") or ""))
    return out


def _phrases(raw: Any, where: str) -> dict[str, Phrase]:
    out: dict[str, Phrase] = {}
    for key, entry in (raw or {}).items():
        if not isinstance(entry, dict) or not entry.get("say") or ";" in str(entry["say"]):
            raise KnowledgeError(f"{where} {key}: needs say, without ';' (it separates the "
                                 "names on a card)")
        applies = entry.get("applies") or {}
        if set(entry) - {"say", "applies"} or set(applies) - {"sex", "min_age", "max_age"}:
            raise KnowledgeError(f"{where} {key}: takes say and applies (sex, min_age, max_age)")
        if applies.get("sex") not in (None, "male", "female"):
            raise KnowledgeError(f"{where} {key}: applies.sex must be male or female")
        out[str(key)] = Phrase(str(entry["say"]), applies.get("sex"), applies.get("min_age"),
                               applies.get("max_age"))
    return out


def _load_style(path: Path) -> CardStyle:
    """``card-style.yaml`` (optional: a pack without it gets the CDS Hooks limits and words
    taken from its questionnaire and value sets)."""
    if not path.is_file():
        return CardStyle()
    raw = _yaml(path)
    budget = raw.get("budget") or {}
    default = CardStyle()
    try:
        style = CardStyle(
            summary_chars=int(budget.get("summary_chars", default.summary_chars)),
            detail_words={**default.detail_words, **(budget.get("detail_words") or {})},
            static_words={**default.static_words, **(budget.get("static_words") or {})},
            evidence_lines=int(budget.get("evidence_lines", default.evidence_lines)),
            not_checked_named=int(budget.get("not_checked_named", default.not_checked_named)),
            rules=_phrases(raw.get("rules"), "card-style.yaml rules"),
            topics=_phrases(raw.get("topics"), "card-style.yaml topics"))
    except (TypeError, ValueError) as exc:
        raise KnowledgeError(f"card-style.yaml: budget: {exc}") from None
    if not 0 < style.summary_chars <= 140:
        raise KnowledgeError("card-style.yaml: summary_chars must be 1..140 (CDS Hooks 2.0)")
    for name in ("detail_words", "static_words"):
        if set(getattr(style, name)) != set(INDICATORS):
            raise KnowledgeError(f"card-style.yaml: {name} needs info, warning and critical")
    return style


def _check_style(k: Knowledge) -> None:
    rule_ids = {r.id for r in k.rules}
    for rid in k.style.rules:
        if rid not in rule_ids:
            raise KnowledgeError(f"card-style.yaml rules: {rid} is not a rule")
    known = k.questionnaire_items() | set(k.valuesets) | {"startback"}
    for topic in k.style.topics:
        if topic not in known and not topic[:1].isupper():
            raise KnowledgeError(f"card-style.yaml topics: {topic} is neither an intake item, a "
                                 "value set, startback nor a resource type")


def _check_problem_list(k: Knowledge) -> None:
    episodes = [v for v, cur in k.problem_list.items() if cur.episode_gap_days is not None]
    if len(episodes) > 1:
        raise KnowledgeError(f"problem-list.yaml: episode_gap_days on {episodes}: one value set "
                             "defines the episode")
    for vs_id, cur in k.problem_list.items():
        where = f"problem-list.yaml {vs_id}"
        for ref in (vs_id, *cur.ruled_out_by, *cur.ended_by):
            if ref not in k.valuesets:
                raise KnowledgeError(f"{where}: unknown value set {ref!r}")
        for ref in (*cur.ruled_out_by, *cur.ended_by):
            k.valueset(ref)  # used by the condition fact
        if not cur.source or cur.source not in k.citations:
            raise KnowledgeError(f"{where}: source {cur.source!r} is not a citation")
        for name in ("within_days", "episode_gap_days"):
            value = getattr(cur, name)
            if value is None:
                continue
            days = k.param(value)
            if isinstance(days, bool) or not isinstance(days, (int, float)) or days <= 0:
                raise KnowledgeError(f"{where}: {name} must be a positive number of days")


PAMA_KEYS = {"version", "guide", "qcdsm", "also_in_extension", "services", "orders", "levels",
             "studies", "criteria", "decide", "not_rated"}
PAMA_ENTRY_KEYS = {"rule", "when", "criterion", "rating", "text", "withhold",
                   "withhold_if_record_incomplete"}


def _load_pama(path: Path) -> Pama | None:
    """``pama.yaml`` (optional file): its shape; references are checked by ``_check_pama``."""
    if not path.is_file():
        return None
    return parse_pama(_yaml(path))


def parse_pama(doc: Mapping[str, Any]) -> Pama:
    """Read a ``pama.yaml`` document.

    Raises:
        KnowledgeError: a key is unknown or missing, or a value has the wrong shape.
    """
    where = "pama.yaml"
    unknown = set(doc) - PAMA_KEYS
    if unknown:
        raise KnowledgeError(f"{where}: unknown keys {sorted(unknown)}")
    if doc.get("version") != 1:
        raise KnowledgeError(f"{where}: version must be 1")
    for key in ("guide", "qcdsm", "orders"):
        if not isinstance(doc.get(key), str) or not doc[key].strip():
            raise KnowledgeError(f"{where}: {key} must be a non-empty string")
    if not doc["guide"].startswith(("http://", "https://")):
        raise KnowledgeError(f"{where}: guide must be an http(s) URL")
    services = doc.get("services")
    if not isinstance(services, list) or not services:
        raise KnowledgeError(f"{where}: services must be a non-empty list of service ids")
    levels: dict[str, PamaLevel] = {}
    for lid, level in _mapping(doc, "levels", where).items():
        if not isinstance(level, dict) or not level.get("text") or \
                level.get("pama") not in ("appropriate", "not-appropriate"):
            raise KnowledgeError(f"{where} level {lid}: needs text, and pama appropriate or "
                                 "not-appropriate")
        levels[str(lid)] = PamaLevel(str(lid), str(level["text"]), str(level["pama"]))
    studies = []
    for study in doc.get("studies") or []:
        if not isinstance(study, dict) or not study.get("id") or not study.get("valueset"):
            raise KnowledgeError(f"{where}: each study needs id and valueset, got {study!r}")
        studies.append((str(study["id"]), str(study["valueset"])))
    if not studies or len({s for s, _ in studies}) != len(studies):
        raise KnowledgeError(f"{where}: studies must be a non-empty list of distinct ids")
    criteria: dict[str, PamaCriterion] = {}
    for cid, crit in _mapping(doc, "criteria", where).items():
        if not isinstance(crit, dict) or not crit.get("source") or not crit.get("text") or \
                not isinstance(crit.get("ratings"), dict) or not crit["ratings"]:
            raise KnowledgeError(f"{where} criterion {cid}: needs source, text and ratings")
        criteria[str(cid)] = PamaCriterion(
            str(cid), str(crit["source"]), str(crit["text"]),
            {str(k): str(v) for k, v in crit["ratings"].items()})
    decide = []
    for pos, entry in enumerate(doc.get("decide") or []):
        at = f"{where} decide[{pos}]"
        if not isinstance(entry, dict):
            raise KnowledgeError(f"{at}: expected a mapping")
        bad = set(entry) - PAMA_ENTRY_KEYS
        if bad:
            raise KnowledgeError(f"{at}: unknown keys {sorted(bad)}")
        if ("rule" in entry) == ("when" in entry):
            raise KnowledgeError(f"{at}: needs exactly one of rule and when")
        gives = [k for k in ("criterion", "rating", "withhold") if k in entry]
        if len(gives) != 1:
            raise KnowledgeError(f"{at}: needs exactly one of criterion, rating and withhold")
        if "rating" in entry and (entry["rating"] != "no-criteria-apply" or not entry.get("text")):
            raise KnowledgeError(f"{at}: rating can only be no-criteria-apply, with its text")
        if "text" in entry and "rating" not in entry:
            raise KnowledgeError(f"{at}: text goes with rating: no-criteria-apply")
        flag = entry.get("withhold_if_record_incomplete", False)
        if not isinstance(flag, bool):
            raise KnowledgeError(f"{at}: withhold_if_record_incomplete must be true or false")
        decide.append(PamaEntry(
            rule=str(entry["rule"]) if "rule" in entry else None, when=entry.get("when"),
            criterion=str(entry["criterion"]) if "criterion" in entry else None,
            rating=entry.get("rating"), text=str(entry.get("text") or ""),
            withhold=str(entry["withhold"]) if "withhold" in entry else None,
            withhold_if_record_incomplete=flag))
    if not decide:
        raise KnowledgeError(f"{where}: decide must list at least one entry")
    also = doc.get("also_in_extension", False)
    if not isinstance(also, bool):
        raise KnowledgeError(f"{where}: also_in_extension must be true or false")
    return Pama(
        guide=str(doc["guide"]), qcdsm=str(doc["qcdsm"]), also_in_extension=also,
        services=tuple(str(s) for s in services), orders=str(doc["orders"]), levels=levels,
        studies=tuple(studies), criteria=criteria, decide=tuple(decide),
        not_rated={str(k): str(v) for k, v in _mapping(doc, "not_rated", where).items()})


def _mapping(doc: Mapping[str, Any], key: str, where: str) -> Mapping[Any, Any]:
    value = doc.get(key) or {}
    if not isinstance(value, dict):
        raise KnowledgeError(f"{where}: {key} must be a mapping")
    return value


def _check_pama(k: Knowledge) -> None:
    """Every reference of ``pama.yaml`` resolves, and every rule that runs at its services'
    hooks either decides a rating or is listed in ``not_rated`` with why."""
    p = k.pama
    if p is None:
        return
    where = "pama.yaml"
    hooks: set[str] = set()
    for sid in p.services:
        served = k.services_with_id(sid)
        if not served:
            raise KnowledgeError(f"{where}: unknown service {sid!r}")
        for s in served:
            if s.hook not in PAMA_HOOKS:
                raise KnowledgeError(f"{where}: service {sid} serves {s.hook}; ratings are for "
                                     f"{' and '.join(PAMA_HOOKS)}")
            hooks.add(s.hook)
    for vs_id in (p.orders, *(vs for _, vs in p.studies)):
        try:
            k.valueset(vs_id)
        except KnowledgeError as exc:
            raise KnowledgeError(f"{where}: {exc}") from None
    studies = {s for s, _ in p.studies}
    for crit in p.criteria.values():
        at = f"{where} criterion {crit.id}"
        if crit.source not in k.citations:
            raise KnowledgeError(f"{at}: source {crit.source!r} is not in citations.yaml")
        for study, level in crit.ratings.items():
            if study not in studies:
                raise KnowledgeError(f"{at}: unknown study {study!r}")
            if level not in p.levels:
                raise KnowledgeError(f"{at}: unknown level {level!r}")
    rules = {r.id: r for r in k.rules}
    deciding = set()
    for pos, entry in enumerate(p.decide):
        at = f"{where} decide[{pos}]"
        if entry.criterion is not None and entry.criterion not in p.criteria:
            raise KnowledgeError(f"{at}: unknown criterion {entry.criterion!r}")
        if entry.rule is not None:
            rid, _, state = entry.rule.partition("/")
            rule = rules.get(rid)
            if rule is None or state not in ("", "ask") or (state and rule.ask is None):
                raise KnowledgeError(f"{at}: unknown rule {entry.rule!r} (a rule id, or "
                                     "RULE/ask for a rule with an ask state)")
            if not hooks <= set(rule.hooks):
                raise KnowledgeError(f"{at}: rule {entry.rule} does not run at every hook of "
                                     f"{', '.join(p.services)}; name it in a when tree")
            deciding.add(entry.rule)
    for rid in p.not_rated:
        if rid.partition("/")[0] not in rules:
            raise KnowledgeError(f"{where} not_rated: unknown rule {rid!r}")
        if rid in deciding:
            raise KnowledgeError(f"{where} not_rated: {rid} also decides a rating")
    running = [r.id for r in k.rules if set(r.hooks) & hooks]
    running += [f"{r.id}/ask" for r in k.rules if set(r.hooks) & hooks and r.ask is not None]
    missing = [rid for rid in running if rid not in deciding and rid not in p.not_rated]
    if missing:
        raise KnowledgeError(f"{where}: rules {', '.join(missing)} run at "
                             f"{', '.join(sorted(hooks))} but neither decide a rating nor are "
                             "listed in not_rated")


def _cross_check(k: Knowledge) -> None:
    _check_problem_list(k)
    _check_style(k)
    _check_pama(k)
    seen: set[str] = set()
    for rule in k.rules:
        where = f"{rule.folder}/rules.yaml rule {rule.id}"
        if rule.id in seen:
            raise KnowledgeError(f"{where}: duplicate rule id")
        seen.add(rule.id)
        if rule.card not in k.cards:
            raise KnowledgeError(f"{where}: card {rule.card} is not defined")
        for source in rule.sources:
            if source not in k.citations:
                raise KnowledgeError(f"{where}: source {source} is not in citations.yaml")
        asked = (rule.ask.indicator, *rule.ask.silent_beside) if rule.ask else ()
        for indicator in (rule.indicator, *[i for i, _ in rule.escalate], *rule.silent_beside,
                          *asked):
            if indicator not in INDICATORS:
                raise KnowledgeError(f"{where}: indicator {indicator!r} is not one of {INDICATORS}")
        if rule.ask:
            known = set(k.questionnaire_items()) | set(k.valuesets)
            for topic in rule.ask.about:
                if topic not in known:
                    raise KnowledgeError(f"{where}: ask about {topic!r}: neither an intake item "
                                         "nor a value set")
            if not isinstance(k.cards[rule.card].get("ask"), dict):
                raise KnowledgeError(f"{where}: has an ask state but card {rule.card} has no "
                                     "ask text")
        if rule.for_each_order:
            k.valueset(rule.for_each_order)
        card = k.cards[rule.card]
        for note_id, _ in rule.notes:
            if note_id not in (card.get("notes") or {}):
                raise KnowledgeError(f"{where}: note {note_id} has no text in card {rule.card}")
    for card_id, card in k.cards.items():
        _check_card(k, card_id, card)
    hooks_served = {s.hook for s in k.services}
    for rule in k.rules:
        if not set(rule.hooks) & hooks_served:
            raise KnowledgeError(f"rule {rule.id}: no service serves its hooks {rule.hooks}")


def ask_card(card: dict[str, Any]) -> dict[str, Any]:
    """The card of a rule's ask state: its ``ask`` block over the rest (the firing card's
    suggestions and escalated summaries do not carry over; its notes do)."""
    base = {key: v for key, v in card.items()
            if key not in ("ask", "summary_by_indicator", "suggestions", "selectionBehavior")}
    return {**base, **card["ask"]}


def _check_card(k: Knowledge, card_id: str, card: dict[str, Any]) -> None:
    if isinstance(card.get("ask"), dict):
        _check_card(k, f"{card_id} (ask)", ask_card(card))
    where = f"card {card_id}"
    summaries = [card.get("summary", ""), *(card.get("summary_by_indicator") or {}).values()]
    for summary in summaries:
        if not summary or len(summary) >= 140:
            raise KnowledgeError(f"{where}: summary must be 1 to 139 characters: {summary!r}")
    if card.get("source") not in k.citations:
        raise KnowledgeError(f"{where}: source {card.get('source')!r} is not a citation")
    suggestions = card.get("suggestions") or []
    if suggestions and card.get("selectionBehavior") not in ("at-most-one", "any"):
        raise KnowledgeError(f"{where}: suggestions need selectionBehavior at-most-one or any")
    if card.get("selectionBehavior") == "at-most-one" and sum(
        1 for s in suggestions if s.get("isRecommended")
    ) > 1:
        raise KnowledgeError(f"{where}: at most one suggestion may be recommended")
    for suggestion in suggestions:
        if not suggestion.get("label"):
            raise KnowledgeError(f"{where}: a suggestion lacks a label")
        for key in ("when_order", "unless_order"):
            if key in suggestion and suggestion[key] not in k.valuesets:
                raise KnowledgeError(f"{where}: suggestion {suggestion['label']!r} {key} "
                                     f"{suggestion[key]!r} is not a value set")
            if key in suggestion:
                k.valueset(suggestion[key])
        for key in ("when_note", "unless_note"):
            if key in suggestion and suggestion[key] not in (card.get("notes") or {}):
                raise KnowledgeError(f"{where}: suggestion {suggestion['label']!r} {key} "
                                     f"{suggestion[key]!r} is not one of the card's notes")
        for action in suggestion.get("actions") or []:
            kind = action.get("type")
            if kind not in ("create", "update", "delete") or not action.get("description"):
                raise KnowledgeError(f"{where}: action needs type and description: {action}")
            if kind == "create" and action.get("orderable") not in k.orderables:
                raise KnowledgeError(f"{where}: unknown orderable {action.get('orderable')!r}")
            if kind == "update" and action.get("orderable") not in k.orderables:
                raise KnowledgeError(f"{where}: update needs a known orderable")
            if kind in ("update", "delete") and action.get("target") != "judged-order":
                raise KnowledgeError(f"{where}: {kind} must target judged-order")
            if action.get("priority", "routine") not in ("routine", "urgent", "asap", "stat"):
                raise KnowledgeError(f"{where}: bad priority {action.get('priority')!r}")
    for reason in card.get("overrideReasons") or []:
        if reason not in k.override_reasons:
            raise KnowledgeError(f"{where}: unknown override reason {reason!r}")
    for link in card.get("links") or []:
        if "citation" in link:
            if link["citation"] not in k.citations:
                raise KnowledgeError(f"{where}: link to unknown citation {link['citation']!r}")
        elif not (link.get("label") and str(link.get("url", "")).startswith("http")):
            raise KnowledgeError(f"{where}: a link needs a label and an absolute url")
