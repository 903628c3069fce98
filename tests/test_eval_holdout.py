"""eval --forget --holdout: the attacks against images never trained on, with the AUC's interval,
and each forget image's loss percentile among theirs."""

from __future__ import annotations

import json

import torch

from l2ul_cli.evaluate import auc_interval, per_image_losses
from test_cli import one_error_line, run


def test_percentiles_place_each_loss_among_the_holdout_losses():
    held_logits = torch.zeros(100, 2)
    held_logits[:, 0] = torch.linspace(-5, 5, 100)  # losses spread over a wide range
    held = torch.zeros(100, dtype=torch.long)
    forget_logits = torch.tensor([[9.0, 0.0], [0.0, 0.0], [-9.0, 0.0]])
    rows = per_image_losses(forget_logits, torch.zeros(3, dtype=torch.long), held_logits, held)
    low, mid, high = (r["holdout_percentile"] for r in rows)
    assert low < 5 and 40 < mid < 60 and high > 95
    assert rows[0]["loss"] < rows[1]["loss"] < rows[2]["loss"]


def test_auc_interval_narrows_with_more_images():
    wide, narrow = auc_interval(0.6, 8, 20), auc_interval(0.6, 800, 2000)
    assert wide[0] < narrow[0] < 0.6 < narrow[1] < wide[1]
    assert 0.0 <= wide[0] and wide[1] <= 1.0


def test_eval_with_holdout_reports_the_reference_and_each_image(digits_checkpoint, forget_dir, heldout_dir, tmp_path):
    rep = tmp_path / "e.json"
    r = run("eval", digits_checkpoint, "--images", heldout_dir, "--forget", forget_dir, "--holdout", heldout_dir,
            "--report", rep, "-q")
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    assert report["mia"]["reference"] == "--holdout" and report["mia"]["n_reference"] == 297
    lo, hi = report["mia"]["loss_auc_interval"]
    assert lo <= report["mia"]["loss_auc"] <= hi
    rows = report["forget"]["images"]
    assert len(rows) == 8 and all(0 <= x["holdout_percentile"] <= 100 for x in rows)
    # Training images the model still remembers: their losses sit low among unseen images'.
    assert sum(x["holdout_percentile"] for x in rows) / 8 < 50
    r = run("eval", digits_checkpoint, "--images", heldout_dir, "--holdout", heldout_dir, "-q")
    assert r.exit_code == 2 and "--forget" in one_error_line(r)
    r = run("eval", digits_checkpoint, "--images", heldout_dir, "--forget", forget_dir, "--holdout", forget_dir, "-q")
    assert r.exit_code == 1 and "forget image" in one_error_line(r)
