"""Crafted or damaged metadata and manifests give clean errors, never an internal error (issue 30)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from l2ul_cli import data
from l2ul_cli.checkpoint import META_KEY, read_checkpoint
from l2ul_cli.cli import app
from l2ul_cli.errors import CheckpointError, InputError, UsageError
from l2ul_cli.models import Preprocessing, resolve_preprocessing

FAST = ["--n-adv", "4", "--attack-steps", "10", "--device", "cpu", "-q", "--synthetic-retain", "0"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def clean_error(result, *words: str) -> str:
    assert result.exit_code in (1, 2), result.output
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), result.stderr
    assert "internal error" not in err[0] and "Traceback" not in result.output
    for w in words:
        assert w in err[0], err[0]
    return err[0]


def with_meta(src: Path, dst: Path, text: str) -> Path:
    """``src``'s tensors under the l2ul metadata ``text`` (any string, valid JSON or not)."""
    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(dst), metadata={"format": "pt", META_KEY: text})
    return dst


def meta_of(src: Path) -> dict:
    with safe_open(str(src), "pt") as f:
        return json.loads(f.metadata()[META_KEY])


def patched(src: Path, dst: Path, **pre) -> Path:
    meta = meta_of(src)
    meta["preprocessing"] = {**meta["preprocessing"], **pre}
    return with_meta(src, dst, json.dumps(meta))


@pytest.mark.parametrize("pre, key", [
    ({"input_size": [3, 0, 0]}, "input_size"),
    ({"input_size": [1, 100000, 100000]}, "input_size"),
    ({"input_size": "16"}, "input_size"),
    ({"crop_pct": 0}, "crop_pct"),
    ({"crop_pct": "0.9"}, "crop_pct"),
    ({"mean": ["x", 0.5, 0.5]}, "mean"),
    ({"mean": []}, "mean"),
    ({"std": [0.0]}, "std"),
    ({"interpolation": {"a": 1}}, "interpolation"),
])
def test_bad_preprocessing_names_file_and_key(digits_checkpoint, tmp_path, pre, key):
    ck = patched(digits_checkpoint, tmp_path / "m.safetensors", **pre)
    line = clean_error(run("info", ck), str(ck), f"preprocessing.{key}")
    assert line.startswith("error: ")


@pytest.mark.parametrize("depth", [40, 5000])
def test_deeply_nested_metadata_is_refused(digits_checkpoint, tmp_path, depth):
    meta = meta_of(digits_checkpoint)
    text = json.dumps(meta)[:-1] + ', "extra": ' + "[" * depth + "]" * depth + "}"
    ck = with_meta(digits_checkpoint, tmp_path / "m.safetensors", text)
    with pytest.raises(CheckpointError, match="nested more than"):
        read_checkpoint(ck)
    for cmd in ("info", "history"):
        clean_error(run(cmd, ck), str(ck), f"'{META_KEY}'")


@pytest.mark.parametrize("key, value", [
    ("arch", 5), ("arch", ""), ("class_names", [1, 2]), ("class_names", "abc"), ("ledger", {"a": 1}),
    ("ledger", [1]), ("ledger", [{"before": 3}]), ("ledger", [{"output_weights_sha256": 7}]), ("preprocessing", [1]),
])
def test_bad_metadata_types_name_file_and_key(digits_checkpoint, tmp_path, key, value):
    meta = {**meta_of(digits_checkpoint), key: value}
    ck = with_meta(digits_checkpoint, tmp_path / "m.safetensors", json.dumps(meta))
    for cmd in ("info", "history"):
        clean_error(run(cmd, ck), str(ck), f"'{key}")


def test_bad_timm_config_is_checkpoint_error(tmp_path, digits_checkpoint):
    folder = tmp_path / "model"
    folder.mkdir()
    with_meta(digits_checkpoint, folder / "model.safetensors", json.dumps(meta_of(digits_checkpoint)))
    for cfg in ("[1, 2]", '{"pretrained_cfg": 3}', "[" * 5000 + "]" * 5000):
        (folder / "config.json").write_text(cfg, encoding="utf-8")
        with pytest.raises(CheckpointError, match="config.json"):
            read_checkpoint(folder)


def test_input_size_option_out_of_range_is_usage_error():
    import timm

    net = timm.create_model("test_resnet", pretrained=False, num_classes=2)
    for size in ((0, 0), (5000, 16), ()):
        with pytest.raises(UsageError, match="input"):
            resolve_preprocessing(net, 3, input_size=size)
    with pytest.raises(UsageError, match="--mean"):
        resolve_preprocessing(net, 1, mean=())


def test_valid_preprocessing_round_trips():
    pre = Preprocessing((3, 224, 224), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 0.875, "bicubic")
    assert pre.problem() is None
    assert Preprocessing.from_dict(pre.to_dict()) == pre


def test_planned_memory_is_capped(digits_checkpoint, forget_dir, tmp_path, monkeypatch):
    pre = Preprocessing((3, 4096, 4096), (0.5,) * 3, (0.5,) * 3)
    data.check_planned_memory(10, pre, "test", limit=10 * 3 * 4096 * 4096 * 4)
    with pytest.raises(InputError, match="GiB"):
        data.check_planned_memory(11, pre, "test", limit=10 * 3 * 4096 * 4096 * 4)
    # A metadata input size the machine could not hold: a clear error, nothing written.
    monkeypatch.setattr(data, "physical_memory", lambda: 2 << 30)
    ck = patched(digits_checkpoint, tmp_path / "big.safetensors", input_size=[1, 4096, 4096])
    out = tmp_path / "o.safetensors"
    clean_error(run("forget", ck, "--images", forget_dir, "--out", out, *FAST), "4096", "--input-size")
    assert not out.exists()


def test_long_and_broken_manifest_paths_are_input_errors(digits_checkpoint, forget_dir, tmp_path):
    long = tmp_path / ("m" * 5000 + ".csv")
    clean_error(run("eval", digits_checkpoint, "--manifest", long, "--device", "cpu", "-q"), "unusable manifest path")
    img = next(forget_dir.rglob("*.png"))
    for bad in ("x" * 5000 + ".png", "dir/" + "y" * 300 + ".png", "a\x00b.png"):
        fixes = tmp_path / "fixes.csv"
        fixes.write_text(f"path,label\n{img},three\n{bad},one\n", encoding="utf-8")
        line = clean_error(run("eval", digits_checkpoint, "--manifest", fixes, "--device", "cpu", "-q"), "fixes.csv:3")
        assert len(line) < 600  # never the whole 5,000-character name
    with pytest.raises(InputError, match="unusable"):
        data.scan_folder(tmp_path / ("f" * 5000), None, 10)
    with pytest.raises(InputError, match="unusable checkpoint path"):
        read_checkpoint(tmp_path / ("c" * 5000 + ".safetensors"))
