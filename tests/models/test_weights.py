"""Checkpoint loading (strict, safe, diagnostic) and the local weights registry."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from fundus_batch.models import weights
from fundus_batch.models.cofenet import VARIANTS, CofeNet, build_cofenet
from fundus_batch.models.weights import (
    WeightsEntry,
    WeightsError,
    detect_architecture,
    file_sha256,
    list_weights,
    load_registered,
    load_weights,
    model_from_weights,
    read_state_dict,
    resolve_weights,
)

RES, VESSEL, SHARE, ATTEN = VARIANTS


def _model(variant: str = ATTEN, width: float = 0.125, seed: int = 0) -> CofeNet:
    return build_cofenet(variant, width, generator=torch.Generator().manual_seed(seed))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class _RunsCode:
    """Pickles to a call of os.system that would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------------------- strict loading


@pytest.mark.shared
@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_built_from_reference_key_list_loads_strictly(
    variant: str, oracle_dir: Path, tmp_path: Path
) -> None:
    gen = torch.Generator().manual_seed(1)
    state = {}
    for line in (oracle_dir / "net" / variant / "keys.txt").read_text().splitlines():
        if not line:
            continue
        key, shape_text = line.split("\t")
        shape = tuple(int(n) for n in re.findall(r"\d+", shape_text))
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        else:
            state[key] = torch.randn(shape, generator=gen)
    path = tmp_path / "latest_net_G.pth"
    torch.save(state, path)
    model = load_weights(build_cofenet(variant, device="meta").to_empty(device="cpu"), path)
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert detect_architecture(state) == (variant, 1.0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_saved_weights_round_trip_through_a_file(variant: str, tmp_path: Path) -> None:
    source = _model(variant, seed=2)
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    target = _model(variant, seed=3)
    assert not _same_weights(source, target)
    assert load_weights(target, path) is target
    assert _same_weights(source, target)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {"state_dict": sd, "epoch": torch.tensor(3)},
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
    ],
    ids=["module-prefix", "state_dict-wrapper", "model-wrapper-with-prefix"],
)
def test_dataparallel_prefix_and_wrappers_are_accepted(wrap, tmp_path: Path) -> None:
    source = _model(seed=4)
    path = tmp_path / "wrapped.pth"
    torch.save(wrap(source.state_dict()), path)
    target = load_weights(_model(seed=5), path)
    assert _same_weights(source, target)


def test_a_mapping_is_accepted_as_well_as_a_path() -> None:
    source = _model(VESSEL, seed=6)
    assert _same_weights(source, load_weights(_model(VESSEL, seed=7), source.state_dict()))


def test_old_checkpoints_without_num_batches_tracked_load() -> None:
    source = _model(VESSEL, seed=8)
    state = {k: v for k, v in source.state_dict().items() if "num_batches_tracked" not in k}
    target = load_weights(_model(VESSEL, seed=9), state)
    assert _same_weights(source, target)


def test_wrong_variant_file_names_the_variant_it_fits(tmp_path: Path) -> None:
    path = tmp_path / "vessel.pth"
    torch.save(_model(VESSEL).state_dict(), path)
    with pytest.raises(WeightsError) as info:
        load_weights(_model(ATTEN), path)
    message = str(info.value)
    assert "variant='encode_decode_vessel_2scale_share_res_atten'" in message  # the model
    assert "the file fits variant='encode_decode_vessel_res', width=0.125" in message
    assert "22 missing keys" in message and "G_input_2.weight" in message
    assert "(+17 more)" in message


def test_wrong_width_file_names_the_width_it_fits() -> None:
    with pytest.raises(WeightsError) as info:
        load_weights(_model(RES, 0.125), _model(RES, 0.25).state_dict())
    message = str(info.value)
    assert "shape mismatches" in message and "G_conv1.weight: file (8, 3, 5, 5)" in message
    assert "the file fits variant='encode_decode_res', width=0.25" in message


