"""Typed run configuration, loaded from YAML and validated before any work starts."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from fundus_batch.degrade import TYPE_CODES
from fundus_batch.degrade.presets import PRESETS, Preset, PresetError, get_preset, known_preset
from fundus_batch.validation import FieldProblem, format_problems, validate


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayOptions(_Strict):
    """How the pipeline uses Ray. ``None`` values are derived from cluster resources."""

    address: str | None = Field(None, description="Ray address; None: RAY_ADDRESS or local")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local cluster")
    num_gpus: int | None = Field(None, ge=0, description="GPUs to declare for a local cluster")
    degrade_actors: int | None = Field(
        None, ge=1, description="actors of the CPU-stage pool; None: from the cluster's CPUs"
    )
    max_degrade_actors: int | None = Field(
        None,
        ge=1,
        description="most actors the CPU-stage pool grows to as nodes join; None: no limit, "
        "or degrade_actors when that is set",
    )
    degrade_cpus_per_actor: float | None = Field(
        None,
        gt=0,
        le=64,
        description="CPUs per CPU-stage actor; None: 1 (0.75 below 8 CPUs with a GPU stage)",
    )
    rows_per_block: int = Field(
        8, ge=1, le=10_000, description="images per Ray Data block (fewer in small runs)"
    )
    fetch_threads: int = Field(8, ge=1, le=256, description="download threads per CPU-stage worker")

    @model_validator(mode="after")
    def _pool_bounds_in_order(self) -> RayOptions:
        _check_bounds(self.degrade_actors, self.max_degrade_actors, "degrade_actors")
        return self


def _check_bounds(start: int | None, most: int | None, name: str) -> None:
    """A pool may not be told to start with more actors than it may grow to."""
    if start is not None and most is not None and most < start:
        raise ValueError(f"max_{name} ({most}) is below {name} ({start})")


class EnhanceOptions(_Strict):
    """Enhancement of degraded (or source) images: Cofe-Net, or the classical baseline."""

    enabled: bool = Field(
        False, description="also enhance each image (each degraded variant in pairs mode)"
    )
    enhancer: Literal["cofenet", "classical"] = Field(
        "cofenet", description="cofenet (a network, GPU if any) or classical (CPU, no weights)"
    )
    weights: str = Field("fundus-cofenet-small", description="registry name or checkpoint path")
    variant: str | None = Field(
        None, description="network variant when weights is a file; None: read from the file"
    )
    width: float | None = Field(
        None,
        gt=0,
        le=1,
        description="width multiplier of the variant when weights is a file; None: 1, or read "
        "from the file when variant is None",
    )
    batch_size: int = Field(4, ge=1, le=256, description="images per network forward pass")
    actors: int | None = Field(
        None, ge=1, description="enhancement actors; None: from the GPUs, else from the CPUs"
    )
    max_actors: int | None = Field(
        None,
        ge=1,
        description="most enhancement actors as nodes join; None: no limit, or actors when that "
        "is set",
    )
    cpus_per_actor: float = Field(1.0, gt=0, le=64, description="CPUs per CPU enhancement actor")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the network runs; auto: CUDA when available"
    )
    max_change: int | None = Field(
        None,
        ge=1,
        le=255,
        description="grey levels Cofe-Net may change any pixel by, at most; None: no limit",
    )
    save_vessels: bool = Field(False, description="reserved: no stage writes vessel maps yet")

    @field_validator("variant")
    @classmethod
    def _known_variant(cls, value: str | None) -> str | None:
        """The released name of a Cofe-Net variant (an alias such as ``cofe-net`` too)."""
        if value is None:
            return None
        from fundus_batch.models.cofenet import canonical_variant  # torch: only when given

        return canonical_variant(value)

    @model_validator(mode="after")
    def _cofenet_options_need_cofenet(self) -> EnhanceOptions:
        if self.max_change is not None and self.enhancer != "cofenet":
            raise ValueError("enhance.max_change limits the cofenet enhancer only")
        given = [n for n in ("variant", "width") if getattr(self, n) is not None]
        if given and self.enhancer != "cofenet":
            raise ValueError(
                f"enhance.{given[0]} selects a Cofe-Net checkpoint's network: the "
                f"{self.enhancer} enhancer has none"
            )
        ignored = [n for n in ("weights", "device") if n in self.model_fields_set]
        if ignored and self.enhancer != "cofenet":
            raise ValueError(
                f"enhance.{ignored[0]} is a Cofe-Net setting: the {self.enhancer} enhancer runs "
                "on the CPU without weights (leave it out)"
            )
        if self.width is not None and self.variant is None:
            raise ValueError(
                "enhance.width needs enhance.variant (give neither to read both from the file)"
            )
        _check_bounds(self.actors, self.max_actors, "actors")
        return self


class LeaseOptions(_Strict):
    """The lease that makes a run the only writer of its output folder (see lease.py)."""

    wait: float = Field(
        0.0, ge=0, description="seconds to wait while another run writes OUT (0: refuse at once)"
    )
    ttl: float = Field(60.0, gt=0, le=3600, description="seconds a lease lives unrenewed")
    renew_every: float = Field(10.0, gt=0, le=3600, description="seconds between renewals")

    @model_validator(mode="after")
    def _renew_before_expiry(self) -> LeaseOptions:
        if self.renew_every >= self.ttl:
            raise ValueError("lease.renew_every must be below lease.ttl")
        return self


class RunConfig(_Strict):
    """Everything one run needs. Flags on the CLI override fields of a YAML file."""

    manifest: str = Field(..., description="CSV or Parquet manifest URL")
    out: str = Field(..., description="output root URL")
    mode: Literal["pairs", "enhance", "score"] = Field(
        "pairs", description="pairs: degrade (+ enhance); enhance: enhance only; score: metrics"
    )
    seed: int = Field(0, ge=0, lt=2**63, description="run seed of the degradation sampling")
    size: int = Field(512, ge=64, le=4096, description="working size in pixels (multiple of 32)")
    variants: int = Field(7, ge=1, le=1000, description="degraded variants per image")
    types: list[str] = Field(
        default_factory=lambda: list(TYPE_CODES),
        description="degradation types: comma-separated codes (YAML: a list too), or 'all'",
    )
    type_mode: Literal["cycle", "sample"] = Field(
        "cycle", description="cycle: variant k gets the k-th type; sample: drawn per variant"
    )
    custom_preset: Preset | None = Field(
        None,
        description="the ranges of a custom preset, set from a mapping given as preset "
        "(None: preset names a built-in one)",
    )
    preset: str = Field(
        "cofe-release",
        description="degradation parameter ranges: a built-in preset (a config may give a "
        "mapping of custom ranges instead)",
    )
    image_format: Literal["png", "jpeg"] = Field("png", description="format of the output images")
    jpeg_quality: int = Field(95, ge=1, le=100, description="JPEG quality of the output images")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for the manifest, inputs and OUT"
    )
    output_storage_options: dict[str, Any] | None = Field(
        None, description="fsspec options for OUT; None: storage_options"
    )
    storage_retries: int = Field(6, ge=0, le=50, description="retries of transient I/O errors")
    retry_failed: bool = Field(
        False, description="redo rows that failed before (their old rows are removed first)"
    )
    compute_metrics: bool = Field(True, description="full- and no-reference quality metrics")
    min_quality: str | None = Field(
        None, description="flag rows: 'nr_luminance_clean >= 40 and nr_laplacian_var_clean > 20'"
    )
    shard_rows: int = Field(1000, ge=1, le=1_000_000, description="rows per Parquet file")
    limit: int | None = Field(None, ge=1, description="process only the first N manifest rows")
    progress: bool = Field(True, description="show a progress bar on the console")
    ray: RayOptions = Field(default_factory=RayOptions, description="how the run uses Ray")
    enhance: EnhanceOptions = Field(default_factory=EnhanceOptions, description="enhancement")
    lease: LeaseOptions = Field(default_factory=LeaseOptions, description="the OUT lease")

    @field_validator("types", mode="before")
    @classmethod
    def _types(cls, value: Any) -> list[str]:
        if value in (None, "all"):
            return list(TYPE_CODES)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, int) and not isinstance(value, bool):
            value = [value]  # YAML's `types: 111`
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)) for v in value
        ):
            raise ValueError(
                f"expected type codes as a list or a comma-separated string, got {value!r}"
            )
        codes = [str(v).zfill(3) if isinstance(v, int) else str(v) for v in value]
        bad = [c for c in codes if c not in TYPE_CODES]
        if bad:
            hint = ""
            if any(isinstance(v, int) and str(v).zfill(3) in bad for v in value):
                # YAML 1.1 reads 010 and 011 as the octal numbers 8 and 9
                hint = "; quote type codes in YAML ('010'): a number with a leading 0 is octal"
            raise ValueError(f"unknown type code(s) {bad}; valid: {list(TYPE_CODES)}{hint}")
        if not codes:
            raise ValueError("at least one type code is needed")
        return codes

    @model_validator(mode="before")
    @classmethod
    def _custom_preset(cls, data: Any) -> Any:
        """A ``preset`` given as a mapping (or a Preset) becomes its name plus ``custom_preset``;
        one equal to a built-in preset becomes just that name."""
        if not isinstance(data, Mapping):
            return data
        given, custom = data.get("preset"), data.get("custom_preset")
        if isinstance(custom, Mapping | Preset):  # a dumped config read back, or a Preset
            custom = _parse_preset(custom, "custom_preset")
        if isinstance(given, Mapping | Preset):
            if custom is not None:
                raise _preset_error(
                    "custom_preset", "set from preset: give the ranges as preset only", custom
                )
            custom = _parse_preset(given, "preset")
            given = custom.name
        if isinstance(custom, Preset) and PRESETS.get(custom.name) == custom:
            custom = None  # a built-in preset spelled out: recorded as its name
        updated = {**data, "custom_preset": custom}
        if given is not None:
            updated["preset"] = given
        return updated

    @field_validator("preset")
    @classmethod
    def _preset(cls, value: str, info: ValidationInfo) -> str:
        """A built-in preset's name, or the name of the custom preset given."""
        custom = info.data.get("custom_preset")
        if custom is None:
            return known_preset(value)
        if value != custom.name:
            raise ValueError(f"custom_preset is named {custom.name!r}: preset must name it")
        return value

    @field_validator("size")
    @classmethod
    def _size(cls, value: int) -> int:
        if value % 32:
            raise ValueError("size must be a multiple of 32 (Cofe-Net needs it)")
        return value

    @model_validator(mode="after")
    def _modes(self) -> RunConfig:
        if self.mode == "enhance" and not self.enhance.enabled:
            self.enhance.enabled = True
        shaping = ("enhancer", "weights", "variant", "width", "max_change")
        given = [n for n in shaping if n in self.enhance.model_fields_set]
        if given and not self.enhance.enabled and "enabled" not in self.enhance.model_fields_set:
            raise ValueError(
                f"enhance.{given[0]} is given but nothing is enhanced: add --enhance "
                "(enhance.enabled: true), or leave it out"
            )
        if self.min_quality is not None:
            self._check_min_quality(self.min_quality)
        if self.enhance.max_change is not None and self.image_format == "jpeg":
            raise ValueError(
                "enhance.max_change needs image_format png: JPEG encoding of the enhanced image "
                "moves pixels by more than the bound"
            )
        return self

    def _check_min_quality(self, rule: str) -> None:
        """The rule parses and names only columns this run has filled when the gate runs (and
        that can hold a number at this size: MS-SSIM cannot at 256 px and below)."""
        from fundus_batch.quality import (
            MS_SSIM_MIN_SIZE,
            QualityRuleError,
            gate_columns,
            parse_rule,
        )
        from fundus_batch.schema import OUTPUT_COLUMNS

        try:
            parsed = parse_rule(rule, set(OUTPUT_COLUMNS))
        except QualityRuleError as exc:
            raise ValueError(f"min_quality: {exc}") from None
        pairs, enhanced = self.mode == "pairs", self.enhance.enabled
        usable = gate_columns(pairs=pairs, enhanced=enhanced, metrics=self.compute_metrics)
        unfilled = sorted(parsed.columns - usable)
        if unfilled:
            run = (
                f"mode {self.mode}, enhancement {'on' if enhanced else 'off'}, "
                f"metrics {'on' if self.compute_metrics else 'off'}"
            )
            raise ValueError(
                f"min_quality: column {unfilled[0]!r} has no number when the quality gate runs "
                f"in this run ({run}); a rule can name the numeric columns filled before it"
            )
        ms_ssim = sorted(c for c in parsed.columns if c.startswith("ms_ssim_"))
        if ms_ssim and self.size < MS_SSIM_MIN_SIZE:
            raise ValueError(
                f"min_quality: column {ms_ssim[0]!r} is NaN for every row at size {self.size}: "
                f"MS-SSIM needs a field of view of about 270 px or more (size "
                f"{MS_SSIM_MIN_SIZE} or more); use ssim_* at this size"
            )

    @property
    def resolved_preset(self) -> Preset:
        """The preset this run draws from: the custom one given, else the built-in one named."""
        return self.custom_preset if self.custom_preset is not None else get_preset(self.preset)

    @property
    def out_storage_options(self) -> dict[str, Any]:
        return (
            self.storage_options
            if self.output_storage_options is None
            else self.output_storage_options
        )

    def redacted(self) -> dict[str, Any]:
        """The resolved config as a dict with storage credentials removed."""
        data = self.model_dump(mode="json")
        for key in ("storage_options", "output_storage_options"):
            if data.get(key):
                data[key] = _redact_options(data[key])
        return _redact_strings(data)


