"""Unit tests of l2ul_cli.models: building, strict loading, preprocessing, pixel wrapper."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from l2ul_cli.checkpoint import write_checkpoint
from l2ul_cli.errors import CheckpointError, UsageError
from l2ul_cli.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CentreTapConv2d,
    PixelClassifier,
    Preprocessing,
    build_network,
    infer_shapes,
    load_model,
    resolve_preprocessing,
    use_centre_taps,
)




def _plain_save(path, net: nn.Module) -> None:
    """A foreign checkpoint: tensors only, no l2ul metadata."""
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))


@pytest.fixture(scope="module")
def resnet_1ch_7cls(tmp_path_factory):
    torch.manual_seed(0)
    net = build_network("test_resnet", 7, 1).eval()
    # Make BN statistics non-trivial so a wrong load would show in the outputs.
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("ckpt") / "plain.safetensors"
    _plain_save(path, net)
    return net, path


# --------------------------------------------------------------------------- loading


def test_load_timm_arch_reads_shapes_from_tensors(resnet_1ch_7cls):
    net, path = resnet_1ch_7cls
    lm = load_model(path, "test_resnet")
    assert lm.arch == "test_resnet"
    assert (lm.num_classes, lm.in_chans) == (7, 1)
    assert lm.class_names is None
    assert lm.class_name(3) == "3"
    # the wrapper too, so code that saves and restores model.training keeps the net in eval
    assert not any(m.training for m in lm.model.modules())
    # timm's config for test_resnet: mean/std 0.5, input 160, crop 0.95; 1 channel
    assert lm.preprocessing == Preprocessing((1, 160, 160), (0.5,), (0.5,), 0.95, "bilinear")
    for k, v in net.state_dict().items():
        assert torch.equal(lm.state_dict()[k], v), k
    x = torch.rand(2, 1, 24, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(lm.model(x), net((x - 0.5) / 0.5), atol=1e-5)
    assert lm.source.sha256 and lm.source.path == path


def test_infer_shapes(resnet_1ch_7cls):
    net, _ = resnet_1ch_7cls
    assert infer_shapes("test_resnet", net.state_dict()) == (7, 1)


def test_load_torchvision_arch_with_one_channel(tmp_path):
    torch.manual_seed(1)
    net = build_network("torchvision:resnet18", 5, 1).eval()
    assert net.conv1.in_channels == 1 and net.fc.out_features == 5
    path = tmp_path / "tv.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}, "epoch": 9}, path)
    lm = load_model(path, "torchvision:resnet18")
    assert lm.arch == "torchvision:resnet18"
    assert (lm.num_classes, lm.in_chans) == (5, 1)
    for k, v in net.state_dict().items():
        assert torch.equal(lm.state_dict()[k], v), k
    # torchvision has no pretrained_cfg: ImageNet statistics, averaged for one channel
    pre = lm.preprocessing
    assert pre.input_size == (1, 224, 224)
    assert pre.mean == pytest.approx((sum(IMAGENET_MEAN) / 3,))
    assert pre.std == pytest.approx((sum(IMAGENET_STD) / 3,))
    x = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = net((x - pre.mean[0]) / pre.std[0])
        assert torch.allclose(lm.model(x), expected, atol=1e-5)


def test_unknown_architecture_is_usage_error(resnet_1ch_7cls):
    _, path = resnet_1ch_7cls
    with pytest.raises(UsageError, match="no_such_net_xyz"):
        load_model(path, "no_such_net_xyz")


# --------------------------------------------------------------------------- strict mismatch


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = exc.value.message
    assert "\n" not in msg
    return msg


def test_wrong_architecture_is_checkpoint_error_naming_a_key(resnet_1ch_7cls):
    _, path = resnet_1ch_7cls
    with pytest.raises(CheckpointError) as info:
        load_model(path, "test_efficientnet")
    msg = _one_line(info)
    assert "test_efficientnet" in msg
    assert "classifier.weight" in msg


def test_missing_key_is_checkpoint_error_naming_it(tmp_path, resnet_1ch_7cls):
    net, _ = resnet_1ch_7cls
    sd = {k: v.contiguous() for k, v in net.state_dict().items() if k != "bn1.weight"}
    path = tmp_path / "missing.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as info:
        load_model(path, "test_resnet")
    msg = _one_line(info)
    assert "missing" in msg and "bn1.weight" in msg and "(1 in all)" in msg


def test_unexpected_key_is_checkpoint_error_naming_it(tmp_path, resnet_1ch_7cls):
    net, _ = resnet_1ch_7cls
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    sd["extra.head.weight"] = torch.zeros(3)
    path = tmp_path / "extra.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as info:
        load_model(path, "test_resnet")
    msg = _one_line(info)
    assert "unexpected" in msg and "extra.head.weight" in msg


def test_shape_mismatch_is_checkpoint_error_naming_key(tmp_path, resnet_1ch_7cls):
    net, _ = resnet_1ch_7cls
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    sd["bn1.bias"] = torch.zeros(sd["bn1.bias"].numel() + 1)
    path = tmp_path / "shape.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as info:
        load_model(path, "test_resnet")
    assert "bn1.bias" in _one_line(info)


def test_missing_num_batches_tracked_is_tolerated(tmp_path, resnet_1ch_7cls):
    net, _ = resnet_1ch_7cls
    sd = {k: v.contiguous() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "nbt.safetensors"
    save_file(sd, str(path))
    lm = load_model(path, "test_resnet")
    assert torch.equal(lm.state_dict()["fc.weight"], net.state_dict()["fc.weight"])


def test_half_precision_checkpoint_is_loaded_as_float(tmp_path, resnet_1ch_7cls):
    net, _ = resnet_1ch_7cls
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in net.state_dict().items()}
    path = tmp_path / "half.safetensors"
    save_file(sd, str(path))
    lm = load_model(path, "test_resnet")
    w = lm.state_dict()["fc.weight"]
    assert w.dtype == torch.float32
    assert torch.equal(w, net.state_dict()["fc.weight"].half().float())


# --------------------------------------------------------------------------- metadata


def test_missing_arch_without_metadata_is_usage_error(resnet_1ch_7cls):
    _, path = resnet_1ch_7cls
    with pytest.raises(UsageError, match="--arch"):
        load_model(path)


def test_metadata_round_trip(tmp_path, resnet_1ch_7cls):
    _, path = resnet_1ch_7cls
    names = ["a", "b", "c", "d", "e", "f", "g"]
    first = load_model(path, "test_resnet", input_size=(20, 24), mean=(0.25,), std=(0.75,))
    first.class_names = names
    first.ledger = [{"request": "r1", "images": 2}]
    out = tmp_path / "with-meta.safetensors"
    write_checkpoint(out, first.state_dict(), first.metadata())
    second = load_model(out)  # no --arch: the checkpoint says it
    assert second.arch == "test_resnet"
    assert second.class_names == names
    assert second.class_name(6) == "g" and second.class_name(7) == "7"
    assert second.preprocessing == first.preprocessing == Preprocessing((1, 20, 24), (0.25,), (0.75,), 0.95, "bilinear")
    assert second.ledger == [{"request": "r1", "images": 2}]
    assert (second.num_classes, second.in_chans) == (7, 1)
    for k, v in first.state_dict().items():
        assert torch.equal(second.state_dict()[k], v)
    # --arch and overrides on the command line win over stored metadata
    third = load_model(out, "test_resnet", mean=(0.1,))
    assert third.preprocessing.mean == (0.1,) and third.preprocessing.std == (0.75,)


def test_class_names_of_the_wrong_length_are_dropped(tmp_path, resnet_1ch_7cls):
    net, _ = resnet_1ch_7cls
    out = tmp_path / "names.safetensors"
    write_checkpoint(out, net.state_dict(), {"arch": "test_resnet", "class_names": ["only", "three", "names"]})
    assert load_model(out).class_names is None


# --------------------------------------------------------------------------- pixel wrapper


def test_pixel_classifier_normalises_inside():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    model = PixelClassifier(net, mean, std)
    x = torch.rand(3, 3, 6, 6)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(model(x), net((x - m) / s), atol=1e-6)
    # mean/std are buffers, not parameters, and never enter the state dict written out
    assert not any("mean" in n or "std" in n for n, _ in model.named_parameters())
    assert set(model.state_dict()) == {"net." + k for k in net.state_dict()}
    # gradients flow to the input (attacks need them)
    x.requires_grad_(True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_pixel_classifier_double_input():
    net = nn.Identity()
    model = PixelClassifier(net, (0.5,), (0.25,))
    x = torch.rand(2, 1, 3, 3, dtype=torch.float64)
    y = model(x)
    assert y.dtype == torch.float64
    assert torch.allclose(y, (x - 0.5) / 0.25)


@pytest.mark.parametrize("kernel,stride,groups", [(3, 1, 1), (3, 2, 1), (5, 1, 1), (3, 1, 4), ((3, 5), 1, 2)])
def test_centre_tap_convolution_is_the_full_one(kernel, stride, groups):
    """On 1x1 maps (and on larger ones, where it falls back) the centre-tap convolution gives the
    full convolution's output, input gradient and weight gradient (zero off the centre)."""
    torch.manual_seed(0)
    k = (kernel, kernel) if isinstance(kernel, int) else kernel
    full = nn.Conv2d(8, 12, k, stride=stride, padding=(k[0] // 2, k[1] // 2), groups=groups)
    centre = nn.Conv2d(8, 12, k, stride=stride, padding=(k[0] // 2, k[1] // 2), groups=groups)
    centre.load_state_dict(full.state_dict())
    assert use_centre_taps(centre) == 1 and type(centre) is CentreTapConv2d
    for size in (1, 5):
        x = torch.randn(3, 8, size, size, requires_grad=True)
        x2 = x.detach().clone().requires_grad_(True)
        y, y2 = full(x), centre(x2)
        torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-6)
        w = torch.randn(y.shape)
        (y * w).sum().backward()
        (y2 * w).sum().backward()
        torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(centre.weight.grad, full.weight.grad, rtol=1e-5, atol=1e-6)
        if size == 1:
            off = torch.ones(k, dtype=torch.bool)
            off[k[0] // 2, k[1] // 2] = False
            assert (centre.weight.grad[:, :, off] == 0).all()
        full.zero_grad()
        centre.zero_grad()


def test_only_same_padded_plain_convolutions_take_centre_taps():
    class Custom(nn.Conv2d):
        pass

    net = nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1),  # yes
        nn.Conv2d(2, 2, 1),  # 1x1 already
        nn.Conv2d(2, 2, 3),  # no padding: a 1x1 map would not even fit
        nn.Conv2d(2, 2, 3, padding=2, dilation=2),
        nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(2, 2, 4, padding=2),  # even kernel
        Custom(2, 2, 3, padding=1),
    )
    keys = set(net.state_dict())
    assert use_centre_taps(net) == 1
    assert [type(m) is CentreTapConv2d for m in net] == [True] + [False] * 6
    assert set(net.state_dict()) == keys
    # the pixel wrapper applies it: the benchmark's ResNet-18 at 28x28 runs its last stage so
    model = PixelClassifier(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1)), (0.5,), (0.5,))
    assert type(model.net[0]) is CentreTapConv2d


