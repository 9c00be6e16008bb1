"""Quality gates: ``--min-quality "nr_luminance_clean >= 40 and nr_laplacian_var_clean > 20"``.

A rule is a conjunction of ``column op number`` terms over output columns. It is parsed and
checked against the schema before any work starts; the pipeline's QualityGate stage
(:mod:`fundus_batch.stages`) gives each row ``quality_ok`` and, when it fails,
``quality_failed`` naming the terms it broke ("clean my archive"). A plain library: no stages.

A degradation parameter of an operator that did not run (null: ``blur_sigma`` of a 001 variant)
counts as the operator's neutral value (:data:`NEUTRAL_PARAMETERS`); any other missing or NaN
value (a metric that could not be measured) breaks its term. A rule's canonical form
(:attr:`QualityRule.canonical`: its terms sorted and joined by `` and ``, one space each side
of the operator, each number in one spelling) is what a folder records and compares, so spacing,
the case of ``and``, the order of the terms and how a number is written do not matter.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, SupportsFloat

from fundus_batch.schema import NOREF_NAMES

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
}
# What a degradation parameter column means when its operator did not run (the row holds null):
# no blur, no spots, no hole, and colour factors of 1.
NEUTRAL_PARAMETERS: dict[str, float] = {
    "blur_sigma": 0.0,
    "n_spots": 0.0,
    "hole_strength": 0.0,
    "brightness": 1.0,
    "contrast": 1.0,
    "saturation": 1.0,
}

MS_SSIM_MIN_SIZE = 288
"""The smallest working size (sizes are multiples of 32) at which ``ms_ssim_*`` can have a
value: its fifth scale (1/16 of the image) must keep some FOV after erosion by the 5 px SSIM
window radius (:mod:`fundus_batch.metrics.reference`), which takes a FOV of about 270 px; at 256
and below every row's MS-SSIM is NaN."""

_TERM = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|==|!=|<|>)\s*([-+0-9.eE]+)\s*$")


class QualityRuleError(ValueError):
    """A rule that cannot be parsed or names an unknown column."""


@dataclass(frozen=True)
class Term:
    column: str
    op: str
    value: float
    written: str = ""  # the number as the rule spells it

    def holds(self, actual: SupportsFloat | None) -> bool:
        """Whether ``actual`` meets the term; a missing or non-numeric value does not."""
        if actual is None or (isinstance(actual, float) and math.isnan(actual)):
            return False
        try:
            return _OPS[self.op](float(actual), self.value)
        except (TypeError, ValueError):
            return False

    def __str__(self) -> str:
        return f"{self.column} {self.op} {self.written or repr(self.value)}"


def _number(value: float) -> str:
    """``value`` in its shortest spelling that reads back as the same float."""
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def _gate_value(row: dict, column: str) -> Any:
    """The value a term tests: a null degradation parameter is its operator's neutral value."""
    value = row.get(column)
    if value is None:
        return NEUTRAL_PARAMETERS.get(column)
    return value


@dataclass(frozen=True)
class QualityRule:
    """A parsed rule; ``evaluate(row)`` returns (ok, failed terms)."""

    terms: tuple[Term, ...]

    @property
    def columns(self) -> set[str]:
        return {t.column for t in self.terms}

    @property
    def canonical(self) -> str:
        """The rule as recorded and compared: its terms in sorted order, each number in one
        spelling (``0.50`` and ``.5`` are ``0.5``, ``40.0`` is ``40``), joined by `` and ``."""
        terms = sorted({(t.column, t.op, t.value) for t in self.terms})
        return " and ".join(f"{column} {op} {_number(value)}" for column, op, value in terms)

    def evaluate(self, row: dict) -> tuple[bool, list[str]]:
        """(whether every term holds, the broken terms); see :data:`NEUTRAL_PARAMETERS`."""
        broken = [str(t) for t in self.terms if not t.holds(_gate_value(row, t.column))]
        return not broken, broken


