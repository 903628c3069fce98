"""Stand-in images from BatchNorm statistics: they match the statistics and change nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from l2ul_cli.synthesis import has_batchnorm, invert_batchnorm


def _trained_bn_net() -> nn.Module:
    """A small conv net whose BatchNorm statistics come from bright, centred blobs."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    yy, xx = torch.meshgrid(torch.arange(10.0), torch.arange(10.0), indexing="ij")
    blob = torch.exp(-((yy - 4.5) ** 2 + (xx - 4.5) ** 2) / 8)
    data = (blob * torch.rand(256, 1, 1, 1) * 0.8 + 0.1).clamp(0, 1)
    net.train()
    with torch.no_grad():
        bn = net[1]
        bn.momentum = None  # cumulative average: the exact statistics of the data
        for i in range(0, 256, 64):
            net(data[i:i + 64])
    return net.eval()


def _distance(net: nn.Module, x: torch.Tensor) -> float:
    bn, conv = net[1], net[0]
    with torch.no_grad():
        h = conv(x)
    mean, var = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
    return float((mean - bn.running_mean).norm() + (var - bn.running_var).norm())


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_stand_ins_match_batchnorm_statistics_and_leave_the_model_alone(dtype):
    net = _trained_bn_net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = invert_batchnorm(net, 40, (1, 10, 10), 3, steps=150, seed=0, batch_size=20, autocast_dtype=dtype)
    assert x.dtype == torch.float32  # reduced precision inside the model only
    assert x.shape == (40, 1, 10, 10) and 0 <= float(x.min()) and float(x.max()) <= 1
    noise = torch.rand(40, 1, 10, 10, generator=torch.Generator().manual_seed(1))
    assert _distance(net, x) < 0.25 * _distance(net, noise)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    assert all(p.requires_grad for p in net.parameters()) and not net.training


def test_same_seed_same_images_and_progress_counts_steps():
    net = _trained_bn_net()
    calls = []
    a = invert_batchnorm(net, 6, (1, 10, 10), 3, steps=5, seed=3, batch_size=4, progress=calls.append)
    b = invert_batchnorm(net, 6, (1, 10, 10), 3, steps=5, seed=3, batch_size=4)
    assert torch.equal(a, b)
    assert sum(calls) == 10  # 5 steps for each of the two batches


def test_models_without_batchnorm():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    assert not has_batchnorm(net)
    with pytest.raises(ValueError, match="no BatchNorm"):
        invert_batchnorm(net, 2, (1, 2, 2), 2, steps=1)


def test_cuda_out_of_memory_halves_the_batch(monkeypatch):
    net = _trained_bn_net()
    real_forward = net.forward

    def forward(x):
        if x.shape[0] > 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(x)

    monkeypatch.setattr(net, "forward", forward)
    x = invert_batchnorm(net, 20, (1, 10, 10), 3, steps=2, batch_size=32)
    assert x.shape == (20, 1, 10, 10)


def test_dead_leaves_are_flat_discs_in_range_and_seeded():
    from l2ul_cli.synthesis import dead_leaves

    a = dead_leaves(8, (3, 20, 24), torch.Generator().manual_seed(0))
    b = dead_leaves(8, (3, 20, 24), torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (8, 3, 20, 24) and 0 <= float(a.min()) and float(a.max()) <= 1
    # piecewise constant: most neighbouring pixels are equal (inside one disc), unlike noise
    same = (a[..., 1:] == a[..., :-1]).float().mean()
    assert same > 0.6
    # the levels spread over [0, 1], per image and channel
    assert a.flatten(2).std(2).mean() > 0.1


def test_class_dead_leaves_move_towards_their_classes_and_leave_the_model_alone():
    from l2ul_cli.synthesis import class_dead_leaves, dead_leaves

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.GroupNorm(1, 6), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 3)).eval()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = class_dead_leaves(net, 30, (1, 10, 10), 3, steps=40, seed=0, batch_size=16)
    assert x.shape == (30, 1, 10, 10) and 0 <= float(x.min()) and float(x.max()) <= 1
    want = torch.arange(30) % 3
    start = dead_leaves(30, (1, 10, 10), torch.Generator().manual_seed(0))
    with torch.no_grad():
        hit = (net(x).argmax(1) == want).float().mean()
        base = (net(start).argmax(1) == want).float().mean()
    assert hit >= base + 0.2  # seen: 0.40 -> 0.67 (this untrained net cannot reach every class)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    assert all(p.requires_grad for p in net.parameters())


def _tiny_timm(name: str, **kw) -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, num_classes=3, in_chans=1, **kw).eval()