# --------------------------------------------------------------------------- preprocessing


@pytest.fixture(scope="module")
def timm_net():
    return build_network("test_resnet", 4, 3, meta=True)


def test_resolve_preprocessing_defaults_from_model_config(timm_net):
    pre = resolve_preprocessing(timm_net, 3)
    assert pre == Preprocessing((3, 160, 160), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0.95, "bilinear")


def test_resolve_preprocessing_overrides(timm_net):
    pre = resolve_preprocessing(timm_net, 3, input_size=(3, 40, 48), mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    assert pre.input_size == (3, 40, 48)
    assert pre.mean == (0.1, 0.2, 0.3) and pre.std == (0.4, 0.5, 0.6)
    assert pre.crop_pct == 0.95
    assert resolve_preprocessing(timm_net, 3, input_size=(64,)).input_size == (3, 64, 64)
    assert resolve_preprocessing(timm_net, 3, input_size=(32, 16)).input_size == (3, 32, 16)
    # a single value is broadcast to every channel
    assert resolve_preprocessing(timm_net, 3, mean=(0.3,)).mean == (0.3, 0.3, 0.3)


def test_resolve_preprocessing_averages_rgb_stats_for_grey_model(timm_net):
    pre = resolve_preprocessing(timm_net, 1, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert pre.input_size == (1, 160, 160)
    assert pre.mean == pytest.approx((sum(IMAGENET_MEAN) / 3,))
    assert pre.std == pytest.approx((sum(IMAGENET_STD) / 3,))


def test_resolve_preprocessing_stored_then_overrides(timm_net):
    stored = {"input_size": [3, 28, 28], "mean": [0.2, 0.3, 0.4], "std": [0.5, 0.6, 0.7], "crop_pct": 1.0,
              "interpolation": "bicubic"}
    pre = resolve_preprocessing(timm_net, 3, stored)
    assert pre == Preprocessing((3, 28, 28), (0.2, 0.3, 0.4), (0.5, 0.6, 0.7), 1.0, "bicubic")
    pre = resolve_preprocessing(timm_net, 3, stored, input_size=(3, 30, 30), std=(1.0, 1.0, 1.0))
    assert pre == Preprocessing((3, 30, 30), (0.2, 0.3, 0.4), (1.0, 1.0, 1.0), 1.0, "bicubic")
    # incomplete stored settings fall back to the model's config
    assert resolve_preprocessing(timm_net, 3, {"mean": [0.9, 0.9, 0.9]}).mean == (0.5, 0.5, 0.5)


def test_resolve_preprocessing_wrong_channel_count_is_usage_error(timm_net):
    with pytest.raises(UsageError, match="--mean"):
        resolve_preprocessing(timm_net, 3, mean=(0.1, 0.2))
    with pytest.raises(UsageError, match="--std"):
        resolve_preprocessing(timm_net, 3, std=(0.1, 0.2, 0.3, 0.4))


def test_preprocessing_dict_round_trip():
    pre = Preprocessing((1, 12, 14), (0.3,), (0.7,), 0.8, "bicubic")
    d = pre.to_dict()
    assert d == {"input_size": [1, 12, 14], "mean": [0.3], "std": [0.7], "crop_pct": 0.8, "interpolation": "bicubic"}
    assert Preprocessing.from_dict(d) == pre
