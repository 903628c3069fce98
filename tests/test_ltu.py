"""LTU (:mod:`l2ul_cli.ltu`) on a tiny BatchNorm conv net trained on the digits in about a second."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from l2ul_cli.errors import UsageError
from l2ul_cli.goals import goal_named
from l2ul_cli.ltu import (FEATURES, LTUConfig, draw_queries, harmonize, ltu_unlearn, meta_gradients,
                          train_membership_models)


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )


@pytest.fixture(scope="module")
def data(digits):
    u8, y = digits
    return torch.tensor(u8, dtype=torch.float32).unsqueeze(1) / 255.0, torch.tensor(y)


@pytest.fixture(scope="module")
def trained(data) -> nn.Module:
    return _train(*data)


def _train(x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    """The net after six epochs on the first 1,200 digits (seeded); ~95% on the rest."""
    torch.manual_seed(0)
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(6):
        for idx in torch.randperm(1200, generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval()


def test_harmonize_leaves_no_conflict():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        # Strong conflicts and unequal norms: projecting only one of the two would fail here.
        a = torch.randn(100, generator=g)
        b = 10 ** (2 * torch.rand(1, generator=g) - 1) * (torch.randn(100, generator=g) - 2 * a)
        if torch.dot(a, b) >= 0:
            b = b - 2 * torch.dot(a, b) / a.square().sum() * a  # reflect so that they conflict
        out, fired = harmonize(a, b)
        assert fired
        scale = 1e-5 * out.norm() * (a.norm() + b.norm())
        assert torch.dot(out, a) >= -scale and torch.dot(out, b) >= -scale
    out, _ = harmonize(torch.tensor([1.0, 0.0]), torch.tensor([-2.0, 0.5]))
    assert out[0] > 0 and torch.dot(out, torch.tensor([-2.0, 0.5])) > 0  # by hand: (1/17, 25/34)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    out, fired = harmonize(a, b)
    assert not fired and torch.equal(out, a + b)  # no conflict: the plain sum


def _meta(model, first_order):
    torch.manual_seed(1)
    support, query = torch.rand(4, 1, 16, 16), torch.rand(6, 1, 16, 16)
    wrong, labels = torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 3, 4, 5])
    params = dict(model.named_parameters())
    return meta_gradients(model, params, lambda lg: F.cross_entropy(lg, wrong), support, query, labels,
                          inner_lr=0.5, first_order=first_order)


def test_meta_gradient_flows_through_the_inner_step(trained):
    model = copy.deepcopy(trained)
    before = [p.detach().clone() for p in model.parameters()]
    second, first = _meta(model, False), _meta(model, True)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))  # the meta step only measures
    assert all(g.abs().sum() > 0 for g in second.remember)
    # The second-order gradient differs from the first-order one by the term through g_f.
    differ = sum(float((s - f).abs().sum()) for s, f in zip(second.remember, first.remember))
    total = sum(float(s.abs().sum()) for s in second.remember)
    assert differ > 1e-4 * total

    # The defect the test guards against: a copy updated in place has no path back to θ.
    leaves = list(model.parameters())
    torch.manual_seed(1)
    support, query = torch.rand(4, 1, 16, 16), torch.rand(6, 1, 16, 16)
    grads = torch.autograd.grad(F.cross_entropy(model(support), torch.tensor([1, 2, 3, 4])), leaves)
    fast = copy.deepcopy(model)
    with torch.no_grad():
        for p, g in zip(fast.parameters(), grads):
            p.sub_(0.5 * g)
    cut = torch.autograd.grad(F.cross_entropy(fast(query), torch.arange(6)), leaves, allow_unused=True)
    assert all(g is None for g in cut)


def test_membership_models_differ_and_give_probabilities(trained, data):
    x, y = data
    g = torch.Generator().manual_seed(0)
    mias = train_membership_models(trained, x[:300], y[:300], x[1500:], y[1500:], FEATURES, steps=100, generator=g)
    assert [m.feature for m in mias] == list(FEATURES)
    logits = trained(x[1200:1300]).detach().requires_grad_(True)
    probs = torch.stack([m(logits, y[1200:1300]) for m in mias])
    assert probs.min() >= 0 and probs.max() <= 1
    assert all(not torch.allclose(probs[0], p, atol=1e-4) for p in probs[1:])  # different signals
    probs.sum().backward()  # the forget loss needs their gradient in the logits
    assert logits.grad.abs().sum() > 0
    assert not any(p.requires_grad for m in mias for p in m.parameters())


def test_query_sets_are_disjoint_and_balanced(trained, data):
    x, y = data
    sets = draw_queries(trained, x[:200], y[:200], 20, ("random", "balanced", "hardest"), torch.Generator().manual_seed(0))
    assert [len(s) for s in sets] == [20, 20, 20]
    assert len(torch.cat(sets).unique()) == 60
    assert len(y[sets[1]].unique()) == 10  # two of each class


def test_config_rejects_unknown_names():
    with pytest.raises(UsageError, match="membership feature"):
        LTUConfig(mia_features=("loss", "vibes"))
    with pytest.raises(UsageError, match="strategy"):
        LTUConfig(strategies=("nearest",))
    with pytest.raises(UsageError, match="retain-fraction"):
        LTUConfig(retain_fraction=0.0)


@pytest.mark.parametrize("first_order, holdout", [(False, True), (True, False)])
def test_ltu_forgets_a_few_images_and_keeps_the_rest(trained, data, first_order, holdout):
    x, y = data
    model = copy.deepcopy(trained)
    with torch.no_grad():
        correct = (model(x[:1200]).argmax(1) == y[:1200]).nonzero().squeeze(1)
    forget = correct[torch.tensor([3, 40, 200, 700])]
    rest = torch.ones(1200, dtype=torch.bool)
    rest[forget] = False
    stats = [b.clone() for b in model.buffers()]
    test_before = trained(x[1200:]).argmax(1)
    # Seen with seeds 0-3: the goal met in 48-65 steps, 94-98% of the retain subset kept.
    config = LTUConfig(lr=1e-3, inner_lr=1e-3, max_steps=200, support_size=4, query_size=32,
                       first_order=first_order, mia_steps=100, seed=0)
    result = ltu_unlearn(model, x[forget], y[forget], x[:1200][rest], y[:1200][rest],
                         holdout_x=x[1200:] if holdout else None, holdout_y=y[1200:] if holdout else None,
                         goal=goal_named("forget"), config=config)
    assert result.goal_met and 1 <= result.steps <= 200
    assert (model(x[forget]).argmax(1) != y[forget]).all()
    assert 0 <= result.harmonized <= result.conflicts <= result.steps
    assert result.retain_agreement >= 0.8
    with torch.no_grad():
        assert (model(x[1200:]).argmax(1) == test_before).float().mean() >= 0.8
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))  # BatchNorm statistics untouched
    assert 0 <= result.membership_after <= 1 and len(result.loss_history) == result.steps


def test_ltu_needs_retain_images(trained, data):
    x, y = data
    with pytest.raises(UsageError, match="retain images"):
        ltu_unlearn(copy.deepcopy(trained), x[:2], y[:2], x[:0], y[:0], goal="forget")


def test_query_sets_shrink_to_the_free_memory_and_a_step_that_cannot_fit_is_refused(trained, data, monkeypatch):
    from l2ul_cli import memory

    x, y = data
    per = memory.saved_bytes_per_image(trained, (1, 16, 16), torch.device("cpu"))
    # Room for 2 × 4 support rows and 3 strategies × 10 query rows.
    monkeypatch.setattr(memory, "free_bytes", lambda device: int((8 + 30) * per / memory.SHARE) + per // 2)
    config = LTUConfig(max_steps=2, support_size=4, query_size=32, mia_features=(), seed=0)
    result = ltu_unlearn(copy.deepcopy(trained), x[:4], y[:4], x[100:400], y[100:400], goal="forget", config=config)
    assert any("query sets cut from 32 to 10 images per strategy" in n for n in result.notes), result.notes
    assert result.steps == 2
    monkeypatch.setattr(memory, "free_bytes", lambda device: 4 * per)
    with pytest.raises(UsageError, match="does not fit in this device's free memory"):
        ltu_unlearn(copy.deepcopy(trained), x[:4], y[:4], x[100:400], y[100:400], goal="forget", config=config)