@pytest.mark.parametrize("name,kw,size", [
    ("vit_tiny_patch16_224", {"img_size": 8, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2}, 8),
    ("convnext_atto", {"dims": (8, 12, 16, 20), "depths": (1, 1, 1, 1), "patch_size": 1}, 12),  # all NCHW
    # conv_mlp off: its blocks' LayerNorms read channels-last maps
    ("convnext_atto", {"dims": (8, 12, 16, 20), "depths": (1, 1, 1, 1), "patch_size": 1, "conv_mlp": False}, 12),
], ids=["vit-tokens", "convnext-nchw", "convnext-channels-last"])
def test_input_statistics_are_each_norms_per_channel_input_moments(name, kw, size):
    from timm.layers import LayerNorm2d

    from l2ul_cli.synthesis import input_statistics

    net = _tiny_timm(name, **kw)
    norms = [m for m in net.modules() if isinstance(m, nn.LayerNorm)]
    seen = {m: [] for m in norms}
    hs = [m.register_forward_hook(lambda m, i, o: seen[m].append(i[0].detach())) for m in norms]
    x = torch.rand(10, 1, size, size)
    stats = input_statistics(net, x, batch_size=4)  # three batches summed
    for h in hs:
        h.remove()
    assert set(stats) == set(norms)
    for m in norms:
        a = torch.cat(seen[m])
        # timm's LayerNorm2d (ConvNeXt's stem, downsampling, head) reads NCHW; the rest, channels last.
        a = a.movedim(1, -1) if isinstance(m, LayerNorm2d) else a
        a = a.reshape(-1, a.shape[-1])
        mean, var = stats[m]
        assert mean.shape == (m.normalized_shape[0],)
        torch.testing.assert_close(mean, a.mean(0), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(var, a.var(0, unbiased=False), atol=1e-5, rtol=1e-4)


def test_channel_dimension_of_nchw_norms_when_the_width_equals_the_channels():
    from torchvision.models.convnext import LayerNorm2d as TorchvisionLayerNorm2d

    from l2ul_cli.synthesis import _channel_dim

    square = torch.zeros(2, 8, 8, 8)  # C = H = W: only the layer's kind tells where its channels are
    assert _channel_dim(TorchvisionLayerNorm2d(8), square) == 1
    assert _channel_dim(nn.GroupNorm(2, 8), square) == 1
    assert _channel_dim(nn.BatchNorm2d(8), square) == 1
    assert _channel_dim(nn.LayerNorm(8), square) == 3
    assert _channel_dim(nn.LayerNorm(8), torch.zeros(2, 5, 8)) == 2


def test_inverting_measured_statistics_comes_closer_to_them_and_leaves_the_model_alone():
    from l2ul_cli.synthesis import _channel_statistics, input_statistics, invert_statistics

    net = _tiny_timm("vit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    data = (torch.exp(-((yy - 3.5) ** 2 + (xx - 3.5) ** 2) / 6) * torch.rand(32, 1, 1, 1)).clamp(0, 1)
    targets = input_statistics(net, data)

    def distance(x):
        got = []
        hs = [m.register_forward_hook(lambda m, i, o: got.append(
            sum(((a - b).norm() for a, b in zip(_channel_statistics(i[0], 2), targets[m]))))) for m in targets]
        with torch.no_grad():
            net(x)
        for h in hs:
            h.remove()
        return float(sum(got))

    start = torch.sigmoid(torch.randn((24, 1, 8, 8), generator=torch.Generator().manual_seed(0)) * 0.5)
    x = invert_statistics(net, targets, 24, (1, 8, 8), 3, steps=60, seed=0)
    assert x.shape == (24, 1, 8, 8) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert distance(x) < 0.25 * distance(start)  # seen: 0.022-0.024 of it on seeds 0-2
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())


def test_a_network_without_batchnorm_gets_stand_ins_from_the_request_images_statistics():
    from l2ul_cli.config import resolve
    from l2ul_cli.retention import NO_BATCHNORM, NO_STAND_INS, retained_space

    net = _tiny_timm("vit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2)
    cfg = resolve("l2ul", "forget", synthetic_steps=5)
    request = torch.rand(4, 1, 8, 8)
    space = retained_space(net, config=cfg, image_shape=(1, 8, 8), num_classes=3, stand_ins=20, request=request)
    assert space.kind == "stand_ins" and space.images.shape == (20, 1, 8, 8)
    assert "statistics on the 4 images to unlearn" in space.projector.source and space.note == NO_BATCHNORM
    none = retained_space(net, config=cfg, image_shape=(1, 8, 8), num_classes=3, stand_ins=20)
    assert none.projector is None and none.note == NO_STAND_INS


def test_explicit_request_statistics_on_batchnorm_and_no_norm_layers_at_all():
    from l2ul_cli.config import resolve
    from l2ul_cli.retention import stand_in_images

    request = torch.rand(4, 1, 10, 10)
    cfg = resolve("l2ul", "forget", synthetic_steps=5, synthetic_source="forget-statistics")
    _, made = stand_in_images(_trained_bn_net(), 12, (1, 10, 10), 3, cfg, request=request)
    assert "statistics on the 4 images to unlearn" in made and "no BatchNorm" not in made
    _, made = stand_in_images(_trained_bn_net(), 12, (1, 10, 10), 3, cfg)  # nothing to measure: running statistics
    assert made.endswith("from BatchNorm statistics")
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    images, made = stand_in_images(plain, 12, (1, 10, 10), 3, cfg, request=request)
    assert images.shape == (12, 1, 10, 10) and "no norm layers" in made