def parse_rule(text: str, known_columns: set[str] | None = None) -> QualityRule:
    """Parse ``"a >= 1 and b < 2"``; unknown columns are rejected when ``known_columns`` given."""
    # Runs of whitespace (any Unicode space) become one space first: splitting on a literal
    # " and " cannot backtrack, however long the runs are.
    parts = re.split(" and ", " ".join(text.split()), flags=re.IGNORECASE)
    terms = []
    for part in parts:
        match = _TERM.match(part)
        if not match:
            raise QualityRuleError(
                f"cannot parse quality term {part!r}: use 'column op number' joined by 'and', "
                "op one of < <= > >= == !="
            )
        column, op, raw = match.groups()
        try:
            value = float(raw)
        except ValueError:
            raise QualityRuleError(f"{raw!r} in {part!r} is not a number") from None
        if known_columns is not None and column not in known_columns:
            raise QualityRuleError(f"unknown column {column!r} in quality rule")
        terms.append(Term(column, op, value, raw))
    return QualityRule(tuple(terms))


def canonical_rule(text: str) -> str:
    """The canonical form of a rule's text (:attr:`QualityRule.canonical`)."""
    return parse_rule(text).canonical


@dataclass
class GateCounts:
    """How a run's ok rows fared at its quality gate: ``passed`` of ``judged`` (the ok rows
    with a verdict), and the rows that broke each term."""

    passed: int = 0
    judged: int = 0
    broken: dict[str, int] = field(default_factory=dict)

    def add(self, verdicts: Iterable[bool | None], failed: Iterable[str | None]) -> None:
        """Count ok rows by their ``quality_ok`` and the ``quality_failed`` terms they broke."""
        for ok, terms in zip(verdicts, failed, strict=True):
            if ok is None:
                continue
            self.judged += 1
            self.passed += bool(ok)
            for term in (terms or "").split("; "):
                if term:
                    self.broken[term] = self.broken.get(term, 0) + 1

    def top(self, n: int) -> list[tuple[str, int]]:
        """The ``n`` terms the most rows broke, with how many (ties: by name)."""
        return sorted(self.broken.items(), key=lambda item: (-item[1], item[0]))[:n]

    @property
    def most_broken(self) -> tuple[str, int] | None:
        """The term the most rows broke and how many (ties: the first by name); None if none."""
        top = self.top(1)
        return top[0] if top else None

    def line(self) -> str:
        """``quality gate: N of M ok rows passed (most broken: TERM, K rows)``."""
        text = f"quality gate: {self.passed} of {self.judged} ok rows passed"
        most = self.most_broken
        if most is not None:
            term, rows = most
            text += f" (most broken: {term}, {rows} row{'' if rows == 1 else 's'})"
        return text


def gate_columns(*, pairs: bool, enhanced: bool, metrics: bool) -> frozenset[str]:
    """The numeric columns a run has filled when its quality gate runs: the ones a rule may
    name (``pairs``: degradation runs; ``enhanced``: enhancement on; ``metrics``: metrics on)."""
    roles = ["clean", *(["degraded"] if pairs else []), *(["enhanced"] if enhanced else [])]
    names = {"source_width", "source_height", "fov_cx", "fov_cy", "fov_r", "size"}
    names |= {"seconds_fetch", "seconds_preprocess"}
    if pairs:
        names |= {"variant", "seed", "blur_sigma", "n_spots", "hole_strength", "brightness"}
        names |= {"contrast", "saturation", "seconds_degrade"}
    if enhanced:
        names |= {"enhance_change", "seconds_enhance"}
    if metrics:
        names.add("seconds_score")
        for role in roles:
            names |= {f"{stem}_{role}" for stem in NOREF_NAMES}
            names |= {f"vessel_{m}_{role}" for m in ("auc", "f1")}
            if pairs and role != "clean":  # full-reference: against the clean photograph
                names |= {f"{m}_{role}" for m in ("psnr", "ssim", "ms_ssim")}
    return frozenset(names)
