"""--method ltu through the CLI: its inputs, its report keys, and the refusals around it."""

from __future__ import annotations

import json
import shutil

from conftest import FORGET_IDX, write_pngs
from test_cli import one_error_line, run


def _retain(tmp_path, digits, n=160):
    u8, y = digits
    picks = [i for i in range(0, 1500, 7) if i not in FORGET_IDX][:n]
    return write_pngs(tmp_path / "retain", u8, y, picks)


def _healthy_or_refused(r, report: dict, out) -> None:
    """LTU's meta-updates at its lr 1e-3 swing this 16-pixel net: between two steps the share of
    --retain images predicted as before went 0.26 -> 0.89 -> 0.35, and the run stops at the first
    step where every forget image is misclassified, collapsed or not (seen: 2 of 5 fixture seeds,
    after 6-12 steps). Which happens differs between CPUs; either way the tool must say so: a
    healthy model and a checkpoint, or the health check's refusal (exit 4) and its verdict."""
    agreement = report["retain"]["agreement"]
    if report["health"]["healthy"]:
        assert r.exit_code in (0, 3) and agreement >= 0.75 and out.exists(), r.output
    else:
        assert r.exit_code == 4 and agreement < 0.75 and "looks damaged" in one_error_line(r)


def test_ltu_forgets_and_reports_its_harmonization(digits_checkpoint, digits, forget_dir, heldout_dir, tmp_path):
    rep, out = tmp_path / "r.json", tmp_path / "out.safetensors"
    r = run("forget", digits_checkpoint, "--images", forget_dir, "--method", "ltu", "--retain", _retain(tmp_path, digits),
            "--holdout", heldout_dir, "--out", out, "--report", rep, "--device", "cpu", "-q")
    report = json.loads(rep.read_text())
    assert report["method"] == "ltu" and report["goal_met"] and report["after"]["forget_accuracy"] == 0.0
    ltu = report["ltu"]
    assert 0 <= ltu["harmonized"] <= ltu["conflicts"] <= report["steps"] and ltu["holdout"] == 297
    assert 0.0 <= ltu["membership_after"] <= 1.0 and ltu["retain_fraction"] == 0.3
    assert report["retain"]["n_images"] == 160
    _healthy_or_refused(r, report, out)
    assert out.exists() == (r.exit_code == 0)


def test_ltu_inputs_are_checked_before_any_work(digits_checkpoint, digits, forget_dir, heldout_dir, tmp_path):
    out = tmp_path / "out.safetensors"
    base = ["forget", digits_checkpoint, "--images", forget_dir, "--out", out, "--device", "cpu", "-q"]
    r = run(*base, "--method", "ltu")
    assert r.exit_code == 2 and "--retain" in one_error_line(r)
    retain = _retain(tmp_path, digits, 20)
    r = run(*base, "--holdout", heldout_dir)
    assert r.exit_code == 2 and "--holdout" in one_error_line(r)
    r = run(*base, "--retain-fraction", "0.5", "--retain", retain)
    assert r.exit_code == 2 and "--retain-fraction" in one_error_line(r)
    r = run(*base, "--method", "ltu", "--retain", retain, "--retain-fraction", "1.5")
    assert r.exit_code == 2 and "(0, 1]" in one_error_line(r)
    leaky = tmp_path / "holdout"
    shutil.copytree(heldout_dir, leaky)
    first = next(p for p in forget_dir.rglob("*.png"))
    shutil.copy(first, leaky / first.parent.name / "copy.png")
    r = run(*base, "--method", "ltu", "--retain", retain, "--holdout", leaky)
    assert r.exit_code == 1 and "forget image" in one_error_line(r)
    # Settings LTU does not read are refused, not ignored.
    r = run(*base, "--method", "ltu", "--retain", retain, "--n-adv", "3")
    assert r.exit_code == 2 and "--n-adv" in one_error_line(r)
    r = run(*base, "--method", "ltu", "--retain", retain, "--margin", "2")
    assert r.exit_code == 2 and "--margin" in one_error_line(r)
    r = run(*base, "--method", "pgu", "--index", retain, "--lr", "0.1")
    assert r.exit_code == 2 and "--lr" in one_error_line(r)
    assert not out.exists()


def test_ltu_as_if_never_trained(digits_checkpoint, digits, forget_dir, heldout_dir, tmp_path):
    """--method ltu --objective indistinguishable: the forget images' losses brought to held-out
    ones', not past the boundary; the attacks against --holdout in the report; no holdout, an error."""
    rep, out = tmp_path / "r.json", tmp_path / "out.safetensors"
    base = ["forget", digits_checkpoint, "--images", forget_dir, "--method", "ltu", "--retain", _retain(tmp_path, digits),
            "--objective", "indistinguishable", "--out", out, "--device", "cpu", "-q"]
    r = run(*base)
    assert r.exit_code == 2 and "--holdout" in one_error_line(r) and not out.exists()
    r = run(*base, "--holdout", heldout_dir, "--report", rep, "--allow-partial")
    report = json.loads(rep.read_text())
    _healthy_or_refused(r, report, out)
    ind, before, after = report["indistinguishable"], report["before"], report["after"]
    assert any("held-out images' mean" in n for n in report["notes"])
    if report["health"]["healthy"]:  # more images whose loss looks held out, not misclassified wholesale
        assert after["indistinguishable_share"] > before["indistinguishable_share"]
        assert ind["after"]["forget_accuracy"] >= ind["holdout_accuracy"] - 3 * ind["binomial_noise"]
