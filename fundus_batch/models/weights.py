"""Checkpoint loading for Cofe-Net models, and a local registry of known weight files.

Files are read with ``torch.load(weights_only=True)``: a pickle that would run code is refused.
Nothing is ever downloaded. Registry entries come from the package's ``weights/registry.json``
and from every ``*.json`` file in the folder(s) named by the ``FUNDUS_BATCH_WEIGHTS`` environment
variable (``os.pathsep``-separated).

A registry JSON file holds ``{"weights": [entry, ...]}``, a bare list of entries, or one entry
object; each entry has the fields of ``WeightsEntry`` (``file`` is relative to the JSON's folder).
Entries from ``FUNDUS_BATCH_WEIGHTS`` take precedence over the package's entries of the same name.

A bare state dict does not say whether its model adds its output to the input (``residual``)
nor whether it has the smooth-correction head (``field_size``, which has no parameters, its dead
zone, ...). :func:`save_weights` writes ``{"state_dict": ..., "format": ..., setting: value, ...}``
with every setting of :data:`BUILD_SETTINGS`, which the loaders read, so that a checkpoint file
alone builds the model it was trained as. Files of format ``fundus-batch-weights-1`` carry only
``residual`` and still load. :func:`model_from_weights` refuses a checkpoint of a width < 1 model
that does not say what it is (it could be a head model: built without the head, it would ruin
images); the registry entry, when there is one, must agree with what the file records.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, create_model
from torch import Tensor, nn

from fundus_batch.io.storage import write_local_files
from fundus_batch.models.cofenet import (
    VARIANTS,
    CofeNet,
    build_cofenet,
    canonical_variant,
)
from fundus_batch.validation import FieldProblem, Finite, Int, Model, format_problems, validate

__all__ = [
    "BUILD_SETTINGS",
    "ENV_VAR",
    "PACKAGE_REGISTRY",
    "PACKAGE_WEIGHTS_DIR",
    "WeightsEntry",
    "WeightsError",
    "build_settings",
    "detect_architecture",
    "file_sha256",
    "list_weights",
    "load_registered",
    "load_weights",
    "model_for_entry",
    "model_from_weights",
    "read_state_dict",
    "registry_files",
    "resolve_weights",
    "save_torch",
    "save_weights",
]

ENV_VAR = "FUNDUS_BATCH_WEIGHTS"
PACKAGE_WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
PACKAGE_REGISTRY = PACKAGE_WEIGHTS_DIR / "registry.json"
_WRAPPER_KEYS = ("state_dict", "model")
_PREFIX = "module."
_SHOW = 5
WEIGHTS_FORMAT = "fundus-batch-weights-2"  # the "format" that save_weights writes
_FORMAT_1 = "fundus-batch-weights-1"  # residual only: still read
_FORMAT_PREFIX = "fundus-batch-weights-"
# A registry entry's build settings beyond variant and width (WeightsEntry field names): what a
# state dict's keys cannot show. save_weights records them all; model_for_entry builds with them.
BUILD_SETTINGS = (
    "residual",
    "field_size",
    "field_deadzone",
    "field_gate",
    "field_gate_threshold",
    "spot_head",
    "spot_deadzone",
)
_BUILD_ARGS = {"field_size": "field"}  # build_cofenet's argument, where its name differs

StateDict = Mapping[str, Tensor]
ModelT = TypeVar("ModelT", bound=nn.Module)
Source = str | os.PathLike[str] | Mapping[str, Any]


class WeightsError(ValueError):
    """A weights file is missing, unsafe, corrupt, or does not fit the model."""


# ---------------------------------------------------------------------------- reading files


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read(path: Path, map_location: Any) -> Any:
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols first
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"{path} is not a plain state dict ({_refusal_reason(str(exc))}); it may hold "
            "pickled objects that would run code when loaded, so it will not be loaded"
        ) from exc
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise WeightsError(f"cannot read weights file {path}: {type(exc).__name__}: {exc}") from exc


def _refusal_reason(message: str) -> str:
    """The safe unpickler's reason, without torch's advice to retry with weights_only=False."""
    found = re.search(r"GLOBAL (\S+)", message)
    if found:
        return f"it references {found.group(1)}"
    found = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:Check the documentation|$)", message)
    return (
        f"the safe loader rejected it: {found.group(1)}" if found else "the safe loader rejected it"
    )


def _unwrap(obj: Any, origin: str) -> dict[str, Tensor]:
    """The tensor mapping inside ``obj``: a plain state dict or a {"state_dict"|"model": ...}."""
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{origin} holds a {type(obj).__name__}, not a state dict")
    for _ in range(3):
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            break
        inner = next(
            (obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None
        )
        if inner is None:
            break
        obj = inner
    if not obj:
        raise WeightsError(f"{origin} holds an empty state dict")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise WeightsError(
            f"{origin} is not a state dict of tensors: {len(bad)} non-tensor entries, "
            f"e.g. {bad[:_SHOW]}"
        )
    out: dict[str, Tensor] = {}
    for key, value in obj.items():
        name = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
        if name in out:
            raise WeightsError(f"{origin} has key {name!r} both with and without 'module.'")
        out[name] = value
    return out


def _recorded_settings(obj: Any, origin: str) -> dict[str, Any] | None:
    """The build settings a :func:`save_weights` file records beside its state dict: all of
    :data:`BUILD_SETTINGS` (format 2), ``residual`` alone (format 1, or an older file without
    a format), or None (a checkpoint that records none)."""
    if not isinstance(obj, Mapping) or not isinstance(obj.get("state_dict"), Mapping):
        return None
    form = obj.get("format")
    if form == WEIGHTS_FORMAT:
        missing = [name for name in BUILD_SETTINGS if name not in obj]
        if missing:
            raise WeightsError(f"{origin} is a {form} file without {', '.join(missing)}")
        return _check_settings({name: obj[name] for name in BUILD_SETTINGS}, origin)
    if isinstance(form, str) and form.startswith(_FORMAT_PREFIX) and form != _FORMAT_1:
        raise WeightsError(
            f"{origin} has format {form!r}, which this fundus_batch cannot read (it reads "
            f"{_FORMAT_1} and {WEIGHTS_FORMAT})"
        )
    flag = obj.get("residual")
    if flag is None:
        return None
    if isinstance(flag, bool):
        return {"residual": flag}
    raise WeightsError(f"{origin}: 'residual' must be true or false, got {flag!r}")


def _origin(source: Source) -> str:
    """How messages name a checkpoint: its path, or "the given mapping"."""
    return "the given mapping" if isinstance(source, Mapping) else str(Path(source))


def _read_checkpoint(
    source: Source, map_location: Any
) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """A checkpoint's flat state dict and the build settings it records (None: none)."""
    origin = _origin(source)
    obj = source if isinstance(source, Mapping) else _read(Path(source), map_location)
    return _unwrap(obj, origin), _recorded_settings(obj, origin)


