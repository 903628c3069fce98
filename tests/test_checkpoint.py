"""Unit tests of l2ul_cli.checkpoint: safe reading, metadata, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from l2ul_cli.checkpoint import (
    META_KEY,
    atomic_write,
    clean_state_dict,
    read_checkpoint,
    sha256_file,
    write_checkpoint,
)
from l2ul_cli.errors import CheckpointError, InputError




def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "conv.bias": torch.randn(4, generator=g),
        "bn.running_mean": torch.randn(4, generator=g),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "fc.weight": torch.randn(5, 4, generator=g).half(),
    }


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- round trip


def test_write_read_round_trip_keeps_tensors_and_metadata(tmp_path):
    sd = _state()
    meta = {
        "arch": "test_resnet",
        "num_classes": 5,
        "in_chans": 3,
        "class_names": ["a", "b", "c", "d", "é"],
        "preprocessing": {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.5] * 3},
        "ledger": [{"request": 1, "images": 3}],
    }
    path = tmp_path / "m.safetensors"
    digest = write_checkpoint(path, sd, meta)
    raw = read_checkpoint(path)
    _assert_same_tensors(raw.state_dict, sd)
    for k, v in meta.items():
        assert raw.meta[k] == v
    assert raw.meta["version"] == 1
    assert raw.sha256 == digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert raw.path == path
    # nothing but the checkpoint is left in the folder (no temp file)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_same_checkpoint_written_twice_has_same_bytes(tmp_path):
    # safetensors orders metadata keys at random (a Rust HashMap); the writer sorts them.
    sd, meta = {"w": torch.arange(6.0)}, {"arch": "x", "ledger": [{"id": "é"}]}
    digests = {write_checkpoint(tmp_path / f"{i}.safetensors", sd, meta) for i in range(12)}
    assert len(digests) == 1
    assert read_checkpoint(tmp_path / "0.safetensors").meta["ledger"] == [{"id": "é"}]


def test_write_checkpoint_handles_tied_and_non_contiguous_tensors(tmp_path):
    w = torch.randn(4, 6)
    sd = {"a": w, "b": w, "c": w.t()}  # shared storage and a transposed view
    path = tmp_path / "tied.safetensors"
    write_checkpoint(path, sd, {})
    raw = read_checkpoint(path)
    assert torch.equal(raw.state_dict["a"], w)
    assert torch.equal(raw.state_dict["b"], w)
    assert torch.equal(raw.state_dict["c"], w.t())


def test_unparsable_metadata_is_flagged_not_fatal(tmp_path):
    path = tmp_path / "bad-meta.safetensors"
    save_file({"w": torch.ones(2)}, str(path), metadata={META_KEY: "{not json"})
    raw = read_checkpoint(path)
    assert raw.meta == {"_unparsable": True}
    assert torch.equal(raw.state_dict["w"], torch.ones(2))


def test_foreign_safetensors_without_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.arange(3.0)}, str(path))
    raw = read_checkpoint(path)
    assert raw.meta == {}
    assert torch.equal(raw.state_dict["w"], torch.arange(3.0))


# --------------------------------------------------------------------------- prefixes


def test_clean_state_dict_strips_wrapper_prefixes_in_any_nesting():
    t = torch.zeros(1)
    sd = {
        "module.a.weight": t,
        "_orig_mod.b.weight": t,
        "module._orig_mod.c.weight": t,
        "_orig_mod.module.d.weight": t,
        "module.module._orig_mod.module.e.weight": t,
        "f.module.weight": t,  # only leading prefixes are wrappers
        "g._orig_mod.bias": t,
        "modules.h": t,
    }
    assert list(clean_state_dict(sd)) == [
        "a.weight", "b.weight", "c.weight", "d.weight", "e.weight",
        "f.module.weight", "g._orig_mod.bias", "modules.h",
    ]
    assert all(v is t for v in clean_state_dict(sd).values())


_segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=8)
_key = st.lists(_segment, min_size=1, max_size=4).map(".".join).filter(
    lambda k: not k.startswith(("module.", "_orig_mod.")) and k not in ("module", "_orig_mod")
)
_prefixes = st.lists(st.sampled_from(["module.", "_orig_mod."]), max_size=6).map("".join)


@settings(max_examples=200, deadline=None)
@given(items=st.dictionaries(_key, _prefixes, min_size=1, max_size=6))
def test_clean_state_dict_property(items):
    """For any key and any sequence of wrapper prefixes, cleaning gives the original key."""
    wrapped = {prefix + key: torch.tensor(float(i)) for i, (key, prefix) in enumerate(items.items())}
    cleaned = clean_state_dict(wrapped)
    assert list(cleaned) == list(items)
    for i, key in enumerate(items):
        assert cleaned[key].item() == float(i)


# --------------------------------------------------------------------------- pickles


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "state_dict_ema", None])
def test_pt_wrappers_are_unwrapped(tmp_path, wrapper):
    sd = _state()
    obj = sd if wrapper is None else {wrapper: sd, "epoch": 3, "arch": "resnet", "optimizer": {"lr": 0.1}}
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    raw = read_checkpoint(path)
    _assert_same_tensors(raw.state_dict, sd)
    assert raw.meta == ({} if wrapper is None else {"arch": "resnet"})  # a training file's "arch" key (timm)
    assert raw.weights_used == {None: "state_dict", "state_dict_ema": "ema"}.get(wrapper, "model")
    assert raw.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_pt_with_ddp_prefixes_is_cleaned(tmp_path):
    sd = _state()
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": {"module._orig_mod." + k: v for k, v in sd.items()}}, path)
    _assert_same_tensors(read_checkpoint(path).state_dict, sd)


def test_pt_without_state_dict_is_refused(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match="no state dict"):
        read_checkpoint(path)


class _SystemPayload:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _OpenPayload:
    """Unpickling this creates the marker file through open()."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("payload", [_SystemPayload, _OpenPayload])
