"""Checkpoints as training scripts write them (issue 26): timm train.py and torchvision
references' layouts, the EMA choice, refused pickles, timm's save_for_hf folders with model_args."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from l2ul_cli.checkpoint import read_checkpoint, write_checkpoint
from l2ul_cli.cli import app
from l2ul_cli.errors import CheckpointError, UsageError
from l2ul_cli.models import build_network, load_model


def _net(arch: str = "test_resnet", **kw):
    torch.manual_seed(0)
    return build_network(arch, 10, 1 if not arch.startswith("vit") else 3, model_args=kw or None).eval()


def _ema(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Other weights of the same shapes (an EMA differs from the model's weights)."""
    return {k: (v * 0.5 + 0.01 if v.is_floating_point() else v.clone()) for k, v in sd.items()}


def _timm_train_file(path: Path, *, ema: bool = True, model: bool = True) -> tuple[dict, dict]:
    net = _net()
    sd = net.state_dict()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.rand(2, 1, 16, 16)).sum().backward()
    opt.step()
    ema_sd = _ema(sd)
    obj = {"epoch": 7, "arch": "test_resnet", "state_dict": sd, "optimizer": opt.state_dict(), "version": 2,
           "args": argparse.Namespace(model="test_resnet", lr=0.1, model_ema=ema, model_kwargs={}),
           "metric": np.float64(93.67)}
    if ema:
        obj["state_dict_ema"] = ema_sd
    if not model:
        del obj["state_dict"]
    torch.save(obj, path)
    return sd, ema_sd


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k].float(), b[k].float()) for k in a)


def test_timm_train_layout_loads_with_arch_from_the_file(tmp_path):
    path = tmp_path / "model_best.pth.tar"
    sd, ema_sd = _timm_train_file(path)
    m = load_model(path)  # no arch given: the file's "arch" key
    assert m.arch == "test_resnet" and m.num_classes == 10
    assert m.weights_used == "model" and "state_dict_ema" in m.weights_reason
    assert _same(m.state_dict(), sd)
    e = load_model(path, weights="ema")
    assert e.weights_used == "ema" and _same(e.state_dict(), ema_sd)
    assert not _same(e.state_dict(), sd)
    with pytest.raises(CheckpointError, match="weights"):
        read_checkpoint(path, "nope")  # type: ignore[arg-type]


def test_only_ema_weights_are_used_and_said(tmp_path):
    path = tmp_path / "ema_only.pth.tar"
    _, ema_sd = _timm_train_file(path, model=False)
    raw = read_checkpoint(path)
    assert raw.weights_used == "ema" and "only EMA" in raw.weights_reason
    assert _same(raw.state_dict, ema_sd)
    with pytest.raises(CheckpointError, match="only EMA"):
        read_checkpoint(path, "model")


def test_torchvision_reference_layout_loads(tmp_path):
    net = _net("torchvision:resnet18")
    sd = net.state_dict()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 30)
    ema = torch.optim.swa_utils.AveragedModel(net)  # what the references' --model-ema keeps: module. + n_averaged
    path = tmp_path / "model_3.pth"
    torch.save({"model": sd, "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(), "epoch": 3,
                "args": argparse.Namespace(model="resnet18", lr=0.1), "model_ema": ema.state_dict()}, path)
    m = load_model(path)
    assert m.arch == "torchvision:resnet18" and m.weights_used == "model"
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(m.net(x), net(x), atol=1e-5)
    assert load_model(path, weights="ema").weights_used == "ema"


def test_torch_save_file_without_a_known_suffix_is_read(tmp_path):
    path = tmp_path / "checkpoint-12"
    sd, _ = _timm_train_file(path)
    assert _same(read_checkpoint(path).state_dict, sd)


class _SystemPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_harmful_global_is_refused_named_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": _net().state_dict(), "args": argparse.Namespace(model="test_resnet"),
                "metric": np.float64(1.0), "hook": _SystemPayload(marker)}, path)
    with pytest.raises(CheckpointError, match="refused") as info:
        read_checkpoint(path)
    assert "system" in info.value.message and "\n" not in info.value.message
    assert "Namespace" not in info.value.message.split("allowed")[0]  # the harmless ones are not blamed
    assert not marker.exists(), "the pickle's payload ran"