def test_unexpected_keys_are_named_and_nothing_is_loaded() -> None:
    state = dict(_model(RES, seed=10).state_dict())
    state["extra.weight"] = torch.zeros(1)
    target = _model(RES, seed=11)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(WeightsError, match=r"1 unexpected keys: extra\.weight"):
        load_weights(target, state)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_vessel_branch_only_file_is_recognised() -> None:
    full = _model(VESSEL).state_dict()
    ce_net = {k: v for k, v in full.items() if not k.startswith("G_")}
    with pytest.raises(WeightsError, match="CE-Net vessel-branch checkpoint"):
        load_weights(_model(VESSEL), ce_net)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("width", [1.0, 0.5, 0.25, 0.125])
def test_detect_architecture_recovers_variant_and_width(variant: str, width: float) -> None:
    state = build_cofenet(variant, width, device="meta").state_dict()
    assert detect_architecture(state) == (variant, width)


def test_detect_architecture_finds_a_width_that_builds_an_uneven_file() -> None:
    state = build_cofenet(VESSEL, 0.1, device="meta").state_dict()
    variant, width = detect_architecture(state)
    assert variant == VESSEL
    rebuilt = build_cofenet(variant, width, device="meta").state_dict()
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in state.items()}


def test_detect_architecture_returns_none_for_foreign_weights() -> None:
    assert detect_architecture({"conv.weight": torch.zeros(4, 3, 3, 3)}) is None
    state = dict(build_cofenet(RES, 0.25, device="meta").state_dict())
    state["G_conv2.weight"] = torch.zeros(16, 17, 5, 5)
    assert detect_architecture(state) is None


def test_model_from_weights_builds_the_matching_model(tmp_path: Path) -> None:
    source = _model(SHARE, 0.25, seed=12)
    path = tmp_path / "share.pth"
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    # A width < 1 checkpoint must say what it is (a bare one is refused): a save_weights file.
    recorded = {"format": weights.WEIGHTS_FORMAT, **weights.build_settings({})}
    torch.save({"state_dict": state, **recorded}, path)
    model = model_from_weights(path)
    assert (model.variant, model.width, model.training) == (SHARE, 0.25, False)
    assert _same_weights(source, model)


def _lifts(model: CofeNet) -> float:
    """Mean absolute change the model makes to a mid-grey image (a residual model at init
    changes little, the same weights read as non-residual give sigmoid(G): flat grey)."""
    x = torch.rand(1, 3, 192, 192, generator=torch.Generator().manual_seed(2)) * 0.6 + 0.2
    with torch.no_grad():
        return float((model.enhanced(model(x)) - x).abs().mean())


def test_save_weights_carries_the_residual_flag_that_a_bare_state_dict_loses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fundus_batch.enhance import load_model
    from fundus_batch.models import save_weights

    source = build_cofenet(RES, 0.125, residual=True, generator=torch.Generator().manual_seed(8))
    path = tmp_path / "model.pt"
    digest = save_weights(path, source.state_dict(), residual=True)
    assert digest == file_sha256(path)
    saved = torch.load(path, weights_only=True)
    assert (saved["residual"], saved["format"]) == (True, weights.WEIGHTS_FORMAT)
    with caplog.at_level("WARNING", logger="fundus_batch.models.weights"):
        detected = model_from_weights(path)
        given, name, sha = load_model(str(path), variant=RES, width=0.125)
    assert caplog.records == []  # the file says what it is
    for model in (detected, given):
        assert (model.variant, model.width, model.residual) == (RES, 0.125, True)
        assert _same_weights(source, model) and _lifts(model) == _lifts(source.eval())
    assert (name, sha) == ("model.pt", digest)
    with pytest.raises(WeightsError, match=r"says residual=True, but residual=False"):
        model_from_weights(path, residual=False)


