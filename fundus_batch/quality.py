"""Quality gates: ``--min-quality "nr_luminance_clean >= 40 and nr_laplacian_var_clean > 20"``.

A rule is a conjunction of ``column op number`` terms over output columns. It is parsed and
checked against the schema before any work starts; the pipeline's QualityGate stage
(:mod:`fundus_batch.stages`) gives each row ``quality_ok`` and, when it fails,
``quality_failed`` naming the terms it broke ("clean my archive"). A plain library: no stages.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import SupportsFloat

from fundus_batch.schema import NOREF_NAMES

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
}
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


@dataclass(frozen=True)
class QualityRule:
    """A parsed rule; ``evaluate(row)`` returns (ok, failed terms)."""

    terms: tuple[Term, ...]

    @property
    def columns(self) -> set[str]:
        return {t.column for t in self.terms}

    def evaluate(self, row: dict) -> tuple[bool, list[str]]:
        broken = [str(t) for t in self.terms if not t.holds(row.get(t.column))]
        return not broken, broken


def parse_rule(text: str, known_columns: set[str] | None = None) -> QualityRule:
    """Parse ``"a >= 1 and b < 2"``; unknown columns are rejected when ``known_columns`` given."""
    parts = re.split(r"\s+and\s+", text.strip(), flags=re.IGNORECASE)
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