def read_state_dict(source: Source, *, map_location: Any = "cpu") -> dict[str, Tensor]:
    """A checkpoint as a flat state dict: unwrapped, ``module.`` prefix stripped, code refused."""
    return _read_checkpoint(source, map_location)[0]


def save_weights(
    path: str | os.PathLike[str], state_dict: StateDict, *, residual: bool, **settings: Any
) -> str:
    """Write ``state_dict`` with its build settings, which a bare state dict cannot carry:
    ``{"state_dict": ..., "format": "fundus-batch-weights-2", "residual": bool, ...}`` with
    every name of :data:`BUILD_SETTINGS` (``settings`` gives the others; a missing one takes
    the registry entry's default; ``**build_settings(config)`` passes a training config's),
    tensors on the CPU, through a temporary file renamed into place. Returns the file's sha256
    (the registry's ``sha256``)."""
    if not isinstance(residual, bool):
        raise TypeError(f"residual must be a bool, got {type(residual).__name__}")
    unknown = sorted(set(settings) - set(BUILD_SETTINGS))
    if unknown:
        raise TypeError(f"save_weights got unknown settings {unknown}; known: {BUILD_SETTINGS}")
    recorded = _check_settings({"residual": residual, **settings}, "save_weights")
    state = _unwrap(state_dict, "the given state dict")  # tensors only, prefix stripped
    data = {
        "state_dict": {k: v.detach().cpu() for k, v in state.items()},
        "format": WEIGHTS_FORMAT,
        **recorded,
    }
    save_torch(path, data)
    return file_sha256(path)


def save_torch(path: str | os.PathLike[str], data: Any) -> None:
    """``torch.save(data)`` to ``path`` through a temporary file renamed into place: a kill or
    a full disk leaves the previous file whole, and a write error is the OSError that names
    the file (torch's own writer turns it into a RuntimeError without the path)."""
    buffer = io.BytesIO()
    torch.save(data, buffer)
    write_local_files([(path, buffer.getvalue())])