def test_save_weights_on_a_full_disk_raises_the_os_error_and_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from fundus_batch.io import storage
    from fundus_batch.models import save_weights

    state = build_cofenet(RES, 0.125, generator=torch.Generator().manual_seed(8)).state_dict()
    path = tmp_path / "model.pt"
    digest = save_weights(path, state, residual=False)
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, fd: int, mode: str) -> None:
            self.file = real_fdopen(fd, mode)

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self.file.close()

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "fdopen", FullDisk)
    with pytest.raises(OSError, match="No space left on device"):
        save_weights(path, state, residual=True)
    assert file_sha256(path) == digest
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_a_bare_state_dict_loads_at_full_width_and_is_refused_below_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Below full width a bare state dict could be a smooth-correction head model, whose head
    has no parameters: built without it, it ruins images, so it is refused."""
    from fundus_batch.enhance import load_model

    source = build_cofenet(RES, 0.125, residual=True, generator=torch.Generator().manual_seed(8))
    bare = tmp_path / "bare.pt"
    torch.save(source.state_dict(), bare)
    for load in (
        lambda: load_model(str(bare)),
        lambda: load_model(str(bare), variant=RES, width=0.125),
        lambda: model_from_weights(bare, residual=False),
    ):
        with pytest.raises(WeightsError) as caught:
            load()
        message = str(caught.value)
        assert "\n" not in message and "bare state dict of a width-0.125 model" in message
        assert "registered name" in message and "registry.json beside" in message
        assert weights.ENV_VAR in message and "smooth-correction head" in message
    full = tmp_path / "full.pt"
    torch.save(_model(RES, 1.0, seed=3).state_dict(), full)
    with caplog.at_level("WARNING", logger="fundus_batch.models.weights"):
        released = model_from_weights(full)  # full width: the released formulation, no head
        said = model_from_weights(bare, residual=True)  # the caller says it: no head then
    assert caplog.records == []
    assert (released.width, released.residual, released.field) == (1.0, False, None)
    assert _same_weights(_model(RES, 1.0, seed=3), released)
    assert said.residual and said.field is None and _same_weights(source, said)


def test_a_format_1_file_still_loads_and_one_that_could_be_a_head_model_is_refused(
    tmp_path: Path,
) -> None:
    """Format 1 recorded ``residual`` only: a residual model has no smooth-correction head, a
    non-residual one below full width may have one."""
    source = build_cofenet(RES, 0.125, residual=True, generator=torch.Generator().manual_seed(8))
    old = tmp_path / "old.pt"
    plain = {"state_dict": source.state_dict(), "format": "fundus-batch-weights-1"}
    torch.save({**plain, "residual": True}, old)
    model = model_from_weights(old)
    assert (model.residual, model.field) == (True, None) and _same_weights(source, model)
    assert _lifts(model) == _lifts(source.eval())
    flat = tmp_path / "flat.pt"
    torch.save({**plain, "residual": False}, flat)
    with pytest.raises(WeightsError, match=r"fundus-batch-weights-1 file .*registry\.json beside"):
        model_from_weights(flat)


def _field_settings(spot: bool) -> dict[str, object]:
    settings: dict[str, object] = {"residual": False, "field_size": 192, "field_deadzone": 0.01}
    if spot:
        settings |= {"field_gate": True, "field_gate_threshold": 0.9}
        settings |= {"spot_head": 4, "spot_deadzone": 0.02}
    return settings


def _field_model(settings: dict[str, object]) -> CofeNet:
    args = {("field" if k == "field_size" else k): v for k, v in settings.items()}
    return build_cofenet("cofe-net", 0.125, generator=torch.Generator().manual_seed(6), **args)


def _output(model: CofeNet) -> torch.Tensor:
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(2)) * 0.6 + 0.2
    with torch.no_grad():
        return model.enhanced(model(x))


@pytest.mark.parametrize("spot", [False, True], ids=["field", "field-gate-spot"])
def test_a_saved_head_model_loads_alone_as_its_registered_build(
    spot: bool, user_dir: Path, tmp_path: Path
) -> None:
    from fundus_batch.models import save_weights

    settings = _field_settings(spot)
    source = _field_model(settings).eval()
    path = user_dir / "headed.pt"
    digest = save_weights(path, source.state_dict(), **settings)
    entry = {"name": "headed", "file": path.name, "sha256": digest, "variant": source.variant}
    (user_dir / "headed.json").write_text(json.dumps({**entry, "width": 0.125, **settings}))
    registered = load_registered("headed")
    alone = tmp_path / "alone.pt"
    alone.write_bytes(path.read_bytes())
    loaded = model_from_weights(alone)
    for model in (registered, loaded):
        assert repr(model) == repr(source) and _same_weights(source, model)
    assert (loaded.field, loaded.field_deadzone) == (192, 0.01)
    assert loaded.spot_deadzone == settings.get("spot_deadzone", 0.0)
    assert torch.equal(_output(loaded), _output(registered))
    assert torch.equal(_output(loaded), _output(source))


@pytest.mark.parametrize(
    ("setting", "in_entry"),
    [("field_deadzone", 0.02), ("field_size", None), ("residual", True)],
)
def test_a_file_whose_settings_disagree_with_its_registry_entry_is_refused_naming_it(
    setting: str, in_entry: object, user_dir: Path
) -> None:
    from fundus_batch.models import save_weights

    settings = _field_settings(spot=False)
    source = _field_model(settings)
    path = user_dir / "odd.pt"
    digest = save_weights(path, source.state_dict(), **settings)
    entry = {"name": "odd", "file": path.name, "sha256": digest, "variant": source.variant}
    entry |= {"width": 0.125, **settings, setting: in_entry}
    if setting == "residual":
        entry["field_size"] = None
    (user_dir / "odd.json").write_text(json.dumps(entry))
    with pytest.raises(WeightsError) as caught:
        load_registered("odd")
    message = str(caught.value)
    assert "\n" not in message
    assert f"says {setting}={settings[setting]}, but registry entry 'odd' says" in message
    assert f"{setting}={in_entry}; one of them is wrong" in message


def test_the_v2_weights_copied_alone_are_refused_naming_the_registry(tmp_path: Path) -> None:
    """fundus-cofenet-small-v2 is a bare fp16 state dict of a smooth-correction head model:
    alone, it was built as a plain network that turns photographs flat grey."""
    from fundus_batch.config import ConfigError
    from fundus_batch.enhance import check_model, load_model

    shipped = Path(__file__).resolve().parents[2] / "jobs" / "weights"
    shipped /= "fundus-cofenet-small-v2.pt"
    if not shipped.is_file():
        pytest.skip(f"{shipped} is not in this checkout")
    copy = tmp_path / "v2.pt"
    copy.write_bytes(shipped.read_bytes())
    expected = r"bare state dict of a width-0\.25 model.*registered name.*registry\.json beside"
    with pytest.raises(WeightsError, match=expected):
        load_model(str(copy))
    with pytest.raises(ConfigError, match=expected):  # the pipeline's check, before any work
        check_model(str(copy))


def test_a_residual_flag_that_contradicts_the_registry_entry_is_refused(
    user_dir: Path, tmp_path: Path
) -> None:
    from fundus_batch.models import save_weights

    source = build_cofenet(RES, 0.125, residual=True, generator=torch.Generator().manual_seed(8))
    path = user_dir / "flagged.pt"
    save_weights(path, source.state_dict(), residual=False)
    entry = {
        "name": "flagged",
        "file": path.name,
        "sha256": file_sha256(path),
        "variant": RES,
        "width": 0.125,
        "residual": True,
    }
    (user_dir / "flagged.json").write_text(json.dumps(entry))
    with pytest.raises(WeightsError, match=r"says residual=False, but registry entry 'flagged'"):
        load_registered("flagged")


# ---------------------------------------------------------------------------- unsafe / bad files


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_that_would_run_code_is_refused_without_running(writer: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = {"G_conv1.weight": torch.zeros(1), "hook": _RunsCode(marker)}
    path = tmp_path / "evil.pth"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(WeightsError, match="not a plain state dict") as info:
        load_weights(_model(), path)
    assert "will not be loaded" in str(info.value)
    assert "weights_only` set to `False`" not in str(info.value)
    if writer == "torch.save":
        assert "posix.system" in str(info.value) or "nt.system" in str(info.value)
    assert not marker.exists()


def test_unreadable_missing_and_non_dict_files_raise_weights_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(WeightsError, match=r"not a plain state dict|cannot read"):
        read_state_dict(garbage)
    truncated = tmp_path / "truncated.pth"
    torch.save({"G_conv1.weight": torch.zeros(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(WeightsError, match="cannot read"):
        read_state_dict(truncated)
    with pytest.raises(WeightsError, match="not found"):
        read_state_dict(tmp_path / "absent.pth")
    tensor_file = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(WeightsError, match="not a state dict"):
        read_state_dict(tensor_file)
    mixed = tmp_path / "mixed.pth"
    torch.save({"G_conv1.weight": torch.zeros(1), "epoch": 3}, mixed)
    with pytest.raises(WeightsError, match="non-tensor entries"):
        read_state_dict(mixed)
    with pytest.raises(WeightsError, match="empty"):
        read_state_dict({})


# ---------------------------------------------------------------------------- registry


@pytest.fixture
def user_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "user-weights"
    folder.mkdir()
    monkeypatch.setenv(weights.ENV_VAR, str(folder))
    monkeypatch.setattr(weights, "PACKAGE_REGISTRY", tmp_path / "package" / "registry.json")
    return folder


def _register(folder: Path, model: CofeNet, name: str, **fields: object) -> Path:
    path = folder / f"{name}.pth"
    torch.save(model.state_dict(), path)
    entry = {
        "name": name,
        "file": path.name,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "variant": model.variant,
        "width": model.width,
        "residual": model.residual,
        "size": 256,
        "training_data": "synthetic pairs",
        "metrics": {"psnr": 30.5},
        **fields,
    }
    (folder / f"{name}.json").write_text(json.dumps({"weights": [entry]}))
    return path


def test_load_registered_builds_the_registered_model_and_loads_it(user_dir: Path) -> None:
    source = build_cofenet(SHARE, 0.125, residual=True, generator=torch.Generator().manual_seed(13))
    _register(user_dir, source, "tiny")
    entry = list_weights()["tiny"]
    assert (entry.variant, entry.width, entry.residual) == (SHARE, 0.125, True)
    assert entry.metrics == {"psnr": 30.5} and entry.path == user_dir / "tiny.pth"
    model = load_registered("tiny")
    assert (model.variant, model.width, model.residual, model.training) == (
        SHARE,
        0.125,
        True,
        False,
    )
    assert model.weights_entry == entry
    assert _same_weights(source, model)


def test_a_gated_field_model_is_built_with_its_head_and_gate(user_dir: Path) -> None:
    source = build_cofenet(
        "cofe-net", 0.125, field=192, field_gate=True, generator=torch.Generator().manual_seed(3)
    )
    _register(
        user_dir,
        source,
        "gated",
        field_size=192,
        field_deadzone=0.01,
        field_gate=True,
        field_gate_threshold=0.95,
    )
    model = load_registered("gated")
    assert (model.field, model.field_deadzone, model.field_gate) == (192, 0.01, True)
    assert model.field_gate_threshold == 0.95
    assert _same_weights(source, model)


def test_a_spot_head_model_is_built_with_its_head_and_loads_the_heads_weights(
    user_dir: Path,
) -> None:
    source = build_cofenet(
        "cofe-net", 0.125, field=192, spot_head=4, generator=torch.Generator().manual_seed(5)
    )
    assert source.spot is not None
    torch.nn.init.normal_(source.spot.out.weight, 0.0, 0.01)  # a trained head is not zero
    _register(user_dir, source, "spots", field_size=192, spot_head=4, spot_deadzone=0.002)
    model = load_registered("spots")
    assert model.spot is not None and model.spot.out.in_channels == 4
    assert model.spot_deadzone == 0.002
    assert _same_weights(source, model)


def test_a_spot_head_entry_does_not_load_weights_without_the_head(user_dir: Path) -> None:
    source = build_cofenet("cofe-net", 0.125, field=192, generator=torch.Generator().manual_seed(5))
    _register(user_dir, source, "headless", field_size=192, spot_head=4)
    with pytest.raises(WeightsError, match=r"missing keys.*spot\.inp\.weight"):
        load_registered("headless")


def test_sha256_mismatch_is_refused(user_dir: Path) -> None:
    path = _register(user_dir, _model(RES), "tampered")
    torch.save(_model(RES, seed=99).state_dict(), path)
    with pytest.raises(WeightsError, match=r"sha256 .* will not be loaded"):
        load_registered("tampered")


def test_missing_registered_file_says_where_to_put_it(user_dir: Path) -> None:
    path = _register(user_dir, _model(RES), "absent")
    path.unlink()
    with pytest.raises(WeightsError, match=re.escape(f"put absent.pth at {path}")):
        load_registered("absent")


def test_resolve_weights_returns_entries_paths_or_a_helpful_error(
    user_dir: Path, tmp_path: Path
) -> None:
    _register(user_dir, _model(RES), "named")
    plain = tmp_path / "plain.pth"
    torch.save(_model(RES, seed=7).state_dict(), plain)
    assert isinstance(resolve_weights("named"), WeightsEntry)
    assert resolve_weights(str(plain)) == plain
    with pytest.raises(WeightsError, match=r"known: named"):
        resolve_weights("no-such-weights")
    with pytest.raises(WeightsError, match="is a file, not a registered"):
        load_registered(str(plain))


def test_a_registered_file_given_by_path_gets_its_entrys_settings(
    user_dir: Path, tmp_path: Path
) -> None:
    from fundus_batch.enhance import load_model

    source = build_cofenet(
        "cofe-net", 0.125, field=192, field_gate=True, generator=torch.Generator().manual_seed(3)
    )
    path = _register(user_dir, source, "gated", field_size=192, field_gate=True)
    elsewhere = tmp_path / "copied.pt"
    elsewhere.write_bytes(path.read_bytes())
    found = resolve_weights(str(elsewhere))
    assert isinstance(found, WeightsEntry) and found.path == elsewhere.resolve()
    model, name, digest = load_model(str(elsewhere))
    assert (model.field, model.field_gate, name) == (192, True, "gated")
    assert digest == file_sha256(elsewhere) and _same_weights(source, model)


def test_a_registry_json_beside_a_checkpoint_supplies_its_settings(
    user_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "trained"  # as jobs/train_cofenet.py leaves it, not on the search path
    folder.mkdir()
    source = build_cofenet("cofe-net", 0.125, field=192, generator=torch.Generator().manual_seed(4))
    _register(folder, source, "mine", field_size=192, field_deadzone=0.01)
    (folder / "mine.json").rename(folder / "registry.json")
    found = resolve_weights(str(folder / "mine.pth"))
    assert isinstance(found, WeightsEntry) and found.name == "mine"
    model = weights.model_for_entry(found)
    assert (model.field, model.field_deadzone) == (192, 0.01) and _same_weights(source, model)


def test_a_checkpoint_with_a_gate_and_no_entry_is_refused_naming_what_is_missing(
    tmp_path: Path,
) -> None:
    gated = build_cofenet("cofe-net", 0.125, field=192, field_gate=True)
    path = tmp_path / "gated.pt"
    torch.save(gated.state_dict(), path)
    with pytest.raises(WeightsError, match=r"a gated correction head.*registry\.json beside"):
        model_from_weights(path)


def test_evaluation_records_beside_weights_are_not_read_as_registry_files(
    user_dir: Path,
) -> None:
    _register(user_dir, _model(RES), "named")
    (user_dir / "named.eval.json").write_text(json.dumps({"name": "named", "holdout": []}))
    assert list(list_weights()) == ["named"]


def test_the_earlier_shipped_models_load_by_path_with_their_heads() -> None:
    folder = Path(__file__).resolve().parents[2] / "jobs" / "weights"
    v1 = resolve_weights(str(folder / "fundus-cofenet-small-v1.pt"))
    v2 = resolve_weights(str(folder / "fundus-cofenet-small-v2.pt"))
    assert isinstance(v1, WeightsEntry) and isinstance(v2, WeightsEntry)
    assert (v1.name, v1.residual, v1.field_size) == ("fundus-cofenet-small-v1", True, None)
    assert (v2.name, v2.field_size, v2.field_gate) == ("fundus-cofenet-small-v2", 192, False)


def test_user_entries_override_package_entries_of_the_same_name(
    user_dir: Path, tmp_path: Path
) -> None:
    package = weights.PACKAGE_REGISTRY
    package.parent.mkdir()
    package.write_text(
        json.dumps([{"name": "shared-name", "file": "pkg.pth", "sha256": "0" * 64, "variant": RES}])
    )
    assert list_weights()["shared-name"].registry == package
    _register(user_dir, _model(RES), "shared-name")
    assert list_weights()["shared-name"].registry == user_dir / "shared-name.json"


def test_duplicate_names_within_user_registries_are_an_error(user_dir: Path) -> None:
    _register(user_dir, _model(RES), "dup")
    (user_dir / "copy.json").write_text((user_dir / "dup.json").read_text())
    with pytest.raises(WeightsError, match="registered twice"):
        list_weights()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"variant": "unet_256"}, "variant: unknown Cofe-Net variant"),
        ({"sha256": "abc"}, "sha256: malformed sha256"),
        ({"licence": "?"}, "licence: unknown field"),
        ({"name": ""}, "name: String should have at least 1 character"),
        ({"file": 3}, "file: Input should be a valid string"),
        ({"width": "wide"}, "width: Input should be a valid number"),
        ({"width": 1.5}, r"width: Input should be less than or equal to 1 \(got 1\.5\)"),
        ({"residual": "false"}, "residual: Input should be a valid boolean"),
        ({"field_size": "192"}, "field_size: Input should be a valid integer"),
        ({"field_size": True}, "field_size: Input should be a valid integer"),
        ({"field_gate_threshold": 1.0}, r"field_gate_threshold: Input should be less than 1"),
        ({"spot_head": 0}, r"spot_head: Input should be greater than or equal to 1"),
        ({"spot_deadzone": 0.5}, r"spot_deadzone: Input should be less than 0\.5"),
        ({"metrics": {"psnr": "high"}}, r"metrics\.psnr: Input should be a valid number"),
        ({"registry": "/elsewhere.json"}, "registry: unknown field"),
    ],
)
def test_invalid_registry_entries_are_rejected(change: dict, message: str) -> None:
    entry = {"name": "x", "file": "x.pth", "sha256": "a" * 64, "variant": "cofe-net"} | change
    with pytest.raises(WeightsError, match=message):
        WeightsEntry.from_dict(entry)


def test_entry_round_trips_through_its_dict_form() -> None:
    entry = WeightsEntry.from_dict(
        {
            "name": "x",
            "file": "x.pth",
            "sha256": "A" * 64,
            "variant": "cofe-net",
            "width": 0.25,
            "spot_head": 32,
            "spot_deadzone": 0.004,
        }
    )
    assert entry.variant == ATTEN and entry.sha256 == "a" * 64
    assert WeightsEntry.from_dict(entry.to_dict()) == entry


def test_unparseable_registry_file_is_reported(user_dir: Path) -> None:
    (user_dir / "broken.json").write_text("{not json")
    with pytest.raises(WeightsError, match=r"broken\.json"):
        list_weights()


def test_file_sha256_matches_hashlib_on_a_multi_chunk_file(tmp_path: Path) -> None:
    data = bytes(range(251)) * 12_600  # > 3 MiB, not a multiple of the chunk size
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
