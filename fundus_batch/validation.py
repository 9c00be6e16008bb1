"""The one validation style: pydantic models, and one error format that names the field.

Every validated structure (the run config, presets, the training config, the weights
registry, the training job's YAML) is a pydantic model; the degradation records are stdlib
dataclasses whose annotated fields pydantic validates through a ``TypeAdapter``. A
:class:`pydantic.ValidationError` becomes the caller's own error class through
:func:`field_problems` / :func:`format_problems`, one line per problem::

    field.path: problem (got value)

List positions are written ``spots[1].radius``. This module imports only pydantic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple, TypeVar

from pydantic import AllowInfNan, BaseModel, BeforeValidator, Strict, ValidationError

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

__all__ = [
    "FieldProblem",
    "Finite",
    "Int",
    "Model",
    "field_path",
    "field_problems",
    "first_and_rest",
    "format_problems",
    "length",
    "validate",
]

ModelT = TypeVar("ModelT", bound=BaseModel)

Int = Annotated[int, Strict()]
"""An integer; booleans, floats and numeric strings are refused."""

Finite = Annotated[float, Strict(), AllowInfNan(False)]
"""A finite number (an int is accepted and stored as float); booleans and strings are refused."""

_MAX_SHOWN = 80


class FieldProblem(NamedTuple):
    """One problem: the dotted path of the field and what is wrong with it."""

    field: str
    problem: str

    def __str__(self) -> str:
        return f"{self.field}: {self.problem}"


def field_path(loc: Sequence[int | str], root: str = "") -> str:
    """``("spots", 1, "radius")`` -> ``spots[1].radius`` (under ``root`` when given)."""
    path = root
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path = f"{path}.{part}" if path else str(part)
    return path or "<root>"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def field_problems(exc: ValidationError, root: str = "") -> list[FieldProblem]:
    """The problems of a pydantic error, each naming its field and the value it got (not for a
    rule of the whole model, whose input is all of it)."""
    out = []
    for err in exc.errors():
        message = err["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            message = message.removeprefix(prefix)
        loc = err["loc"]
        if loc and loc[-1] == "[key]":  # pydantic's marker for a bad mapping key
            loc, message = loc[:-1], f"bad key: {message}"
        if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):  # model, dataclass
            message = "unknown field"
        if err["type"] in ("model_type", "model_attributes_type", "dict_type", "dataclass_type"):
            message = f"expected an object (got {type(err['input']).__name__})"
        elif err["type"] != "missing" and "input" in err and loc:  # a model's rule: not all
            message += f" (got {_shown(err['input'])})"
        out.append(FieldProblem(field_path(loc, root), message))
    return out


def format_problems(problems: Sequence[FieldProblem], sep: str = "; ") -> str:
    """``field: problem`` for each problem, joined by ``sep``."""
    return sep.join(str(p) for p in problems)


def validate(
    model: type[ModelT],
    data: Any,
    error: Callable[[list[FieldProblem]], Exception],
    root: str = "",
    context: dict[str, Any] | None = None,
) -> ModelT:
    """``model.model_validate(data)``; a ValidationError becomes ``error(problems)``."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise error(field_problems(exc, root)) from None


def length(n: int, what: str) -> BeforeValidator:
    """A before-validator: a list or tuple of ``n`` items (``what`` describes it)."""

    def check(value: Any) -> Any:
        if not isinstance(value, (list, tuple)) or len(value) != n:
            raise ValueError(f"expected {what}")
        return value

    return BeforeValidator(check)


def first_and_rest(problems: Sequence[FieldProblem]) -> tuple[str, str]:
    """(the first problem's field, its problem followed by every other ``field: problem``).

    For error classes built as ``Error(field, message)`` whose text is ``field: message``.
    """
    if not problems:
        return "<root>", "invalid"
    first, *rest = problems
    return first.field, "; ".join([first.problem, *(str(p) for p in rest)])


class Model(BaseModel):
    """A validated structure whose errors are the project's own error class.

    Subclasses override :meth:`error`; building (``Cls(**fields)``, :meth:`parse`) and, where
    ``validate_assignment`` is on, assigning raise it instead of pydantic's ValidationError.
    Such a model is not meant to be nested inside another model.
    """

    @classmethod
    def error(cls, problems: list[FieldProblem]) -> Exception:
        """The exception for ``problems`` (override: ConfigError, TrainError, ...)."""
        return ValueError(format_problems(problems))

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise type(self).error(field_problems(exc)) from None

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise type(self).error(field_problems(exc)) from None

    @classmethod
    def parse(cls, data: Any) -> Self:
        """Validate a mapping of field values into this model, raising :meth:`error`'s exception.

        (Not ``model_validate``: with a custom ``__init__`` pydantic would wrap our error.)
        """
        if not isinstance(data, Mapping) or not all(isinstance(k, str) for k in data):
            got = type(data).__name__
            raise cls.error([FieldProblem("<root>", f"expected an object (got {got})")])
        return cls(**data)