# ---------------------------------------------------------------------------- diagnosis


def _expected_shapes(variant: str, width: float) -> dict[str, tuple[int, ...]]:
    model = build_cofenet(variant, width, device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _is_optional(key: str) -> bool:
    # BatchNorm fills num_batches_tracked in when a (pre-0.4.1) checkpoint lacks it.
    return key.endswith("num_batches_tracked")


def _compare(
    state: StateDict, expected: Mapping[str, tuple[int, ...]]
) -> tuple[list[str], list[str], list[str]]:
    missing = [k for k in expected if k not in state and not _is_optional(k)]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {expected[k]}"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    ]
    return missing, unexpected, mismatched


def detect_architecture(state: StateDict) -> tuple[str, float] | None:
    """(variant, width) whose keys and shapes ``state`` matches exactly, else None.

    The variant follows from which modules are present (``a_*`` -> LQA, ``G_input_2`` ->
    two-scale, ``firstconv`` -> CE-Net branch) and the width from the output channels of a few
    layers (the widest first; any width with the same channel counts builds the same shapes).
    The residual flag and the smooth-correction head leave no trace in the weights; the
    registry or a :func:`save_weights` file records them (:data:`BUILD_SETTINGS`).
    """
    for variant, width in _candidates(state):
        missing, unexpected, mismatched = _compare(state, _expected_shapes(variant, width))
        if not (missing or unexpected or mismatched):
            return variant, width
    return None


# Layers whose output channels reveal the width, with their full-width channel counts.
_WIDTH_PROBES = (
    ("encoder4.0.conv1.weight", 512),
    ("a_en_conv3.weight", 256),
    ("G_conv4_0.weight", 128),
    ("G_conv1.weight", 32),
)


def _candidates(state: StateDict) -> list[tuple[str, float]]:
    """Plausible (variant, width) pairs for ``state``, the most likely first."""
    if "G_conv1.weight" not in state:
        return []
    if any(k.startswith("a_") for k in state):
        variant = VARIANTS[3]
    elif "G_input_2.weight" in state:
        variant = VARIANTS[2]
    elif "firstconv.weight" in state:
        variant = VARIANTS[1]
    else:
        variant = VARIANTS[0]
    widths: list[float] = []
    for key, full in _WIDTH_PROBES:
        tensor = state.get(key)
        if tensor is not None and tensor.ndim == 4:
            width = tensor.shape[0] / full
            if 0.0 < width <= 1.0 and width not in widths:
                widths.append(width)
    return [(variant, w) for w in widths]


def _describe(state: StateDict) -> str:
    candidates = _candidates(state)
    if not candidates:
        if "firstconv.weight" in state and "G_conv1.weight" not in state:
            return (
                "the file looks like a CE-Net vessel-branch checkpoint (no G_* keys), not a "
                "Cofe-Net generator"
            )
        return "the file does not look like any Cofe-Net generator (no usable G_conv1.weight)"
    found = detect_architecture(state)
    if found is not None:
        return f"the file fits variant={found[0]!r}, width={found[1]:g}"
    variant, width = candidates[0]
    missing, unexpected, mismatched = _compare(state, _expected_shapes(variant, width))
    n_bad = len(missing) + len(unexpected) + len(mismatched)
    return (
        f"the file is closest to variant={variant!r}, width={width:g} but still differs from it "
        f"in {n_bad} entries"
    )


def _model_label(model: nn.Module) -> str:
    if isinstance(model, CofeNet):
        return f"variant={model.variant!r}, width={model.width:g}"
    return type(model).__name__


def _listing(title: str, items: list[str]) -> str:
    more = f", ... (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return f"{len(items)} {title}: {', '.join(items[:_SHOW])}{more}"


# ---------------------------------------------------------------------------- loading


def load_weights(model: ModelT, path_or_state_dict: Source, *, map_location: Any = "cpu") -> ModelT:
    """Load a checkpoint into ``model`` strictly and return the model.

    Accepts a file path or a mapping; unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` and
    strips a ``module.`` prefix. Raises WeightsError (naming missing/unexpected keys and the
    variant/width the file fits) when it does not match the model, and refuses pickles that
    would run code.
    """
    state = read_state_dict(path_or_state_dict, map_location=map_location)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected, mismatched = _compare(state, expected)
    if missing or unexpected or mismatched:
        parts = [f"weights do not fit the model ({_model_label(model)})"]
        if missing:
            parts.append(_listing("missing keys", missing))
        if unexpected:
            parts.append(_listing("unexpected keys", unexpected))
        if mismatched:
            parts.append(_listing("shape mismatches", mismatched))
        parts.append(_describe(state))
        raise WeightsError("; ".join(parts))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"weights do not fit the model ({_model_label(model)}): {exc}") from exc
    return model


