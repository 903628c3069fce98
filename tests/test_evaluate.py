"""Metrics against hand-computed cases."""

import math

import pytest
import torch

from l2ul_cli.evaluate import (accuracy, auc, confusion, loss_histogram, membership_inference, per_class_accuracy, streisand,
                               summarize, topk_accuracy)

LOGITS = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0], [2.0, 3.0, 1.0]])
LABELS = torch.tensor([0, 1, 1, 0])  # predictions 0, 1, 2, 1: two right


def test_accuracy_topk_confusion_per_class():
    assert accuracy(LOGITS, LABELS) == 0.5
    assert topk_accuracy(LOGITS, LABELS, 2) == 0.75  # row 3: label 1 has the lowest logit
    assert topk_accuracy(LOGITS, LABELS, 1) == 0.5
    assert confusion(LOGITS.argmax(1), LABELS, 3).tolist() == [[1, 1, 0], [0, 1, 1], [0, 0, 0]]
    assert per_class_accuracy(LOGITS, LABELS, 3) == {0: {"accuracy": 0.5, "n": 2}, 1: {"accuracy": 0.5, "n": 2}}
    s = summarize(LOGITS, LABELS, 3, ["a", "b", "c"])
    assert s["n_images"] == 4 and set(s["per_class"]) == {"a", "b"} and s["top5_accuracy"] == 1.0


@pytest.mark.parametrize("pos,neg,want", [
    ([3, 4], [1, 2], 1.0),
    ([1, 2], [3, 4], 0.0),
    ([1, 3], [2, 4], 0.25),        # pairs won: (3>2) only, of 4
    ([1, 1, 3], [1, 2], 0.5),      # ties count half: (.5 + 0 + .5 + 0 + 1 + 1) / 6
    ([5], [5, 5, 5], 0.5),
])
def test_auc_known_splits(pos, neg, want):
    assert auc(torch.tensor(pos, dtype=torch.float), torch.tensor(neg, dtype=torch.float)) == pytest.approx(want)


def test_auc_matches_pairwise_count_on_random_scores():
    g = torch.Generator().manual_seed(0)
    p, n = torch.randint(0, 5, (40,), generator=g).float(), torch.randint(0, 5, (30,), generator=g).float()
    pairwise = ((p[:, None] > n[None, :]).float() + 0.5 * (p[:, None] == n[None, :]).float()).mean()
    assert auc(p, n) == pytest.approx(float(pairwise))


def test_membership_inference_separable_and_indistinguishable():
    y = torch.zeros(4, dtype=torch.long)
    confident = torch.tensor([[9.0, 0.0]] * 4)
    unsure = torch.tensor([[0.1, 0.0]] * 4)
    mia = membership_inference(confident, y, unsure, y)  # members: low loss, high confidence
    assert (mia["loss_auc"], mia["confidence_auc"]) == (1.0, 1.0)
    assert sum(mia["loss_histogram"]["forget"]) == sum(mia["loss_histogram"]["heldout"]) == 4
    same = membership_inference(unsure, y, unsure, y)
    assert (same["loss_auc"], same["confidence_auc"]) == (0.5, 0.5)
    assert same["loss_histogram"]["forget"] == same["loss_histogram"]["heldout"]


def test_streisand_one_retainer_class_vs_spread():
    before = torch.tensor([0, 0, 0, 0])
    one_class = streisand(before, torch.tensor([1, 1, 1, 1]), 5)
    assert one_class["entropy"] == 0.0 and one_class["max_share"] == 1.0 and one_class["n"] == 4
    # expected under a uniform spread over the 4 other classes: 1 each; observed 4,0,0,0 -> chi2 = 9+1+1+1
    assert one_class["chi2"] == pytest.approx(12.0)
    spread = streisand(before, torch.tensor([1, 2, 3, 4]), 5)
    assert spread["entropy"] == pytest.approx(1.0) and spread["max_share"] == 0.25 and spread["chi2"] == pytest.approx(0.0)
    nothing = streisand(before, before, 5)
    assert nothing["n"] == 0 and math.isnan(nothing["entropy"])


def test_loss_histogram_bins_and_clamps():
    h = loss_histogram(torch.tensor([1e-9, 0.012, 0.05, 500.0]), torch.tensor([1.0]), bins=7, lo=-5.0, hi=2.0)
    assert h["log10_edges"] == [-5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0]
    assert h["forget"] == [1, 0, 0, 2, 0, 0, 1]  # 1e-9 → first bin, 500 → last bin
    assert h["heldout"] == [0, 0, 0, 0, 0, 1, 0]  # loss 1 → log10 0 → the bin [0, 1)