def test_info_and_report_say_which_weights(tmp_path):
    path = tmp_path / "model_best.pth.tar"
    _timm_train_file(path)
    r = CliRunner().invoke(app, ["info", str(path), "--json"])
    assert r.exit_code == 0, r.output
    weights = json.loads(r.stdout)["weights"]
    assert weights["used"] == "model" and "state_dict_ema" in weights["reason"]


def _vit_folder(root: Path, model_args: dict) -> tuple[Path, torch.nn.Module]:
    net = _net("vit_tiny_patch16_224", **model_args)
    root.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "model.safetensors"))
    cfg = {"architecture": "vit_tiny_patch16_224", "num_classes": 10, "num_features": 192, "model_args": model_args,
           "pretrained_cfg": {"input_size": [3, 224, 224], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                              "crop_pct": 0.9, "interpolation": "bicubic", "classifier": "head"}}
    (root / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return root, net


VIT_ARGS = {"img_size": 32, "patch_size": 4, "depth": 2}


def test_save_for_hf_folder_with_model_args_rebuilds_and_predicts(tmp_path):
    folder, net = _vit_folder(tmp_path / "vit", VIT_ARGS)
    m = load_model(folder)
    assert m.model_args == VIT_ARGS
    assert m.preprocessing.input_size == (3, 32, 32)  # img_size, not pretrained_cfg's 224
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        want = net((x - 0.5) / 0.5)
        assert torch.allclose(m.model(x), want, atol=1e-5)
    out = tmp_path / "out.safetensors"  # the written output carries its model_args
    write_checkpoint(out, m.state_dict(), m.metadata())
    again = load_model(out)
    assert again.model_args == VIT_ARGS
    with torch.no_grad():
        assert torch.allclose(again.model(x), want, atol=1e-5)


def test_model_kwargs_parameter_builds_and_is_stored(tmp_path):
    net = _net("vit_tiny_patch16_224", **VIT_ARGS)
    plain = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(plain))
    with pytest.raises(CheckpointError, match="pos_embed"):
        load_model(plain, "vit_tiny_patch16_224", model_kwargs={"depth": 2})
    m = load_model(plain, "vit_tiny_patch16_224", model_kwargs=VIT_ARGS)
    assert m.preprocessing.input_size == (3, 32, 32) and m.metadata()["model_args"] == VIT_ARGS
    with pytest.raises(UsageError, match="checkpoint_path"):
        load_model(plain, "vit_tiny_patch16_224", model_kwargs={"checkpoint_path": str(plain)})
    with pytest.raises(CheckpointError, match="parameters"):
        load_model(plain, "vit_tiny_patch16_224", model_kwargs={**VIT_ARGS, "embed_dim": 3 << 15, "depth": 64})


def test_weights_option_picks_the_ema_and_says_so(tmp_path):
    path = tmp_path / "model_best.pth.tar"
    _timm_train_file(path)
    r = CliRunner().invoke(app, ["info", str(path), "--weights", "ema", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["weights"]["used"] == "ema"
    only_model = tmp_path / "plain.pth.tar"
    _timm_train_file(only_model, ema=False)
    r = CliRunner().invoke(app, ["info", str(only_model), "--weights", "ema"])
    assert r.exit_code != 0 and r.stderr.startswith("error:") and "EMA" in r.stderr and "Traceback" not in r.stderr


def test_model_kwargs_option_rebuilds_a_vit_in_json_or_timm_style_and_bad_text_is_a_usage_error(tmp_path):
    net = _net("vit_tiny_patch16_224", **VIT_ARGS)
    plain = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(plain))
    base = ["info", str(plain), "--arch", "vit_tiny_patch16_224", "--json"]
    r = CliRunner().invoke(app, [*base, "--model-kwargs", json.dumps(VIT_ARGS)])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["preprocessing"]["input_size"] == [3, 32, 32]
    r = CliRunner().invoke(app, [*base, "--model-kwargs", "img_size=32,patch_size=4, depth=2"])  # timm's style
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["preprocessing"]["input_size"] == [3, 32, 32]
    for bad in ("{img_size: 32", "img_size", "2x=3"):
        r = CliRunner().invoke(app, [*base, "--model-kwargs", bad])
        assert r.exit_code == 2 and "--model-kwargs" in r.stderr and "Traceback" not in r.stderr