def model_from_weights(
    path_or_state_dict: Source,
    *,
    residual: bool | None = None,
    variant: str | None = None,
    width: float | None = None,
    map_location: Any = "cpu",
) -> CofeNet:
    """Build the variant and width a checkpoint fits (or ``variant`` at ``width``, default 1),
    with the build settings a :func:`save_weights` file records, load it, and return it in eval
    mode.

    ``residual`` None takes the file's flag; a given one must agree with it. A checkpoint that
    does not record its head settings (a bare state dict, a format-1 file) is refused for
    width < 1, where it could be a smooth-correction head model, unless it is residual (the
    file's flag or ``residual=True``: a residual model has no such head). Full-width bare
    state dicts (the released checkpoints) load as the plain network.
    """
    origin = _origin(path_or_state_dict)
    state, recorded = _read_checkpoint(path_or_state_dict, map_location)
    recorded = recorded or {}
    complete = all(name in recorded for name in BUILD_SETTINGS)
    flag = recorded.get("residual")
    if flag is not None and residual is not None and flag != residual:
        raise WeightsError(f"{origin} says residual={flag}, but residual={residual} was asked for")
    heads = sorted({what for key in state for p, what in _HEAD_KEYS.items() if key.startswith(p)})
    if heads and not complete:
        raise WeightsError(
            f"these weights have {' and '.join(heads)}, whose settings a checkpoint does not "
            "carry: load them by their registered name, or put their registry entry in a "
            f"registry.json beside the file (or in a folder named by ${ENV_VAR})"
        )
    if variant is None:
        if width is not None:
            raise WeightsError("a width needs its variant (or give neither: both are detected)")
        plain = {k: v for k, v in state.items() if not k.startswith(tuple(_HEAD_KEYS))}
        found = detect_architecture(plain)
        if found is None:
            raise WeightsError(f"cannot build a model for these weights: {_describe(plain)}")
        variant, width = found
    elif width is None:
        width = 1.0
    settings = (
        dict(recorded) if complete else {"residual": bool(flag if residual is None else residual)}
    )
    if not complete and float(width) < 1.0 and not settings["residual"]:
        what = "a bare state dict" if not recorded else f"a {_FORMAT_1} file (residual only)"
        raise WeightsError(
            f"{origin} is {what} of a width-{float(width):g} model, which does not say whether "
            "it has a smooth-correction head (field_size, field_deadzone, ...): built without "
            "one it could ruin images, so it will not be loaded; load it by its registered "
            "name, or put its registry entry in a registry.json beside the file (or in a folder "
            f"named by ${ENV_VAR}), or save it with save_weights and its settings"
        )
    model = build_cofenet(variant, width, **_build_kwargs(settings))
    load_weights(model, state)
    return model.eval()


# ---------------------------------------------------------------------------- registry


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _sha256(value: str) -> str:
    value = value.lower()
    if not _SHA256.fullmatch(value):
        raise ValueError("malformed sha256: expected 64 hex digits")
    return value


_Text = Annotated[str, Strict()]
_Required = Annotated[str, Strict(), Field(min_length=1)]


