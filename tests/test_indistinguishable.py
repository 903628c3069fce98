"""--objective indistinguishable: each forget image's loss brought to a held-out image's, and
the attacks against --holdout reported before and after."""

from __future__ import annotations

import json
import math

import torch

from l2ul_cli.goals import INDISTINGUISHABLE
from l2ul_cli.objectives import objective_loss
from test_cli import DEFAULT_QUICK, one_error_line, run


def test_the_goal_is_met_within_the_tolerance_of_each_target_loss():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 3.0]])
    labels = torch.zeros(3)
    ce = torch.nn.functional.cross_entropy(logits, labels.long(), reduction="none")
    targets = torch.stack([labels, ce * torch.tensor([1.0, 1.4, 3.0])], dim=1)
    met = INDISTINGUISHABLE.met(logits, targets)
    assert met.tolist() == [True, True, False]
    assert math.isclose(INDISTINGUISHABLE.report_value(logits, targets), 2 / 3, rel_tol=1e-6)
    # The hinge pulls only the image outside the tolerance, towards its target.
    x = logits.clone().requires_grad_(True)
    objective_loss(x, targets, INDISTINGUISHABLE, "indistinguishable", 0.0).backward()
    assert x.grad[:2].abs().sum() == 0 and x.grad[2].abs().sum() > 0
    assert math.isclose(INDISTINGUISHABLE.tolerance, 1.5)


def test_forget_as_if_never_trained_reports_the_attacks(digits_checkpoint, forget_dir, heldout_dir, tmp_path):
    rep = tmp_path / "r.json"
    r = run("forget", digits_checkpoint, "--images", forget_dir, "--objective", "indistinguishable", "--holdout",
            heldout_dir, "--out", tmp_path / "o.safetensors", "--report", rep, *DEFAULT_QUICK)
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    assert report["goal_met"] and report["after"]["indistinguishable_share"] == 1.0
    ind = report["indistinguishable"]
    assert ind["holdout"] == 297 and 0 < ind["binomial_noise"] < 0.5
    for when in ("before", "after"):
        lo, hi = ind[when]["loss_auc_interval"]
        assert lo <= ind[when]["loss_auc"] <= hi
    # Never pushed past the boundary wholesale: the images stay about as accurate as unseen ones.
    assert ind["after"]["forget_accuracy"] >= ind["holdout_accuracy"] - 3 * ind["binomial_noise"]


def test_indistinguishable_needs_a_holdout_and_a_forget_request(digits_checkpoint, forget_dir, tmp_path):
    out = tmp_path / "o.safetensors"
    r = run("forget", digits_checkpoint, "--images", forget_dir, "--objective", "indistinguishable", "--out", out,
            *DEFAULT_QUICK)
    assert r.exit_code == 2 and "--holdout" in one_error_line(r)
    manifest = tmp_path / "fix.csv"
    first = next(forget_dir.rglob("*.png"))
    manifest.write_text(f"path,new_label\n{first},one\n")
    r = run("relabel", digits_checkpoint, "--manifest", manifest, "--objective", "indistinguishable", "--out", out,
            *DEFAULT_QUICK)
    assert r.exit_code == 2 and "indistinguishable" in one_error_line(r)
    assert not out.exists()
