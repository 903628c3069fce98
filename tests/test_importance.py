"""Unit tests of l2ul_cli.importance: MAS importance, normalisation and the penalty of Eq. 7."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from l2ul_cli.importance import ImportancePenalty, mas_importance, normalise




def _linear(weight, bias=None) -> nn.Linear:
    w = torch.tensor(weight, dtype=torch.float32)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(torch.tensor(bias, dtype=torch.float32))
    return lin


def _small_convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 3, 3, stride=2), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Flatten(), nn.Linear(3 * 3 * 3, 5),
    )
    with torch.no_grad():  # non-trivial running statistics, so eval and train mode differ
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net


def _loop_importance(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Ω by definition: per image, |d ||model(x)||² / dθ|, averaged (model in eval mode)."""
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for x in images:
        out = model(x.unsqueeze(0)).pow(2).sum()
        for (n, _), g in zip(params.items(), torch.autograd.grad(out, list(params.values()))):
            total[n] += g.abs()
    return {n: t / images.shape[0] for n, t in total.items()}


# --------------------------------------------------------------------------- MAS


def test_mas_hand_computed_linear():
    # g(x) = w·x, d(w·x)²/dw = 2 (w·x) x:  x1 = [1, 1] -> 2·3·[1, 1] = [6, 6];
    # x2 = [2, -1] -> w·x = 0 -> [0, 0]. Mean of |.| = [3, 3].
    model = _linear([[1.0, 2.0]])
    omega = mas_importance(model, torch.tensor([[1.0, 1.0], [2.0, -1.0]]))
    assert set(omega) == {"weight"}
    assert torch.allclose(omega["weight"], torch.tensor([[3.0, 3.0]]))


def test_mas_absolute_value_is_inside_the_mean():
    # x1 = [1, 1] -> w·x = 3 -> grad [6, 6]; x2 = [-1, -1] -> w·x = -3 -> grad 2·(-3)·[-1, -1] = [6, 6]
    # x3 = [1, 0] -> w·x = 1 -> [2, 0];  x4 = [0, -1] -> w·x = -2 -> 2·(-2)·[0, -1] = [0, 4]
    # the signed gradients of x3 and of a batched loss would cancel differently; |.| per sample:
    model = _linear([[1.0, 2.0]], bias=[0.0])
    x = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, 0.0], [0.0, -1.0]])
    omega = mas_importance(model, x)
    assert torch.allclose(omega["weight"], torch.tensor([[(6 + 6 + 2 + 0) / 4, (6 + 6 + 0 + 4) / 4]]))
    # d(w·x+b)²/db = 2(w·x+b): |6| + |-6| + |2| + |-4| = 18, / 4
    assert torch.allclose(omega["bias"], torch.tensor([18 / 4]))


