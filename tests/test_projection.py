"""Projected updates leave a layer's output on the retained inputs unchanged (to first order)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame, StdConv2dSame
from torch import nn

from l2ul_cli.projection import GradientProjector, _columns


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


def _smooth(n: int, seed: int) -> torch.Tensor:
    """Flat grey images of random brightness: their patches span one direction of nine (natural
    images, in the same way but less so, use few of the directions open to them)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 1, 1, 1), generator=g).expand(n, 1, 12, 12).contiguous()


def _step_change(project: bool) -> tuple[float, float]:
    net, retained, odd = _net(), _smooth(64, 1), torch.rand((2, 1, 12, 12), generator=torch.Generator().manual_seed(2))
    proj = GradientProjector(net, retained, energy=0.999) if project else None
    before_r, before_o = net(retained).detach(), net(odd).detach()
    loss = net(odd)[:, 0].sum()
    loss.backward()
    if proj is not None:
        proj.project()
    with torch.no_grad():
        for p in net.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    with torch.no_grad():
        return float((net(retained) - before_r).abs().max()), float((net(odd) - before_o).abs().max())


def test_projected_step_changes_retained_outputs_far_less():
    free_r, free_o = _step_change(False)
    proj_r, proj_o = _step_change(True)
    assert free_r > 0.5 * free_o  # a plain step moves both alike
    assert proj_r < 0.01 * proj_o  # a projected one moves the retained images far less than the others
    assert proj_o > 0


def test_projection_removes_the_retained_component_and_freezes_biases():
    net = _net()
    proj = GradientProjector(net, _smooth(32, 3), energy=0.99)
    net(torch.rand(3, 1, 12, 12)).sum().backward()
    proj.project()
    for layer, (support, m, complement) in proj.bases.items():
        g = layer.weight.grad.reshape(layer.weight.shape[0], -1)
        g = g if support is None else g[:, support]
        # No part left in the retained directions (U itself, or what the complement V leaves out).
        residue = g - (g @ m) @ m.T if complement else g @ m
        assert residue.abs().max() < 1e-5
    assert all(p.grad is None for p in proj.frozen)
    assert any(p is net[1].weight for p in proj.frozen) and any(p is net[0].bias for p in proj.frozen)
    assert "input dimensions over 3 layers" in proj.summary()


def test_grouped_conv_columns_share_one_patch_space():
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    x = torch.rand(2, 4, 5, 5)
    cols = _columns(conv, x)
    assert cols.shape == (9, 2 * 4 * 25)
    # The centre tap of channel c at position p is the pixel itself.
    assert torch.allclose(cols[4].reshape(2, 4, 25), x.reshape(2, 4, 25))


