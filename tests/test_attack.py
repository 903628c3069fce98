"""Unit tests of l2ul_cli.attack: target draws and targeted L2-PGD."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from l2ul_cli.attack import adversarial_set, draw_targets, pgd_l2_targeted
from l2ul_cli.config import AttackConfig




C = 4  # classes
S = 6  # image side


def _quadrant_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class c = a bright quadrant c on a dim noisy background, 1 x S x S in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (n,), generator=g)
    x = torch.rand(n, 1, S, S, generator=g) * 0.3
    h = S // 2
    for i, c in enumerate(y.tolist()):
        r, q = divmod(c, 2)
        x[i, 0, r * h:(r + 1) * h, q * h:(q + 1) * h] += 0.6
    return x.clamp(0, 1), y


@pytest.fixture(scope="module")
def trained():
    """A tiny conv net with BatchNorm and Dropout, trained for a few steps (seeded)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.2),
        nn.Flatten(), nn.Linear(6 * S * S, C),
    )
    x, y = _quadrant_data(256, seed=1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for _ in range(60):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    xt, yt = _quadrant_data(64, seed=2)
    with torch.no_grad():
        acc = float((net(xt).argmax(1) == yt).float().mean())
    assert acc > 0.9, acc
    for p in net.parameters():
        p.grad = None
    return net, xt, yt


# --------------------------------------------------------------------------- targets


def test_draw_targets_never_the_label_and_shape():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 7, (500,), generator=g)
    for per_copy in (False, True):
        t = draw_targets(labels, 7, 5, g, per_copy=per_copy)
        assert t.shape == (500, 5) and t.dtype == torch.int64
        assert bool((t != labels.view(-1, 1)).all())
        assert int(t.min()) >= 0 and int(t.max()) < 7


@pytest.mark.parametrize("label,num_classes", [(0, 5), (3, 5), (1, 2), (9, 10)])
def test_draw_targets_uniform_over_other_classes(label, num_classes):
    n = 20000
    g = torch.Generator().manual_seed(123 + label)
    t = draw_targets(torch.full((n,), label), num_classes, 1, g).flatten()
    counts = torch.bincount(t, minlength=num_classes).double()
    assert counts[label] == 0
    others = torch.cat([counts[:label], counts[label + 1:]])
    expected = n / (num_classes - 1)
    chi2 = float(((others - expected) ** 2 / expected).sum())
    # dof = C - 2; the 99.99th percentile of chi-square with 8 dof is ~31
    assert chi2 < 35, (chi2, others.tolist())


def test_draw_targets_per_copy_false_repeats_one_target_per_image():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(10) % 5
    t = draw_targets(labels, 5, 8, g, per_copy=False)
    assert bool((t == t[:, :1]).all())
    t2 = draw_targets(labels, 5, 8, torch.Generator().manual_seed(0), per_copy=True)
    assert not bool((t2 == t2[:, :1]).all())  # 80 draws, all in a row equal: vanishingly unlikely


def test_draw_targets_is_seeded_and_needs_two_classes():
    labels = torch.tensor([0, 1, 2, 1])
    a = draw_targets(labels, 3, 4, torch.Generator().manual_seed(5), per_copy=True)
    b = draw_targets(labels, 3, 4, torch.Generator().manual_seed(5), per_copy=True)
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        draw_targets(torch.zeros(2, dtype=torch.long), 1, 1, torch.Generator())


# --------------------------------------------------------------------------- PGD