def _preset_error(field: str, message: str, value: Any) -> ValidationError:
    """A pydantic error at ``field`` (a dotted path inside the config) saying ``message``."""
    loc = tuple(field.split("."))
    detail = InitErrorDetails(
        type=PydanticCustomError("preset", "{reason}", {"reason": message}),
        loc=loc,
        input=value,
    )
    return ValidationError.from_exception_data("RunConfig", [detail])


def _parse_preset(value: Mapping[str, Any] | Preset, field: str) -> Preset:
    """``value`` (a preset's fields, ``name`` required, ``base`` an optional built-in name) as a
    Preset, checked by ``Preset.from_dict``; errors name ``<field>.<preset field>``."""
    if isinstance(value, Preset):
        value = value.to_dict()
    base = value.get("base")
    if "base" in value and (not isinstance(base, str) or base not in PRESETS):
        raise _preset_error(
            f"{field}.base", f"unknown preset; known presets: {sorted(PRESETS)}", base
        )
    try:
        return Preset.from_dict(value)
    except PresetError as exc:
        cause = exc.__context__  # Preset's own field errors, each at its location
        if isinstance(cause, ValidationError):
            errors = cause.errors()
            raise ValidationError.from_exception_data(
                "RunConfig",
                [
                    InitErrorDetails(
                        type=PydanticCustomError(e["type"], "{reason}", {"reason": e["msg"]})
                        if e["type"] != "missing"
                        else "missing",
                        loc=(field, *e["loc"]),
                        input=e["input"],
                    )
                    for e in errors
                ],
            ) from None
        where = field if exc.field == "<root>" else f"{field}.{exc.field}"
        message = str(exc).removeprefix(f"{exc.field}: ")
        raise _preset_error(where, message, value.get(exc.field, value)) from None


