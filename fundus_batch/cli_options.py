"""Click options generated from the fields of :class:`RunConfig`, so that each setting is
declared once (in config.py) with its type, help text, default and choices; and
``--storage-options``, the fsspec options the commands outside RunConfig take as JSON."""

from __future__ import annotations

import functools
import json
import types
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import annotated_types
import click
from click.core import ParameterSource
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from fundus_batch.config import RunConfig
from fundus_batch.degrade import PRESETS, TYPE_CODES

F = TypeVar("F", bound=Callable[..., Any])

# Option names that differ from the field's own (kept from earlier releases).
FLAG_NAMES: dict[str, str] = {
    "image_format": "--format",
    "ray.address": "--address",
    "lease.wait": "--wait-for-lease",
    "enhance.enabled": "--enhance",
}

# Fields whose annotation is a plain string, but whose valid values come from a registry.
CHOICES: dict[str, Sequence[str]] = {
    "preset": sorted(PRESETS),
    "types": TYPE_CODES,
}


class ConfigOption(click.Option):
    """A click option that sets one :class:`RunConfig` field (``field``: its dotted path)."""

    def __init__(self, *args: Any, field: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.field = field


def field_info(path: str) -> FieldInfo:
    """The pydantic field at a dotted path such as ``enhance.weights``."""
    model: type[BaseModel] = RunConfig
    *parents, name = path.split(".")
    for part in parents:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            raise KeyError(f"{part!r} in {path!r} is not a config section")
        model = annotation
    if name not in model.model_fields:
        raise KeyError(f"RunConfig has no field {path!r}")
    return model.model_fields[name]


def flag_name(path: str) -> str:
    """The option of a field: ``--`` and its last name with dashes, unless renamed."""
    return FLAG_NAMES.get(path, "--" + path.rsplit(".", 1)[-1].replace("_", "-"))


def model_default(path: str) -> Any:
    """The field's default as the model declares it (``None`` for a required field)."""
    info = field_info(path)
    return None if info.is_required() else info.get_default(call_default_factory=True)


def _base_annotation(annotation: Any) -> Any:
    """``X`` from ``X | None``."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _number(value: Any) -> str:
    """``2**63`` rather than its 19 digits."""
    if isinstance(value, int) and value >= 2**32 and value & (value - 1) == 0:
        return f"2**{value.bit_length() - 1}"
    return str(value)


def _bounds(info: FieldInfo) -> str:
    """The field's numeric limits as text, e.g. ``1<=x<=1000``."""
    low = high = ""
    for item in info.metadata:
        if isinstance(item, annotated_types.Ge):
            low = f"{_number(item.ge)}<="
        elif isinstance(item, annotated_types.Gt):
            low = f"{_number(item.gt)}<"
        elif isinstance(item, annotated_types.Le):
            high = f"<={_number(item.le)}"
        elif isinstance(item, annotated_types.Lt):
            high = f"<{_number(item.lt)}"
    return f"{low}x{high}" if low or high else ""


def _option_kwargs(path: str, required: bool, defaults_from: str | None = None) -> dict[str, Any]:
    """click.option arguments for one field: type, help, default and choices from the model;
    with ``defaults_from`` (a config file's metavar) the help says the file's value applies."""
    info = field_info(path)
    base = _base_annotation(info.annotation)
    default = model_default(path)
    help_text = info.description or ""
    kwargs: dict[str, Any] = {"required": required, "show_default": not required}
    if get_origin(base) is Literal:
        kwargs["type"] = click.Choice([str(a) for a in get_args(base)])
    elif path in CHOICES and base is str:
        kwargs["type"] = click.Choice(list(CHOICES[path]))
    elif base is bool:
        kwargs["is_flag"] = True
    elif base in (int, float):
        kwargs["type"] = click.INT if base is int else click.FLOAT
        limits = _bounds(info)
        help_text += f" [{limits}]" if limits else ""
    elif get_origin(base) is list:
        kwargs["type"] = click.STRING
        default = ",".join(default)
        if path in CHOICES:
            help_text += f"; codes: {', '.join(CHOICES[path])}"
    elif base is str:
        kwargs["type"] = click.STRING
    else:
        raise TypeError(f"no command-line form for {path} ({info.annotation})")
    kwargs["help"] = help_text
    if not required:
        kwargs["default"] = default
        if defaults_from is not None:
            unset = default is None or default is False or default == ""
            shown = "" if unset else f", else {default}"
            kwargs["show_default"] = f"from {defaults_from}{shown}"
    return kwargs


def config_option(
    path: str, *, required: bool = False, defaults_from: str | None = None
) -> Callable[[F], F]:
    """One option for the field at ``path``; its value reaches the command only when given."""
    if path.count(".") > 1:
        raise ValueError(f"config sections nest one level: {path!r}")
    name = path.replace(".", "__")
    kwargs = _option_kwargs(path, required, defaults_from)
    return click.option(flag_name(path), name, cls=ConfigOption, field=path, **kwargs)


def config_options(
    *paths: str, required: Sequence[str] = (), defaults_from: str | None = None
) -> Callable[[F], F]:
    """Options for the given RunConfig fields (dotted paths for sections, e.g.
    ``enhance.weights``). The command receives ``overrides``: the dotted paths the user gave
    on the command line with their values; the others keep the config's (or the model's).
    ``defaults_from`` names the command's config file argument (``CONFIG``) when its values,
    not the model's defaults, apply to the options not given: the help then says so."""
    unknown = set(required) - set(paths)
    if unknown:
        raise ValueError(f"required fields not among the options: {sorted(unknown)}")
    names = {path.replace(".", "__"): path for path in paths}

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            ctx = click.get_current_context()
            overrides: dict[str, Any] = {}
            for name, path in names.items():
                value = kwargs.pop(name)
                if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None):
                    overrides[path] = value
            return command(*args, overrides=overrides, **kwargs)

        decorated: Any = wrapper
        for path in reversed(paths):
            option = config_option(path, required=path in required, defaults_from=defaults_from)
            decorated = option(decorated)
        return decorated

    return decorate


_JSON_KINDS: dict[type, str] = {list: "an array", str: "a string", bool: "a boolean"}


class JsonObject(click.ParamType):
    """A JSON object given as text; empty text means none. The text itself is never echoed
    back (storage options hold credentials)."""

    name = "json"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> dict[str, Any] | None:
        if isinstance(value, dict):
            return value
        if not value:
            return None
        try:
            data = json.loads(value)
        except json.JSONDecodeError as exc:
            self.fail(f"not valid JSON ({exc})", param, ctx)
        if not isinstance(data, dict):
            kind = "null" if data is None else _JSON_KINDS.get(type(data), "a number")
            self.fail(f'must be a JSON object such as {{"anon": true}}, not {kind}', param, ctx)
        return data


def storage_options_option(help_text: str) -> Callable[[F], F]:
    """``--storage-options JSON``: fsspec options, parsed and checked to be a JSON object."""
    return click.option("--storage-options", type=JsonObject(), default=None, help=help_text)