def test_mas_matches_per_image_autograd_on_convnet_with_batchnorm():
    net = _small_convnet()
    x = torch.rand(7, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    net.eval()
    expected = _loop_importance(net, x)
    net.train()  # mas_importance must measure in eval mode whatever the mode it is given
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    omega = mas_importance(net, x, chunk_size=3)
    assert net.training and all(m.training for m in net.modules())
    for n, b in net.named_buffers():
        assert torch.equal(b, buffers[n]), n  # BN statistics untouched
    assert set(omega) == set(expected)
    for n in expected:
        assert omega[n].shape == dict(net.named_parameters())[n].shape
        assert torch.allclose(omega[n], expected[n], rtol=1e-4, atol=1e-6), n
    assert all(p.grad is None for p in net.parameters())


def test_mas_chunk_size_does_not_matter():
    net = _small_convnet(2).eval()
    x = torch.rand(5, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    a = mas_importance(net, x, chunk_size=1)
    b = mas_importance(net, x, chunk_size=64)
    c = mas_importance(net, x)
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-7)
        assert torch.allclose(a[n], c[n], rtol=1e-5, atol=1e-7)


def test_mas_skips_frozen_parameters():
    net = _small_convnet().eval()
    net[0].weight.requires_grad_(False)
    omega = mas_importance(net, torch.rand(2, 2, 8, 8))
    assert "0.weight" not in omega and "0.bias" in omega


class _Untraceable(nn.Module):
    """Data-dependent Python control flow: vmap cannot trace it, the per-image fallback must."""

    def __init__(self):
        super().__init__()
        self.lin = _linear([[1.0, 2.0], [0.5, -1.0]], bias=[0.1, -0.2])

    def forward(self, x):
        out = self.lin(x)
        if out.sum().item() > 0:
            out = out * 2
        return out


def test_mas_fallback_for_models_vmap_cannot_trace():
    model = _Untraceable()
    x = torch.tensor([[1.0, 1.0], [-1.0, -2.0], [0.3, 0.1]])
    done: list[int] = []
    omega = mas_importance(model, x, chunk_size=2, progress=done.append)
    expected = _loop_importance(model.eval(), x)
    for n in expected:
        assert torch.allclose(omega[n], expected[n], rtol=1e-5), n
    assert done == [2, 1]


def test_mas_restores_mixed_modes():
    net = _small_convnet()
    net.train()
    net[1].eval()  # frozen BatchNorm while fine-tuning
    mas_importance(net, torch.rand(2, 2, 8, 8))
    assert net.training and net[4].training
    assert not net[1].training


# --------------------------------------------------------------------------- normalise


def test_normalise_maps_each_tensor_to_unit_range():
    g = torch.Generator().manual_seed(0)
    imp = {
        "a": torch.rand(4, 5, generator=g) * 7 + 3,
        "b": torch.rand(9, generator=g) * 1e-6,
        "c": torch.tensor([-2.0, 0.0, 2.0]),
    }
    out = normalise(imp)
    for n, t in out.items():
        assert t.shape == imp[n].shape
        assert float(t.min()) == 0.0
        assert float(t.max()) == pytest.approx(1.0)
        assert bool(((t >= 0) & (t <= 1)).all())
        # order preserved (min-max is monotone)
        assert torch.equal(t.flatten().argsort(), imp[n].flatten().argsort())
    assert torch.allclose(out["c"], torch.tensor([0.0, 0.5, 1.0]))


def test_normalise_constant_tensor_is_zeros():
    out = normalise({"k": torch.full((3, 3), 4.2), "z": torch.zeros(2), "one": torch.tensor([5.0])})
    for t in out.values():
        assert bool((t == 0).all())


# --------------------------------------------------------------------------- penalty


def test_penalty_zero_at_anchor_and_hand_computed():
    model = _linear([[1.0, 2.0, 3.0]], bias=[0.5])
    importance = {"weight": torch.tensor([[0.0, 1.0, 4.0]]), "bias": torch.tensor([7.0])}
    penalty = ImportancePenalty(model, importance, lam=0.5)
    assert penalty(model).item() == 0.0
    # Ω̂: weight -> [0, 0.25, 1]; bias (constant) -> 0, so 1 - Ω̂ = [1, 0.75, 0] and [1]
    delta_w = torch.tensor([[0.2, -0.4, 10.0]])
    with torch.no_grad():
        model.weight += delta_w
        model.bias -= 0.3
    expected = 0.5 * (1.0 * 0.2 ** 2 + 0.75 * 0.4 ** 2 + 0.0 * 10.0 ** 2 + 1.0 * 0.3 ** 2)
    value = penalty(model)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    # the gradient is 2λ(1 − Ω̂)Δθ
    value.backward()
    assert torch.allclose(model.weight.grad, 2 * 0.5 * torch.tensor([[1.0, 0.75, 0.0]]) * delta_w)
    assert torch.allclose(model.bias.grad, torch.tensor([2 * 0.5 * 1.0 * -0.3]))


def test_penalty_anchor_is_a_copy_and_lambda_is_live():
    model = _linear([[1.0, -1.0]])
    penalty = ImportancePenalty(model, {"weight": torch.tensor([[0.0, 2.0]])}, lam=1.0)
    with torch.no_grad():
        model.weight.add_(1.0)
    assert penalty(model).item() == pytest.approx(1.0)  # only the unimportant weight counts
    penalty.lam /= 2
    assert penalty(model).item() == pytest.approx(0.5)



def test_penalty_anchored_at_another_copy_of_the_network():
    """With ``anchor`` (the network before a stream's earlier requests), θ̃ is its weights: the
    penalty is non-zero from the start and its gradient pulls towards the anchor, even where the
    anchor's parameters need no gradient."""
    first = _linear([[1.0, 2.0]])
    for q in first.parameters():
        q.requires_grad_(False)
    model = _linear([[1.5, 1.0]])
    penalty = ImportancePenalty(model, {"weight": torch.tensor([[0.0, 2.0]])}, lam=1.0, anchor=first)
    assert penalty(model).item() == pytest.approx(0.5 ** 2)  # only the unimportant weight counts
    model.weight.grad = torch.zeros_like(model.weight)
    penalty.add_gradient(model)
    assert torch.allclose(model.weight.grad, torch.tensor([[2 * 0.5, 0.0]]))
    with torch.no_grad():
        first.weight.add_(5.0)
    assert penalty(model).item() == pytest.approx(0.5 ** 2)  # a copy, not a view

def test_penalty_with_mas_importance_on_convnet():
    net = _small_convnet().eval()
    omega = mas_importance(net, torch.rand(3, 2, 8, 8, generator=torch.Generator().manual_seed(4)))
    penalty = ImportancePenalty(net, omega, lam=2.0)
    assert penalty(net).item() == 0.0
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1)
    weights = {n: 1 - w for n, w in normalise(omega).items()}
    expected = 2.0 * sum(float((weights[n] * 0.01).sum()) for n, _ in net.named_parameters())
    assert penalty(net).item() == pytest.approx(expected, rel=1e-4)


def test_add_gradient_matches_backpropagating_the_penalty():
    """The fused gradient the update loop uses is the autograd one, and touches only tensors that
    already have a gradient (frozen ones stay without; in the loop they never move)."""
    net = _small_convnet().eval()
    omega = mas_importance(net, torch.rand(3, 2, 8, 8, generator=torch.Generator().manual_seed(5)))
    penalty = ImportancePenalty(net, omega, lam=1.5)
    gen = torch.Generator().manual_seed(6)
    frozen = next(n for n, _ in net.named_parameters())
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n != frozen:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    value = penalty(net)
    assert value.item() > 0
    value.backward()
    expected = {n: p.grad.clone() for n, p in net.named_parameters()}
    base = {n: torch.randn(p.shape, generator=gen) for n, p in net.named_parameters()}
    for _ in range(2):  # the second time through the buffers the first one left
        for n, p in net.named_parameters():
            p.grad = None if n == frozen else base[n].clone()
        penalty.add_gradient(net)
        for n, p in net.named_parameters():
            if n == frozen:
                assert p.grad is None
            else:
                torch.testing.assert_close(p.grad, base[n] + expected[n], rtol=1e-5, atol=1e-6)
        with torch.no_grad():  # and they follow the weights
            for n, p in net.named_parameters():
                if n != frozen:
                    p.add_(0.05)
        value = penalty(net)
        for p in net.parameters():
            p.grad = None
        value.backward()
        expected = {n: p.grad.clone() for n, p in net.named_parameters()}
