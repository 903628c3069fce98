"""Preprocessing is timm's own: its data config for the architecture, its eval transform, and
the overrides in timm's argument style (--input-size 3 224 224, --crop-pct, --interpolation)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config

from l2ul_cli.data import Sample, load_images
from l2ul_cli.errors import UsageError
from l2ul_cli.models import load_model
from test_cli import one_error_line, run


@pytest.fixture(scope="module")
def plain_resnet(tmp_path_factory):
    """A timm resnet18 state dict with no l2ul metadata: its preprocessing is timm's default."""
    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=10)
    path = tmp_path_factory.mktemp("plain") / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path, net


def _photos(root, sizes):
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(sizes):
        p = root / f"img-{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_images_are_what_timms_eval_transform_makes(plain_resnet, tmp_path):
    path, net = plain_resnet
    m = load_model(path, "resnet18", input_size=(40, 40))
    cfg = resolve_data_config({"input_size": (3, 40, 40)}, model=net)
    assert (m.preprocessing.crop_pct, m.preprocessing.interpolation) == (cfg["crop_pct"], cfg["interpolation"])
    want = create_transform(**cfg, is_training=False)  # timm's, normalised: undo it to compare in pixels
    mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1), torch.tensor(cfg["std"]).view(3, 1, 1)
    paths = _photos(tmp_path, [(57, 41), (40, 40), (123, 300), (33, 90)])
    got = load_images([Sample(p, None) for p in paths], m.preprocessing)
    for i, p in enumerate(paths):
        with Image.open(p) as img:
            ref = want(img.convert("RGB")) * std + mean
        assert torch.allclose(got[i], ref, atol=1e-5), p


def test_overrides_in_timms_style_reach_the_report(plain_resnet, tmp_path, digits):
    path, _ = plain_resnet
    m = load_model(path, "resnet18", input_size=(32, 32), crop_pct=1.0, interpolation="bilinear")
    assert m.preprocessing.input_size == (3, 32, 32) and m.preprocessing.crop_pct == 1.0
    with pytest.raises(UsageError, match="interpolation"):
        load_model(path, "resnet18", interpolation="fancy")
    imgs = tmp_path / "imgs" / "3"  # the class index: the plain state dict names no classes
    imgs.parent.mkdir()
    imgs.mkdir()
    _photos(imgs, [(36, 36), (36, 36)])
    rep = tmp_path / "e.json"
    r = run("eval", path, "--arch", "resnet18", "--images", imgs.parent, "--input-size", "3 32 32", "--crop-pct", "1.0",
            "--interpolation", "bilinear", "--report", rep, "-q")
    assert r.exit_code == 0, r.output
    pre = json.loads(rep.read_text())["preprocessing"]
    assert pre["input_size"] == [3, 32, 32] and pre["crop_pct"] == 1.0 and pre["interpolation"] == "bilinear"
    r = run("eval", path, "--arch", "resnet18", "--images", imgs.parent, "--crop-pct", "9", "-q")
    assert r.exit_code == 2 and "crop_pct" in one_error_line(r)


def test_run_report_states_the_preprocessing(digits_checkpoint, forget_dir, tmp_path):
    from test_cli import FAST

    rep = tmp_path / "r.json"
    r = run("forget", digits_checkpoint, "--images", forget_dir, "--out", tmp_path / "o.safetensors", "--report", rep,
            "--max-steps", "1", "--allow-partial", *FAST)
    assert r.exit_code in (0, 3), r.output
    pre = json.loads(rep.read_text())["preprocessing"]
    assert pre["input_size"][0] == 1 and pre["crop_pct"] == 1.0 and "mean" in pre