@pytest.mark.parametrize("make, size", [
    (lambda: Conv2dSame(3, 5, 2, stride=1), 1),  # timm ConvNeXt's downsample at a 1x1 map
    (lambda: Conv2dSame(3, 5, 3, stride=2), 5),  # tf_* EfficientNets: odd size, stride 2
    (lambda: StdConv2dSame(3, 5, 3, stride=2, padding="same"), 6),
    (lambda: nn.Conv2d(3, 5, 4, padding="same"), 5),
    (lambda: nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"), 4),
    (lambda: nn.Conv2d(3, 5, 3, padding=2, dilation=2, padding_mode="circular"), 6),
])
def test_columns_are_what_the_convolution_reads(make, size):
    """Weights times columns give the layer's own output, whatever padding the layer does itself."""
    torch.manual_seed(0)
    conv = make()
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        out = conv(x) - (conv.bias.view(1, -1, 1, 1) if conv.bias is not None else 0)
        w = conv.weight
        if isinstance(conv, StdConv2dSame):  # its forward standardises the weights per output channel
            w = F.batch_norm(w.reshape(1, 5, -1), None, None, training=True, eps=conv.eps).reshape_as(w)
        cols = _columns(conv, x)
    mine = (w.reshape(5, -1) @ cols).reshape(5, 2, -1).transpose(0, 1)
    assert mine.shape == out.flatten(2).shape
    assert torch.allclose(mine, out.flatten(2), atol=1e-5)


def test_complement_path_gives_the_same_projection():
    """Layers that retain most directions project with the complement; the result is the same."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 10 * 10, 3)).eval()
    retained = torch.rand(64, 1, 12, 12)  # random patches: nearly all of the 9 directions kept
    proj = GradientProjector(net, retained, energy=0.999)
    support, m, complement = proj.bases[net[0]]
    assert support is None and complement and proj.kept[net[0]][0] > 4
    net(torch.rand(2, 1, 12, 12)).sum().backward()
    g = net[0].weight.grad.reshape(4, -1).clone()
    proj.project()
    # The retained directions are the complement of m within the full basis.
    q, _ = torch.linalg.qr(torch.cat([m, torch.randn(9, 9 - m.shape[1])], 1))
    u = q[:, m.shape[1]:]
    expected = g - (g @ u) @ u.T
    assert torch.allclose(net[0].weight.grad.reshape(4, -1), expected, atol=1e-5)


def test_projection_on_the_support_equals_the_dense_one():
    """A 3x3 convolution on a 1x1 map reads padding in 8 of 9 taps: the projection works on the
    centre taps only, and gives what the full-size one gives; gradients elsewhere pass as they are."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(6, 5, 3, padding=1), nn.Flatten(), nn.Linear(5, 3)).eval()
    retained = torch.rand(40, 6, 1, 1)
    proj = GradientProjector(net, retained, energy=0.9)
    support, m, _ = proj.bases[net[0]]
    assert support.tolist() == [4 + 9 * c for c in range(6)]  # the centre tap of each channel
    cols = _columns(net[0], retained).double()
    vals, vecs = torch.linalg.eigh(cols @ cols.T)
    vals, vecs = vals.flip(0), vecs.flip(1)
    r = int((vals.cumsum(0) / vals.sum() < 0.9).sum()) + 1
    u = vecs[:, :r].float()
    odd = torch.rand(2, 6, 3, 3)  # inputs with energy in every tap
    net[0](odd).sum().backward()
    g = net[0].weight.grad.reshape(5, -1).clone()
    proj.project()
    assert torch.allclose(net[0].weight.grad.reshape(5, -1), g - (g @ u) @ u.T, atol=1e-5)


def test_explicit_lr_drives_projected_updates():
    """--lr is the learning rate of projected steps too: l2ul's projected_lr gives way to it."""
    from l2ul_cli.config import AttackConfig, preset
    from l2ul_cli.unlearn import unlearn

    assert preset("l2ul", lr=3e-3).projected_lr is None
    assert preset("l2ul", lr=3e-3, projected_lr=1e-2).projected_lr == 1e-2

    def moved(**over) -> float:
        net = _net()
        start = [p.detach().clone() for p in net.parameters()]
        images = torch.rand((2, 1, 12, 12), generator=torch.Generator().manual_seed(4))
        targets = (net(images).argmax(1) + 1) % 5  # new labels, not yet met
        cfg = preset("l2ul", max_steps=3, adv_loss="none", importance=False, **over)
        proj = GradientProjector(net, _smooth(32, 5), energy=0.99)
        unlearn(net, images, targets, goal="relabel", num_classes=5, config=cfg, attack=AttackConfig(n_adv=0), projector=proj)
        return sum(float((p.detach() - s).abs().sum()) for p, s in zip(net.parameters(), start))

    assert moved() > 0  # the preset's projected lr moves the weights
    assert moved(lr=0.0) == 0.0  # an explicit lr of zero holds them, projection or not


# 1x1 maps: the centre taps are the support; 2x2 at stride 2: four taps of each channel, which
# the channels_last order interleaves differently; 4x4: all features.
@pytest.mark.parametrize("map_size,stride", [(1, 1), (2, 2), (4, 1)])
@pytest.mark.parametrize("energy", [0.5, 0.99])  # the retained basis or its complement
def test_channels_last_weights_project_as_contiguous_ones(map_size, stride, energy):
    """Channels_last 3x3 weights are projected in their own memory order (no copies); the result
    is the contiguous model's, and the gradient keeps its layout."""
    torch.manual_seed(1)
    plain = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, stride=stride), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).eval()
    cl = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    assert cl[2].weight.is_contiguous(memory_format=torch.channels_last) and not cl[2].weight.is_contiguous()
    retained = torch.rand(30, 4, map_size, map_size)
    grads = []
    for net in (plain, cl):
        proj = GradientProjector(net, retained, energy=energy)
        net(torch.rand(3, 4, 5, 5, generator=torch.Generator().manual_seed(2))).sum().backward()
        proj.project()
        grads.append([net[i].weight.grad for i in (0, 2)])
    for g_plain, g_cl in zip(*grads):
        assert g_cl.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(g_cl, g_plain, rtol=1e-4, atol=1e-5)