_SECRET_WORDS = (
    "secret",
    "token",
    "password",
    "key",
    "credential",
    "sas",
    "session",
    "authorization",  # an HTTP header
)


def _redact_options(options: Any) -> Any:
    if isinstance(options, dict):
        return {
            k: (
                "***"
                if any(w in k.lower() for w in _SECRET_WORDS) and not isinstance(v, dict)
                else _redact_options(v)
            )
            for k, v in options.items()
        }
    return options


def _redact_strings(value: Any) -> Any:
    """Every string inside ``value`` through ``storage.redact`` (a presigned manifest URL)."""
    from fundus_batch.io.storage import redact

    if isinstance(value, dict):
        return {k: _redact_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_strings(v) for v in value]
    return redact(value) if isinstance(value, str) else value


def build_config(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    """Validate a dict into a :class:`RunConfig`, raising :class:`ConfigError` naming fields."""

    def error(problems: list[FieldProblem]) -> ConfigError:
        return ConfigError(f"invalid config {source}:\n  " + format_problems(problems, "\n  "))

    return validate(RunConfig, data, error)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load a YAML config (safe loader) and apply CLI overrides (dotted keys allowed)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    merged = merge_overrides(data, overrides or {})
    return build_config(merged, str(path))


def merge_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return ``data`` with ``overrides`` applied; keys like ``ray.address`` reach nested blocks."""
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for key, value in overrides.items():
        if value is None:
            continue
        parts = key.split(".")
        target = merged
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"cannot override '{key}': '{part}' is not a mapping")
        target[parts[-1]] = value
    return merged
