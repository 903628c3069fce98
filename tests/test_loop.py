"""The update loop's parts, and the paper's methods as its reference code runs them."""

from __future__ import annotations

import torch

from l2ul_cli.anchors import AnchorSet
from l2ul_cli.config import UnlearnConfig, attack_config, preset
from l2ul_cli.importance import mas_importance_batch
from l2ul_cli.loop import UpdateLoop
from l2ul_cli.unlearn import ImageSet


def _loop(rows: int, **config) -> UpdateLoop:
    model = torch.nn.Linear(4, 3)
    anchors = AnchorSet(torch.rand(rows, 4), torch.zeros(rows, dtype=torch.long), torch.zeros(rows, 3), 0.0)
    return UpdateLoop(model, UnlearnConfig(**config), anchors=anchors, adv_weight=1.0, generator=torch.Generator().manual_seed(0))


def test_unshuffled_anchor_rows_come_in_order_with_a_partial_last_batch():
    loop = _loop(10, adv_batch_size=4, shuffle_anchors=False)
    got = [loop.next_rows().tolist() for _ in range(4)]
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1, 2, 3]]


def test_shuffled_anchor_rows_cover_every_row_once_per_pass():
    loop = _loop(12, adv_batch_size=4)
    seen = sorted(i for _ in range(3) for i in loop.next_rows().tolist())
    assert seen == list(range(12))


def test_forget_batches_cycle_in_order():
    loop = _loop(4, forget_batch_size=3)
    data = ImageSet(torch.arange(7.0).view(7, 1), torch.arange(7), torch.arange(7))
    got = [loop.next_forget(data).targets.tolist() for _ in range(4)]
    assert got == [[0, 1, 2], [3, 4, 5], [6], [0, 1, 2]]
    assert _loop(4).next_forget(data) is data  # 0: every image every step


def test_share_weighting_weights_each_term_by_its_rows():
    """The reference code: -CE x b_f / (b_f + b_a) + CE_adv x b_a / (b_f + b_a)."""
    idx = torch.arange(6)
    logits = torch.randn(6, 3)
    objective = torch.tensor(2.0)
    summed = _loop(6).with_anchors(objective, logits, idx, n_forget=2)
    shared = _loop(6, weighting="share").with_anchors(objective, logits, idx, n_forget=2)
    adv = summed - objective
    assert torch.allclose(shared, objective * 2 / 8 + adv * 6 / 8)


def test_batch_importance_is_the_gradient_of_the_mean_output_norm():
    """The reference code's MAS estimate on a linear model: |d/dW mean_i ||W x_i|| |, by hand."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2, bias=False).eval()
    x = torch.randn(5, 3)
    got = mas_importance_batch(model, x, batch_size=8)["weight"]
    out = x @ model.weight.detach().T
    want = ((out / out.norm(dim=1, keepdim=True)).T @ x / 5).abs()
    assert torch.allclose(got, want, atol=1e-6)
    assert not model.training  # a copy was measured in train mode; the model's own mode is untouched


def test_paper_presets_are_the_reference_codes_settings():
    ref = preset("adv+imp")
    assert (ref.lr, ref.momentum, ref.weight_decay, ref.bn) == (1e-3, 0.9, 1e-4, "train")
    assert (ref.forget_batch_size, ref.adv_batch_size, ref.shuffle_anchors, ref.weighting) == (32, 256, False, "share")
    assert ref.importance_estimate == "batch" and ref.lam == 0.5 and not ref.adapt_lambda
    for method in ("neggrad", "adv"):
        assert preset(method).bn == "train" and preset(method).weighting == "share"
    att = attack_config("adv+imp")
    assert att.eps == 4.0 and att.per_copy_targets and att.radius((3, 224, 224)) == 4.0
    assert attack_config("l2ul").eps is None and not attack_config("l2ul").per_copy_targets
    ours = preset("l2ul")
    assert (ours.bn, ours.weighting, ours.shuffle_anchors, ours.forget_batch_size) == ("eval", "sum", True, 0)