class WeightsEntry(Model):
    """One registered weights file and what it was trained for (``registry``: the JSON file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: _Required
    file: _Required
    sha256: Annotated[str, Strict(), AfterValidator(_sha256)]
    variant: Annotated[str, Strict(), AfterValidator(canonical_variant)]
    width: Annotated[Finite, Field(gt=0.0, le=1.0)] = 1.0
    residual: Annotated[bool, Strict()] = False
    field_size: Annotated[Int, Field(ge=1)] | None = None
    field_deadzone: Annotated[Finite, Field(ge=0.0)] = 0.0
    field_gate: Annotated[bool, Strict()] = False
    field_gate_threshold: Annotated[Finite, Field(gt=0.0, lt=1.0)] | None = None
    spot_head: Annotated[Int, Field(ge=1)] | None = None
    spot_deadzone: Annotated[Finite, Field(ge=0.0, lt=0.5)] = 0.0
    size: Annotated[Int, Field(ge=1)] = 512
    training_data: _Text = ""
    metrics: dict[str, Finite] = Field(default_factory=dict)
    notes: _Text = ""
    registry: Path | None = None

    @classmethod
    def error(cls, problems: list[FieldProblem]) -> WeightsError:
        """A WeightsError listing every bad field."""
        return WeightsError("invalid weights entry: " + format_problems(problems))

    @property
    def path(self) -> Path:
        """Where the file is expected: ``file`` resolved against the registry file's folder."""
        file = Path(self.file).expanduser()
        if file.is_absolute() or self.registry is None:
            return file
        return self.registry.parent / file

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], registry: Path | None = None) -> WeightsEntry:
        """Parse one registry entry (JSON fields; ``registry`` is the file it came from)."""
        origin = str(registry) if registry else "registry entry"
        name = data.get("name") if isinstance(data, Mapping) else None
        where = f"{origin}: entry {name!r}" if isinstance(name, str) and name else origin

        def error(problems: list[FieldProblem]) -> WeightsError:
            return WeightsError(f"{where}: {format_problems(problems)}")

        if not isinstance(data, Mapping):
            raise error([FieldProblem("<root>", f"expected an object (got {type(data).__name__})")])
        if "registry" in data:  # not a JSON field: where the JSON file lies
            raise error([FieldProblem("registry", "unknown field")])
        return validate(cls, {**data, "registry": registry}, error)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of this entry (without the registry location)."""
        return {
            "name": self.name,
            "file": self.file,
            "sha256": self.sha256,
            "variant": self.variant,
            "width": self.width,
            "residual": self.residual,
            "field_size": self.field_size,
            "field_deadzone": self.field_deadzone,
            "field_gate": self.field_gate,
            "field_gate_threshold": self.field_gate_threshold,
            "spot_head": self.spot_head,
            "spot_deadzone": self.spot_deadzone,
            "size": self.size,
            "training_data": self.training_data,
            "metrics": dict(self.metrics),
            "notes": self.notes,
        }


class _Settings(BaseModel):
    """Base of the model that checks a file's build settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)


_SETTING_FIELDS: dict[str, Any] = {
    name: (WeightsEntry.model_fields[name].annotation, WeightsEntry.model_fields[name])
    for name in BUILD_SETTINGS
}
# BUILD_SETTINGS with WeightsEntry's types, bounds and defaults: how a file's are checked.
_SettingsModel = create_model("BuildSettings", __base__=_Settings, **_SETTING_FIELDS)


def _check_settings(settings: Mapping[str, Any], origin: str) -> dict[str, Any]:
    """``settings`` (names of :data:`BUILD_SETTINGS`) checked, with defaults for the others."""

    def error(problems: list[FieldProblem]) -> WeightsError:
        return WeightsError(f"{origin}: bad build settings: {format_problems(problems)}")

    return validate(_SettingsModel, dict(settings), error).model_dump()


def build_settings(source: object) -> dict[str, Any]:
    """The :data:`BUILD_SETTINGS` of ``source`` (a WeightsEntry, a training config, a mapping)
    by name, the entry's default for any it does not have: ``save_weights(..., **these)``.
    A model is refused: its attributes are not named as its settings."""
    if isinstance(source, nn.Module):
        raise TypeError("build_settings takes a registry entry, a training config or a mapping")
    out = {}
    for name in BUILD_SETTINGS:
        default = WeightsEntry.model_fields[name].get_default()
        if isinstance(source, Mapping):
            out[name] = source.get(name, default)
        else:
            out[name] = getattr(source, name, default)
    return out