def _targets_for(y: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return draw_targets(y, C, 1, torch.Generator().manual_seed(seed)).flatten()


@pytest.mark.parametrize("eps", [0.25, 1.0, 3.0])
def test_pgd_stays_in_ball_and_in_pixel_range(trained, eps):
    net, x, y = trained
    t = _targets_for(y)
    adv = pgd_l2_targeted(net, x, t, eps=eps, step_size=0.3, steps=15, generator=torch.Generator().manual_seed(0))
    assert adv.shape == x.shape and adv.dtype == x.dtype
    norms = (adv - x).flatten(1).norm(dim=1)
    assert float(norms.max()) <= eps + 1e-4
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    assert float(norms.mean()) > 0.1 * eps  # it did move


def test_pgd_reaches_targets_with_generous_eps(trained):
    net, x, y = trained
    t = _targets_for(y, seed=3)
    with torch.no_grad():
        before = float((net(x).argmax(1) == t).float().mean())
    adv = pgd_l2_targeted(net, x, t, eps=4.0, step_size=0.5, steps=40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        after = float((net(adv).argmax(1) == t).float().mean())
    assert before < 0.1
    assert after >= 0.9, after


def test_pgd_zero_eps_returns_the_images(trained):
    net, x, y = trained
    adv = pgd_l2_targeted(net, x, _targets_for(y), eps=0.0, steps=5)
    assert torch.allclose(adv, x)


def test_pgd_leaves_model_untouched(trained):
    net, x, y = trained
    net.train()
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in net.named_buffers()}
    try:
        pgd_l2_targeted(net, x[:16], _targets_for(y[:16]), eps=1.0, step_size=0.2, steps=5,
                        generator=torch.Generator().manual_seed(0))
        assert net.training and all(m.training for m in net.modules())
        assert all(p.grad is None for p in net.parameters())
        for n, p in net.named_parameters():
            assert torch.equal(p, params[n]), n
        for n, b in net.named_buffers():  # BN statistics unchanged: the attack ran in eval mode
            assert torch.equal(b, buffers[n]), n
        net.eval()
        pgd_l2_targeted(net, x[:4], _targets_for(y[:4]), steps=2, generator=torch.Generator().manual_seed(0))
        assert not any(m.training for m in net.modules())
        assert all(p.grad is None for p in net.parameters())
    finally:
        net.eval()


def test_pgd_restores_mixed_train_eval_modes(trained):
    """A model in training mode with frozen BatchNorm (a common fine-tuning set-up) keeps it."""
    net, x, y = trained
    net.train()
    net[1].eval()
    try:
        pgd_l2_targeted(net, x[:4], _targets_for(y[:4]), steps=2, generator=torch.Generator().manual_seed(0))
        assert net.training and net[3].training
        assert not net[1].training
    finally:
        net.eval()


def test_pgd_restores_mode_on_error(trained):
    net, x, y = trained
    net.train()
    try:
        with pytest.raises(Exception):
            pgd_l2_targeted(net, x[:4], torch.tensor([0, 1, 2, 99]), steps=2)  # target out of range
        assert all(m.training for m in net.modules())
    finally:
        net.eval()


def test_pgd_is_deterministic_with_seed(trained):
    net, x, y = trained
    t = _targets_for(y)
    kw = dict(eps=1.0, step_size=0.2, steps=8)
    a = pgd_l2_targeted(net, x, t, generator=torch.Generator().manual_seed(7), **kw)
    b = pgd_l2_targeted(net, x, t, generator=torch.Generator().manual_seed(7), **kw)
    c = pgd_l2_targeted(net, x, t, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)  # the random start depends on the seed


@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_chunking_does_not_change_the_result(trained, random_start):
    net, x, y = trained
    x, y = x[:20], y[:20]
    t = _targets_for(y)
    kw = dict(eps=1.0, step_size=0.2, steps=8, random_start=random_start)
    big = pgd_l2_targeted(net, x, t, generator=torch.Generator().manual_seed(1), batch_size=1000, **kw)
    small = pgd_l2_targeted(net, x, t, generator=torch.Generator().manual_seed(1), batch_size=3, **kw)
    assert torch.allclose(big, small, atol=1e-5)



@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("steps", [2, 8])  # fewer than the eager warm-up steps, and more
def test_pgd_cuda_graph_gives_the_eager_result(trained, device, steps):
    """Replaying the step as a CUDA graph runs the same kernels: the same images, also for an
    uneven last chunk; elsewhere the flag is ignored."""
    net, x, y = trained
    net = net.to(device)
    x, t = x[:20].to(device), _targets_for(y[:20]).to(device)
    kw = dict(eps=1.0, step_size=0.2, steps=steps, batch_size=8)
    try:
        eager = pgd_l2_targeted(net, x, t, generator=torch.Generator().manual_seed(3), **kw)
        graphed = pgd_l2_targeted(net, x, t, generator=torch.Generator().manual_seed(3), cuda_graph=True, **kw)
    finally:
        net.to("cpu")
    assert torch.allclose(eager, graphed, atol=1e-5)
    assert not torch.equal(eager, x)


def test_chunk_rows_scale_with_image_size_and_device():
    """More rows per chunk for small images on a GPU (fewer launches), fewer for big images
    (memory), and a set batch_size always wins."""
    a = AttackConfig()
    assert a.chunk_rows((1, 28, 28), "cuda") == 4096 and a.chunk_rows((1, 28, 28), "cpu") == 1024
    assert a.chunk_rows((3, 224, 224), "cuda") == 256 and a.chunk_rows((3, 224, 224), "cpu") == 32
    assert a.chunk_rows((3, 4000, 4000), "cpu") == 1
    assert AttackConfig(batch_size=7).chunk_rows((3, 224, 224), "cuda") == 7

def test_pgd_progress_reports_every_image(trained):
    net, x, y = trained
    done: list[int] = []
    pgd_l2_targeted(net, x[:10], _targets_for(y[:10]), steps=1, batch_size=4, progress=done.append,
                    generator=torch.Generator().manual_seed(0))
    assert done == [4, 4, 2]


def test_adversarial_set_shapes_and_sources(trained):
    net, x, y = trained
    x, y = x[:5], y[:5]
    g = torch.Generator().manual_seed(0)
    x_adv, target, source = adversarial_set(net, x, y, C, n_adv=3, generator=g, eps=0.5, steps=3, step_size=0.2)
    assert x_adv.shape == (15, 1, S, S)
    assert source.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert bool((target != y[source]).all())
    assert bool((target.view(5, 3) == target.view(5, 3)[:, :1]).all())  # one target per image
    assert float((x_adv - x[source]).flatten(1).norm(dim=1).max()) <= 0.5 + 1e-4


def test_noise_start_lies_on_the_segment_to_a_uniform_image_at_eps(trained):
    """advertorch's L2 start (the reference code's): the perturbation towards a uniform random
    image, cut to eps; x + t(u - x) stays in [0, 1], so every row starts at exactly eps. The
    ball start spreads its radii over [0, eps]."""
    model, x, _ = trained
    x = x[:64]
    y = torch.zeros(len(x), dtype=torch.long)
    norms = {}
    for start in ("noise", "ball"):
        out = pgd_l2_targeted(model, x, y, eps=0.5, steps=0, start_at=start, generator=torch.Generator().manual_seed(0))
        norms[start] = (out - x).flatten(1).norm(dim=1)
        assert out.min() >= 0 and out.max() <= 1
    assert torch.allclose(norms["noise"], torch.full_like(norms["noise"], 0.5), atol=1e-4)
    assert norms["ball"].max() <= 0.5 + 1e-5 and norms["ball"].mean() < 0.45


def test_reference_presets_start_from_noise_and_keep_rows_copy_major(trained):
    from l2ul_cli.anchors import build_anchors
    from l2ul_cli.config import attack_config, resolve

    assert attack_config("adv+imp").start == "noise" and attack_config("l2ul").start == "ball"
    model, x, y = trained
    cfg = resolve("adv", "forget")
    anchors = build_anchors(model, x[:3], y[:3], num_classes=C, config=cfg,
                            attack=attack_config("adv", n_adv=4, steps=2, eps=0.05), generator=torch.Generator().manual_seed(0))
    # each run of 3 rows holds one copy of each of the 3 images: the nearest image of each row
    nearest = torch.cdist(anchors.inputs.flatten(1), x[:3].flatten(1)).argmin(1)
    assert nearest.tolist() == [0, 1, 2] * 4