@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, payload, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    obj = {"state_dict": {"w": torch.ones(2)}, "extra": payload(marker)}
    if how == "torch.save":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert not marker.exists(), "the pickle's payload ran"
    assert "refused" in info.value.message
    assert "\n" not in info.value.message


def test_garbage_pickle_is_checkpoint_error(tmp_path):
    path = tmp_path / "junk.bin"
    path.write_bytes(b"\x00\x01 definitely not a torch file" * 10)
    with pytest.raises(CheckpointError):
        read_checkpoint(path)


# --------------------------------------------------------------------------- broken files


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.02])
def test_truncated_safetensors_is_checkpoint_error(tmp_path, keep):
    path = tmp_path / "m.safetensors"
    write_checkpoint(path, _state(), {"arch": "x"})
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    with pytest.raises(CheckpointError, match="safetensors"):
        read_checkpoint(path)


@pytest.mark.parametrize("name", ["empty.safetensors", "empty.pt", "empty.pth"])
def test_empty_file_is_checkpoint_error(tmp_path, name):
    path = tmp_path / name
    path.touch()
    with pytest.raises(CheckpointError, match="empty"):
        read_checkpoint(path)


@pytest.mark.parametrize("name", ["weights.npz", "weights.onnx", "weights"])
def test_unknown_suffix_is_checkpoint_error(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"something")
    with pytest.raises(CheckpointError, match="unknown checkpoint type"):
        read_checkpoint(path)


def test_missing_path_is_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_checkpoint(tmp_path / "nope.safetensors")


def test_checkpoint_without_tensors_is_refused(tmp_path):
    path = tmp_path / "none.safetensors"
    save_file({}, str(path))
    with pytest.raises(CheckpointError, match="no tensors"):
        read_checkpoint(path)


# --------------------------------------------------------------------------- timm folders


def _timm_folder(root: Path, sd, *, metadata=None) -> Path:
    root.mkdir()
    cfg = {
        "architecture": "test_resnet",
        "num_classes": 3,
        "num_features": 256,
        "label_names": ["cat", "dog", "bird"],
        "pretrained_cfg": {
            "mean": [0.1, 0.2, 0.3],
            "std": [0.4, 0.5, 0.6],
            "input_size": [3, 32, 48],
            "crop_pct": 0.9,
            "interpolation": "bicubic",
            "first_conv": "conv1.0",
            "classifier": "fc",
        },
    }
    (root / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    save_file(sd, str(root / "model.safetensors"), metadata=metadata)
    return root


def test_timm_folder_is_read_with_metadata(tmp_path):
    sd = {k: v for k, v in _state().items()}
    folder = _timm_folder(tmp_path / "hub", sd)
    raw = read_checkpoint(folder)
    _assert_same_tensors(raw.state_dict, sd)
    assert raw.meta["arch"] == "test_resnet"
    assert raw.meta["class_names"] == ["cat", "dog", "bird"]
    assert raw.meta["preprocessing"] == {
        "mean": [0.1, 0.2, 0.3],
        "std": [0.4, 0.5, 0.6],
        "input_size": [3, 32, 48],
        "crop_pct": 0.9,
        "interpolation": "bicubic",
    }
    assert raw.sha256 == sha256_file(folder / "model.safetensors")


def test_timm_folder_l2ul_metadata_wins_over_config(tmp_path):
    folder = _timm_folder(
        tmp_path / "hub", {"w": torch.ones(1)},
        metadata={META_KEY: json.dumps({"arch": "resnet18", "class_names": ["x", "y", "z"]})},
    )
    raw = read_checkpoint(folder)
    assert raw.meta["arch"] == "resnet18"
    assert raw.meta["class_names"] == ["x", "y", "z"]
    assert raw.meta["preprocessing"]["crop_pct"] == 0.9


def test_folder_without_weights_is_checkpoint_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        read_checkpoint(tmp_path)


def test_folder_with_bad_config_json_is_checkpoint_error(tmp_path):
    folder = _timm_folder(tmp_path / "hub", {"w": torch.ones(1)})
    (folder / "config.json").write_text("{oops", encoding="utf-8")
    with pytest.raises(CheckpointError, match="config.json"):
        read_checkpoint(folder)


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_leaves_nothing_when_writer_raises(tmp_path):
    target = tmp_path / "out.safetensors"

    def writer(tmp):
        Path(tmp).write_bytes(b"half a checkpoint")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(target, writer)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_old_file_when_writer_raises(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def writer(tmp):
        Path(tmp).write_bytes(b"new but broken")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, writer)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_write_writer_that_removes_its_temp_file(tmp_path):
    target = tmp_path / "out.bin"

    def writer(tmp):
        os.unlink(tmp)
        raise ValueError("gave up")

    with pytest.raises(ValueError):
        atomic_write(target, writer)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_replaces_on_success(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"new"))
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_write_into_missing_folder_is_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        atomic_write(tmp_path / "no" / "such" / "out.bin", lambda tmp: None)


def test_write_checkpoint_failure_leaves_no_file(tmp_path):
    target = tmp_path / "m.safetensors"
    with pytest.raises(Exception):
        write_checkpoint(target, {"w": torch.ones(2)}, {"bad": object()})  # not JSON-able
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- hashing


@pytest.mark.parametrize("size", [0, 1, 1 << 20, (1 << 20) + 12345])
def test_sha256_matches_hashlib(tmp_path, size):
    data = torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(size), dtype=torch.uint8)
    path = tmp_path / "blob"
    path.write_bytes(bytes(data.tolist()) if size < 4096 else data.numpy().tobytes())
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