def _build_kwargs(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Build settings as :func:`build_cofenet` arguments."""
    return {_BUILD_ARGS.get(name, name): value for name, value in settings.items()}


EVAL_SUFFIX = ".eval.json"  # evaluation records, not registry files


def registry_files() -> list[Path]:
    """Registry JSON files, in precedence order: the package's, then ``$FUNDUS_BATCH_WEIGHTS``'s.

    ``FUNDUS_BATCH_WEIGHTS`` names one folder (or several, ``os.pathsep``-separated); every
    ``*.json`` file directly inside is a registry file, except the evaluation records
    (``*.eval.json``) that training writes beside its weights.
    """
    files = [PACKAGE_REGISTRY] if PACKAGE_REGISTRY.is_file() else []
    for folder in os.environ.get(ENV_VAR, "").split(os.pathsep):
        if folder.strip():
            found = sorted(Path(folder).expanduser().glob("*.json"))
            files += [f for f in found if not f.name.endswith(EVAL_SUFFIX)]
    return files


def _read_registry(path: Path) -> list[WeightsEntry]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"cannot read weights registry {path}: {exc}") from exc
    if isinstance(data, Mapping) and "weights" in data:
        data = data["weights"]
    items = data if isinstance(data, list) else [data]
    return [WeightsEntry.from_dict(item, registry=path) for item in items]


def list_weights() -> dict[str, WeightsEntry]:
    """All registered entries by name; user entries override the package's of the same name."""
    found: dict[str, WeightsEntry] = {}
    for path in registry_files():
        for entry in _read_registry(path):
            earlier = found.get(entry.name)
            if earlier is not None and earlier.registry is not None:
                same_level = (earlier.registry == PACKAGE_REGISTRY) == (path == PACKAGE_REGISTRY)
                if same_level:
                    raise WeightsError(
                        f"weights name {entry.name!r} is registered twice "
                        f"({earlier.registry} and {path})"
                    )
            found[entry.name] = entry
    return found


def resolve_weights(name_or_path: str | os.PathLike[str]) -> WeightsEntry | Path:
    """A registered entry for a name; for an existing checkpoint file, the entry that
    registers the same bytes (any registry, or a ``registry.json`` beside the file), pointed at
    that file; else the file's Path (a plain checkpoint: the architecture is read from it)."""
    text = os.fspath(name_or_path)
    entries = list_weights()
    if text in entries:
        return entries[text]
    path = Path(text).expanduser()
    if path.is_file():
        return _entry_for_file(path, list(entries.values())) or path
    known = ", ".join(sorted(entries)) or "none"
    raise WeightsError(
        f"{text!r} is neither a registered weights name (known: {known}) nor an existing file; "
        f"register weights with a JSON file in ${ENV_VAR} or pass a checkpoint path"
    )


def _entry_for_file(path: Path, entries: list[WeightsEntry]) -> WeightsEntry | None:
    """The entry whose sha256 is ``path``'s, with ``file`` set to ``path``: the settings that
    the weights do not carry (the heads' sizes, dead zones, gate, residual) come from it."""
    beside = path.parent / "registry.json"
    if beside.is_file():
        entries = [*entries, *_read_registry(beside)]
    digest = file_sha256(path)
    for entry in entries:
        if entry.sha256 == digest:
            return entry.model_copy(update={"file": str(path.resolve()), "registry": None})
    return None


# Keys only a model with registry settings has: without them the file cannot be read right.
_HEAD_KEYS = {"G_gate.": "a gated correction head", "spot.": "a spot head"}


def load_registered(name: str, device: torch.device | str = "cpu") -> CofeNet:
    """Build the registered variant/width, verify the file's sha256, load it; eval mode."""
    found = resolve_weights(name)
    if not isinstance(found, WeightsEntry):
        raise WeightsError(f"{name!r} is a file, not a registered weights name")
    return model_for_entry(found, device)


def check_entry_file(entry: WeightsEntry) -> None:
    """Raise WeightsError unless the entry's file is there with its registered sha256."""
    path = entry.path
    if not path.is_file():
        raise WeightsError(
            f"weights {entry.name!r} are registered in {entry.registry} but the file is missing: "
            f"put {Path(entry.file).name} at {path} (sha256 {entry.sha256}); nothing is downloaded"
        )
    digest = file_sha256(path)
    if digest != entry.sha256:
        raise WeightsError(
            f"sha256 of {path} is {digest}, but registry entry {entry.name!r} expects "
            f"{entry.sha256}; the file is corrupt or not the registered one and will not be loaded"
        )


def model_for_entry(entry: WeightsEntry, device: torch.device | str = "cpu") -> CofeNet:
    """The model an entry describes, its file's sha256 checked, loaded; eval mode."""
    check_entry_file(entry)
    path = entry.path
    state, recorded = _read_checkpoint(path, "cpu")
    settings = build_settings(entry)
    for name, value in (recorded or {}).items():
        if value != settings[name]:
            raise WeightsError(
                f"{path} says {name}={value}, but registry entry {entry.name!r} says "
                f"{name}={settings[name]}; one of them is wrong, so it will not be loaded"
            )
    model = build_cofenet(entry.variant, entry.width, **_build_kwargs(settings))
    load_weights(model, state)
    model.weights_entry = entry
    return model.to(device).eval()
