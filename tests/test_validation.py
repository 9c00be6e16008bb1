"""The shared validation helpers: one error format, ``field.path: problem (got value)``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import pytest
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from fundus_batch.validation import (
    FieldProblem,
    Finite,
    Int,
    Model,
    field_path,
    field_problems,
    first_and_rest,
    format_problems,
    length,
    validate,
)


class _Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    radius: Int
    center: Annotated[tuple[Int, Int], length(2, "[x, y]")]


class _Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sigma: Annotated[Finite, Field(ge=0.0)]
    spots: list[_Inner] = []
    weights: dict[str, Finite] = {}


class _Failure(ValueError):
    pass


class _Counted(Model):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    count: Annotated[Int, Field(ge=1)] = 1

    @classmethod
    def error(cls, problems: list[FieldProblem]) -> _Failure:
        return _Failure(format_problems(problems))


def _problems(data: object, root: str = "") -> list[FieldProblem]:
    with pytest.raises(ValidationError) as info:
        _Outer.model_validate(data)
    return field_problems(info.value, root)


def test_paths_write_list_positions_in_brackets_under_an_optional_root() -> None:
    assert field_path(("spots", 1, "radius")) == "spots[1].radius"
    assert field_path(("params", "spots", 0), "released") == "released.params.spots[0]"
    assert field_path(()) == "<root>"


def test_each_problem_names_its_field_and_the_value_it_got() -> None:
    data = {"sigma": -1, "spots": [{"radius": 1, "center": [0, 0]}, {"radius": 2.5, "center": [1]}]}
    problems = _problems(data)
    assert [p.field for p in problems] == ["sigma", "spots[1].radius", "spots[1].center"]
    assert str(problems[0]) == "sigma: Input should be greater than or equal to 0 (got -1)"
    assert str(problems[2]) == "spots[1].center: expected [x, y] (got [1])"


def test_unknown_missing_and_non_object_inputs_read_plainly() -> None:
    problems = _problems({"sgima": 1.0})
    assert [str(p) for p in problems] == ["sigma: Field required", "sgima: unknown field (got 1.0)"]
    assert [str(p) for p in _problems([1, 2])] == ["<root>: expected an object (got list)"]


def test_a_stdlib_dataclass_validated_by_pydantic_reads_like_a_model() -> None:
    @dataclass(frozen=True)
    class Spot:
        __pydantic_config__ = ConfigDict(extra="forbid")
        radius: Int

    adapter = TypeAdapter(list[Spot])
    with pytest.raises(ValidationError) as info:
        adapter.validate_python([{"radius": 1, "raduis": 2}, 3])
    assert [str(p) for p in field_problems(info.value, "spots")] == [
        "spots[0].raduis: unknown field (got 2)",
        "spots[1]: expected an object (got int)",
    ]


def test_a_bad_mapping_key_names_the_mapping_entry() -> None:
    class Keys(BaseModel):
        bounds: dict[Int, Finite]

    with pytest.raises(ValidationError) as info:
        Keys.model_validate({"bounds": {"a": 1.0}})
    (problem,) = field_problems(info.value)
    assert problem.field == "bounds.a" and problem.problem.startswith("bad key: ")


def test_finite_refuses_nan_booleans_and_numeric_strings() -> None:
    for bad in (float("nan"), float("inf"), True, "1.5"):
        assert _problems({"sigma": bad})[0].field == "sigma"


def test_validate_turns_errors_into_the_callers_class() -> None:
    with pytest.raises(_Failure, match=r"^spots\[0\]\.radius: Field required$"):
        validate(_Outer, {"sigma": 1, "spots": [{"center": [0, 0]}]}, _failure)
    assert validate(_Outer, {"sigma": 1}, _failure).sigma == 1.0


def _failure(problems: list[FieldProblem]) -> _Failure:
    return _Failure(format_problems(problems))


def test_first_and_rest_puts_the_first_field_first_and_lists_the_others() -> None:
    problems = [FieldProblem("a", "bad"), FieldProblem("b.c", "worse")]
    assert first_and_rest(problems) == ("a", "bad; b.c: worse")


def test_a_model_raises_its_own_error_on_build_parse_and_assignment() -> None:
    with pytest.raises(_Failure) as info:
        _Counted(count=0)
    assert str(info.value) == "count: Input should be greater than or equal to 1 (got 0)"
    with pytest.raises(_Failure, match=r"^cuont: unknown field"):
        _Counted.parse({"cuont": 2})
    with pytest.raises(_Failure, match="expected an object"):
        _Counted.parse(["count", 2])
    counted = _Counted.parse({"count": 2})
    with pytest.raises(_Failure, match=r"^count: "):
        counted.count = -1
    assert counted.count == 2
