"""The command line as users and outside checks call it: exit codes, files, JSON keys."""

from __future__ import annotations

import base64
import hashlib
import html
import importlib.util
import io
import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from l2ul_cli.cli import app

# A quick attack; no stand-in images (their synthesis is the slowest phase on a CPU) except where
# a test is about the default method's accuracy, which uses DEFAULT_QUICK.
DEFAULT_QUICK = ["--n-adv", "4", "--attack-steps", "10", "--device", "cpu", "-q"]
FAST = [*DEFAULT_QUICK, "--synthetic-retain", "0"]


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result) -> str:
    err = result.stderr.strip().splitlines()
    assert len(err) == 1, result.stderr
    assert err[0].startswith("error:")
    assert "Traceback" not in result.output
    return err[0]


def test_forget_writes_checkpoint_and_report(digits_checkpoint, forget_dir, tmp_path):
    before = sha(digits_checkpoint)
    out, rep = tmp_path / "out.safetensors", tmp_path / "report.json"
    r = run("forget", digits_checkpoint, "--images", forget_dir, "--out", out, "--report", rep, *FAST)
    assert r.exit_code == 0, r.output
    assert sha(digits_checkpoint) == before  # the input is never changed
    report = json.loads(rep.read_text())
    for key in ("goal_met", "before", "after", "steps", "seconds", "method", "device", "input_sha256", "output_sha256"):
        assert key in report
    assert report["goal_met"] is True
    assert report["before"]["forget_accuracy"] == 1.0
    assert report["after"]["forget_accuracy"] == 0.0
    assert report["method"] == "l2ul"  # the default, chosen by the benchmark
    assert report["device"] == "cpu"
    assert report["config"]["attack"]["batch_size"] == 1024  # the chunk the CPU ran, not "0: automatic"
    assert isinstance(report["steps"], int) and report["steps"] >= 1
    assert all(isinstance(v, float) for v in report["seconds"].values())
    assert {"attack", "importance", "updates"} <= set(report["seconds"])
    assert report["input_sha256"] == before
    assert report["output_sha256"] == sha(out)
    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["l2ul"])
    assert meta["arch"] == "test_resnet"
    assert meta["class_names"][3] == "three"
    assert meta["preprocessing"]["input_size"] == [1, 16, 16]
    assert meta["ledger"][-1]["command"] == "forget"


def test_forgotten_images_are_misclassified_by_the_written_model(digits_checkpoint, forget_dir, tmp_path):
    out = tmp_path / "o.safetensors"
    assert run("forget", digits_checkpoint, "--images", forget_dir, "--out", out, *FAST).exit_code == 0
    rep = tmp_path / "e.json"
    r = run("eval", out, "--images", forget_dir, "--report", rep, "--device", "cpu", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads(rep.read_text())["accuracy"] == 0.0


def test_default_output_name_and_refusal_to_overwrite(digits_checkpoint, forget_dir, tmp_path):
    ck = tmp_path / "m.safetensors"
    ck.write_bytes(digits_checkpoint.read_bytes())
    assert run("forget", ck, "--images", forget_dir, *FAST).exit_code == 0
    out = tmp_path / "m-forget.safetensors"
    assert out.exists()
    stamp = sha(out)
    r = run("forget", ck, "--images", forget_dir, *FAST)
    assert r.exit_code == 1
    assert "already exists" in one_error_line(r)
    assert sha(out) == stamp
    assert run("forget", ck, "--images", forget_dir, "--force", *FAST).exit_code == 0


def test_output_equal_to_input_is_refused_even_with_force(digits_checkpoint, forget_dir):
    before = sha(digits_checkpoint)
    r = run("forget", digits_checkpoint, "--images", forget_dir, "--out", digits_checkpoint, "--force", *FAST)
    assert r.exit_code == 2
    assert "overwrite the input" in one_error_line(r)
    assert sha(digits_checkpoint) == before


def test_goal_not_met_writes_no_checkpoint_unless_allowed(digits_checkpoint, forget_dir, tmp_path):
    out, rep = tmp_path / "o.safetensors", tmp_path / "r.json"
    r = run("forget", digits_checkpoint, "--images", forget_dir, "--out", out, "--report", rep, "--max-steps", "0", *FAST)
    assert r.exit_code == 3
    assert not out.exists()
    report = json.loads(rep.read_text())
    assert report["goal_met"] is False and report["output"] is None
    r = run("forget", digits_checkpoint, "--images", forget_dir, "--out", out, "--max-steps", "0", "--allow-partial", *FAST)
    assert r.exit_code == 3
    assert out.exists()


def test_flat_folder_forgets_current_predictions(digits_checkpoint, digits, tmp_path):
    from conftest import write_pngs

    u8, y = digits
    flat = write_pngs(tmp_path / "flat", u8, y, [5, 6, 7, 8], by_class=False)
    rep = tmp_path / "r.json"
    r = run("forget", digits_checkpoint, "--images", flat, "--out", tmp_path / "o.safetensors", "--report", rep, *FAST)
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    assert report["before"]["forget_accuracy"] == 1.0  # labels are the model's own predictions
    assert {row["label_source"] for row in report["images"]} == {"prediction"}


def test_json_goes_to_stdout(digits_checkpoint, forget_dir, tmp_path):
    r = run("forget", digits_checkpoint, "--images", forget_dir, "--out", tmp_path / "o.safetensors", "--json", *FAST)
    assert r.exit_code == 0
    assert json.loads(r.stdout)["goal_met"] is True


@pytest.mark.parametrize("method", ["adv", "adv+imp", "l2ul"])
def test_every_forget_method_meets_the_goal(method, digits_checkpoint, forget_dir, tmp_path):
    rep = tmp_path / "r.json"
    r = run("forget", digits_checkpoint, "--images", forget_dir, "--out", tmp_path / "o.safetensors",
            "--report", rep, "--method", method, *FAST)
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    assert report["method"] == method and report["after"]["forget_accuracy"] == 0.0


def test_neggrad_meets_the_goal_or_stops_cleanly_on_divergence(digits_checkpoint, forget_dir, tmp_path):
    """NEGGRAD's −CE is unbounded below: once most images flip, their loss runs away and on
    some CPUs the logits overflow before the last image flips (seen on this fixture). Either
    way the tool must end cleanly: goal met, or one `error:` line and nothing written."""
    out, rep = tmp_path / "o.safetensors", tmp_path / "r.json"
    r = run("forget", digits_checkpoint, "--images", forget_dir, "--out", out, "--report", rep, "--method", "neggrad", *FAST)
    if r.exit_code == 0:
        assert json.loads(rep.read_text())["after"]["forget_accuracy"] == 0.0
    else:
        assert r.exit_code == 1
        assert "loss became" in one_error_line(r)
        assert not out.exists() and not rep.exists()


def test_same_seed_same_bytes_on_cpu(digits_checkpoint, forget_dir, tmp_path, monkeypatch):
    from l2ul_cli.checkpoint import read_checkpoint

    # The ledger records the time of the request; SOURCE_DATE_EPOCH pins it.
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    a, b, c = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    assert run("forget", digits_checkpoint, "--images", forget_dir, "--out", a, "--seed", "3", *FAST, "--precision", "fp32").exit_code == 0
    assert run("forget", digits_checkpoint, "--images", forget_dir, "--out", b, "--seed", "3", *FAST, "--precision", "fp32").exit_code == 0
    assert sha(a) == sha(b)
    assert run("forget", digits_checkpoint, "--images", forget_dir, "--out", c, "--seed", "4", *FAST, "--precision", "fp32").exit_code == 0
    ta, tc = read_checkpoint(a).state_dict, read_checkpoint(c).state_dict
    assert any(not torch.equal(ta[k], tc[k]) for k in ta)  # the seed matters


def test_precision_option_reaches_the_attack(digits_checkpoint, forget_dir, tmp_path):
    from l2ul_cli.checkpoint import read_checkpoint

    outs = {}
    for choice in ("auto", "fp32", "bf16"):
        out, rep = tmp_path / f"o-{choice}.safetensors", tmp_path / f"r-{choice}.json"
        r = run("forget", digits_checkpoint, "--images", forget_dir, "--out", out, "--report", rep, "--precision", choice, *FAST)
        assert r.exit_code == 0, r.output
        outs[choice] = (json.loads(rep.read_text())["precision"], read_checkpoint(out).state_dict)
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert outs["fp32"][0] == "fp32" and outs["bf16"][0].startswith("bfloat16 autocast (attack, stand-ins)")
    # auto on a CPU: fp32, or where bf16 is native whichever a timing chose (the report says so);
    # either way the same weights as that explicit choice.
    chosen = "bf16" if outs["auto"][0].startswith("bfloat16") else "fp32"
    assert outs["auto"][0] == "fp32" or "(auto: bf16 timed at" in outs["auto"][0]
    assert same(outs["auto"][1], outs[chosen][1])
    assert not same(outs["bf16"][1], outs["fp32"][1])  # the precision reaches the attack


# Two of the eight forget digits are 4s, so there are blends to distil as well as shifted copies.
@pytest.mark.parametrize("option,values", [("--shift-copies", ("0", "8")), ("--mix-copies", ("0", "8")),
                                           ("--adv-weight", ("1", "50")), ("--margin", ("0", "1"))])
def test_update_options_reach_the_report_and_the_weights(option, values, digits_checkpoint, forget_dir, tmp_path):
    from l2ul_cli.checkpoint import read_checkpoint

    key = option.removeprefix("--").replace("-", "_")
    outs = {}
    for value in values:
        out, rep = tmp_path / f"o-{value}.safetensors", tmp_path / f"r-{value}.json"
        r = run("forget", digits_checkpoint, "--images", forget_dir, "--out", out, "--report", rep,
                option, value, *FAST, "--precision", "fp32")
        assert r.exit_code == 0, r.output
        report = json.loads(rep.read_text())
        assert report["options"][key] == float(value) and report["config"]["unlearn"][key] == float(value)
        outs[value] = read_checkpoint(out).state_dict
    a, b = (outs[v] for v in values)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def _break_after_updates(monkeypatch):
    """Every image in class 0 once the updates are done: a run gone wrong, on any CPU."""
    import l2ul_cli.unlearn as unlearn_module

    real = unlearn_module._descend

    def descend_then_break(loop, *a, **kw):
        real(loop, *a, **kw)
        head = [m for m in loop.model.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            head.bias[0] += 1e4

    monkeypatch.setattr(unlearn_module, "_descend", descend_then_break)


def test_report_warns_when_the_stand_ins_lose_their_predictions(digits_checkpoint, forget_dir, tmp_path, monkeypatch):
    """The projection holds the stand-ins, so losing most of them means the model broke elsewhere
    (here: broken on purpose after the updates, so that the check does not depend on this CPU's
    numerics); the report gives the share and warns."""
    _break_after_updates(monkeypatch)
    rep = tmp_path / "r.json"
    r = run("forget", digits_checkpoint, "--images", forget_dir, "--out", tmp_path / "o.safetensors", "--report", rep,
            *DEFAULT_QUICK, "--synthetic-retain", "32", "--allow-partial")
    assert r.exit_code == 4, r.output  # damaged: written only because of --allow-partial
    report = json.loads(rep.read_text())
    assert report["stand_ins"]["n_images"] == 32 and report["stand_ins"]["agreement"] < 0.5
    assert any(n.startswith("warning: only") and "stand-in images" in n for n in report["notes"])


def test_report_gives_the_distillation_weight_for_the_number_of_images(digits_checkpoint, digits, tmp_path):
    """The weight grows with the images (0.8 per image past 16); the report says which one ran."""
    from conftest import write_pngs

    images = write_pngs(tmp_path / "twenty", *digits, range(20))
    rep = tmp_path / "r.json"
    run("forget", digits_checkpoint, "--images", images, "--out", tmp_path / "o.safetensors", "--report", rep,
        *FAST, "--max-steps", "0")
    report = json.loads(rep.read_text())
    assert report["n_images"] == 20 and report["config"]["unlearn"]["adv_weight"] == 16.0


def test_pickle_checkpoint_with_prefixes_and_index_folders(digits_checkpoint, digits, tmp_path):
    from conftest import write_pngs
    from l2ul_cli.checkpoint import read_checkpoint

    sd = read_checkpoint(digits_checkpoint).state_dict
    pt = tmp_path / "m.pth"
    torch.save({"state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}, "epoch": 3}, pt)
    u8, y = digits
    # No class names in a plain .pth: folders are class indices; "7" alone is class 7.
    idx = [i for i in range(200) if int(y[i]) == 7][:3]
    images = write_pngs(tmp_path / "byindex", u8, y, idx, names=[str(i) for i in range(10)])
    rep = tmp_path / "r.json"
    r = run("forget", pt, "--images", images, "--arch", "test_resnet", "--input-size", "16,16",
            "--mean", "0.5", "--std", "0.5", "--out", tmp_path / "o.safetensors", "--report", rep, *FAST)
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    assert {row["label"] for row in report["images"]} == {"7"}
    assert report["before"]["forget_accuracy"] == 1.0 and report["goal_met"] is True


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/l2ul-evil-marker"),))


def test_unsafe_pickle_is_refused_and_never_runs(forget_dir, tmp_path):
    marker = Path("/tmp/l2ul-evil-marker")
    marker.unlink(missing_ok=True)
    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps({"state_dict": _Evil()}))
    r = run("forget", bad, "--images", forget_dir, "--arch", "test_resnet", *FAST)
    assert r.exit_code == 1
    assert "refused" in one_error_line(r)
    assert not marker.exists()
    assert not list(tmp_path.glob("*.safetensors"))


@pytest.mark.parametrize("case", ["missing_checkpoint", "missing_folder", "empty_folder", "no_images", "unknown_class", "wrong_arch", "empty_file"])
def test_bad_input_is_one_line_and_writes_nothing(case, digits_checkpoint, forget_dir, tmp_path):
    ck, images, extra = digits_checkpoint, forget_dir, []
    if case == "missing_checkpoint":
        ck = tmp_path / "nope.safetensors"
    elif case == "missing_folder":
        images = tmp_path / "nope"
    elif case == "empty_folder":
        images = tmp_path / "empty"
        images.mkdir()
    elif case == "no_images":
        images = tmp_path / "txt"
        images.mkdir()
        (images / "a.txt").write_text("x")
    elif case == "unknown_class":
        images = tmp_path / "unk"
        (images / "eleven").mkdir(parents=True)
        (images / "eleven" / "a.png").write_bytes((forget_dir / "three").iterdir().__next__().read_bytes())
    elif case == "wrong_arch":
        extra = ["--arch", "test_efficientnet"]
    elif case == "empty_file":
        ck = tmp_path / "empty.safetensors"
        ck.write_bytes(b"")
    out = tmp_path / "out.safetensors"
    r = run("forget", ck, "--images", images, "--out", out, *extra, *FAST)
    assert r.exit_code in (1, 2)
    line = one_error_line(r)
    assert len(line) < 400
    assert not out.exists()


@pytest.mark.parametrize("args,msg", [
    (["forget", "x.safetensors", "--method", "foo"], "invalid value for '--method'"),
    (["relabel", "x.safetensors"], "missing option '--manifest'"),
    (["forget"], "missing argument 'CHECKPOINT'"),
    (["bogus"], "no such command 'bogus'"),
    (["eval", "x.safetensors", "--no-such-flag"], "no such option"),
    (["forget", "x.safetensors", "--images", ".", "--adv-weight", "-1"], "--adv-weight must not be negative"),
    (["relabel", "x.safetensors", "--manifest", "m.csv", "--margin", "-0.5"], "--margin must not be negative"),
    (["forget", "x.safetensors", "--images", ".", "--method", "adv", "--margin", "1"], "--margin shapes the bounded objective only"),
    (["forget", "x.safetensors", "--images", ".", "--method", "adv+imp", "--shift-copies", "8"], "--shift-copies adds distillation anchors"),
    (["forget", "x.safetensors", "--images", ".", "--adv-loss", "ce", "--mix-copies", "4"], "--mix-copies adds distillation anchors"),
])
def test_usage_errors_are_one_line_exit_2(args, msg):
    r = run(*args)
    assert r.exit_code == 2
    assert msg in one_error_line(r)


def test_help_still_works():
    assert run("--help").exit_code == 0
    r = run("forget", "--help")
    assert r.exit_code == 0 and "--config" in r.output


@pytest.mark.parametrize("command", ["relabel", "eval"])
@pytest.mark.parametrize("case", ["missing_checkpoint", "missing_manifest", "missing_column", "label_out_of_range",
                                  "truncated_checkpoint", "new_label_is_current"])
def test_bad_input_other_commands(command, case, digits_checkpoint, forget_dir, tmp_path):
    png = next((forget_dir / "three").iterdir())
    ck, rows = digits_checkpoint, f"path,label,new_label\n{png},three,four\n"
    if case == "missing_checkpoint":
        ck = tmp_path / "nope.safetensors"
    elif case == "missing_column":
        rows = f"file,new_label\n{png},four\n"
    elif case == "label_out_of_range":
        rows = f"path,label,new_label\n{png},three,10\n"
    elif case == "truncated_checkpoint":
        ck = tmp_path / "cut.safetensors"
        ck.write_bytes(digits_checkpoint.read_bytes()[:5000])
    elif case == "new_label_is_current":
        if command == "eval":
            pytest.skip("eval has no new label")
        rows = f"path,label,new_label\n{png},three,3\n"
    manifest = tmp_path / "m.csv"
    if case != "missing_manifest":
        manifest.write_text(rows)
    before = sha(digits_checkpoint)
    out = ["--out", tmp_path / "o.safetensors"] if command == "relabel" else []
    r = run(command, ck, "--manifest", manifest, "--report", tmp_path / "r.json", *out, "--device", "cpu", "-q")
    assert r.exit_code == 1, r.output
    line = one_error_line(r)
    assert str(ck if "checkpoint" in case else manifest) in line
    if case in ("missing_column", "label_out_of_range", "new_label_is_current"):
        assert f"{manifest}:" in line  # and the line of the CSV
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "o.safetensors").exists()
    assert not list(tmp_path.glob(".*.tmp"))
    assert sha(digits_checkpoint) == before


@pytest.mark.parametrize("where", ["read_only_folder", "proc"])
def test_unwritable_output_folder_is_refused_before_any_work(where, digits_checkpoint, forget_dir, tmp_path):
    if where == "read_only_folder":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders; the /proc case covers root")
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
    else:
        folder = Path("/proc")
        if not folder.is_dir():
            pytest.skip("no /proc on this system")
    r = run("forget", digits_checkpoint, "--images", forget_dir, "--out", folder / "o.safetensors", *FAST)
    assert r.exit_code == 1
    assert "not writable" in one_error_line(r)
    assert "attack" not in r.output  # refused before the work started
    assert list(folder.glob("*.safetensors")) == []


def test_relabel_from_manifest(digits_checkpoint, digits, tmp_path):
    from conftest import DIGIT_NAMES, write_pngs

    u8, y = digits
    idx = [11, 22, 33, 44]
    write_pngs(tmp_path / "imgs", u8, y, idx, by_class=False)
    rows = ["path,new_label,label"] + [f"imgs/img-{i:04d}.png,{DIGIT_NAMES[(int(y[i]) + 1) % 10]},{DIGIT_NAMES[int(y[i])]}" for i in idx]
    (tmp_path / "fixes.csv").write_text("\ufeff" + "\n".join(rows) + "\n\n")
    rep = tmp_path / "r.json"
    page = tmp_path / "r.html"
    r = run("relabel", digits_checkpoint, "--manifest", tmp_path / "fixes.csv", "--out", tmp_path / "o.safetensors",
            "--report", rep, "--html", page, *FAST)
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    assert report["before"]["relabel_accuracy"] == 0.0
    assert report["after"]["relabel_accuracy"] == 1.0
    assert report["goal_met"] is True
    assert [row["after"] for row in report["images"]] == [row["new_label"] for row in report["images"]]
    # Each image's thumbnail row in the HTML report: label, before, after, new label.
    expected = [(Path(i["path"]).name, i["label"], i["before"], i["after"], i["new_label"]) for i in report["images"]]
    assert _thumbnail_rows(page.read_text(), 4) == expected
    assert "4 of 4 images are now predicted as their new label." in page.read_text()


def test_manifest_paths_outside_its_folder_are_reported(digits_checkpoint, forget_dir, tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    png = next((forget_dir / "three").iterdir())
    (lists / "m.csv").write_text(f"path,label\n../forget/three/{png.name},three\n")
    rep = tmp_path / "e.json"
    r = run("eval", digits_checkpoint, "--manifest", lists / "m.csv", "--report", rep, "--device", "cpu", "-q")
    assert r.exit_code == 0, r.output
    (note,) = json.loads(rep.read_text())["notes"]
    assert "outside the manifest's folder" in note and "m.csv:2" in note


def test_eval_metrics_compare_and_mia(digits_checkpoint, forget_dir, heldout_dir, tmp_path):
    out = tmp_path / "o.safetensors"
    assert run("forget", digits_checkpoint, "--images", forget_dir, "--out", out, *FAST).exit_code == 0
    rep = tmp_path / "e.json"
    r = run("eval", out, "--images", heldout_dir, "--compare", digits_checkpoint, "--forget", forget_dir,
            "--report", rep, "--device", "cpu", "-q")
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    assert 0.0 <= report["accuracy"] <= report["top5_accuracy"] <= 1.0
    assert report["n_images"] == 297
    assert set(report["per_class"]) <= set(__import__("conftest").DIGIT_NAMES)
    assert report["forget"]["forget_accuracy"] == 0.0
    assert {"loss_auc", "confidence_auc", "loss_histogram", "loss_auc_interval"} <= set(report["mia"])
    assert report["mia"]["reference"] == "--images"  # without --holdout the attacks compare with --images
    assert 0.0 <= report["compare"]["agreement"] <= 1.0
    assert len(report["compare"]["changed"]) == round((1 - report["compare"]["agreement"]) * 297)


def test_default_method_keeps_accuracy_elsewhere(digits_checkpoint, forget_dir, heldout_dir, tmp_path):
    """The point of the tool: the forget images flip, held-out accuracy mostly stays.
    The fixture model differs a little between CPUs (SIMD order in training). Measured: 93.6%
    before; l2ul 83.8% / 74.7% after on two machines; ADV (the paper's) collapses, which the
    health check refuses (exit 4; written here only with --allow-partial)."""
    def after(method: str, code: int, *extra: str) -> dict:
        rep = tmp_path / f"{method}.json"
        r = run("forget", digits_checkpoint, "--images", forget_dir, "--out", tmp_path / f"{method}.safetensors",
                "--eval", heldout_dir, "--report", rep, "--method", method, *DEFAULT_QUICK, *extra)
        assert r.exit_code == code, r.output
        return json.loads(rep.read_text())

    ours, adv = after("l2ul", 0), after("adv", 4, "--allow-partial")
    assert ours["healthy"] is True and adv["healthy"] is False
    assert ours["projection"].startswith("256 stand-in images from BatchNorm statistics")
    assert adv["projection"] is None  # the paper's methods as published
    assert ours["after"]["forget_accuracy"] == 0.0
    assert ours["before"]["accuracy"] > 0.85
    assert ours["after"]["accuracy"] >= 0.6
    assert ours["after"]["accuracy"] > adv["after"]["accuracy"] + 0.3
    assert ours["eval"]["after"]["n_images"] == 297


def test_retain_images_keep_accuracy_elsewhere(digits_checkpoint, digits, forget_dir, heldout_dir, tmp_path):
    from conftest import write_pngs

    u8, y = digits
    retain = write_pngs(tmp_path / "retain", u8, y, range(1000, 1300), by_class=False)  # no labels needed
    reps = {}
    for name, extra in (("plain", ["--synthetic-retain", "0"]), ("retain", ["--retain", retain])):
        reps[name] = tmp_path / f"{name}.json"
        r = run("forget", digits_checkpoint, "--images", forget_dir, "--out", tmp_path / f"{name}.safetensors",
                "--eval", heldout_dir, "--report", reps[name], *extra, *FAST)
        assert r.exit_code == 0, r.output
    plain, kept = (json.loads(reps[n].read_text()) for n in ("plain", "retain"))
    assert kept["goal_met"] and kept["after"]["forget_accuracy"] == 0.0
    assert kept["projection"].startswith("300 --retain images") and plain["projection"] is None
    assert kept["retain"]["n_images"] == 300 and kept["retain"]["agreement"] >= 0.9
    assert kept["options"]["retain"] == [str(retain)]
    print(plain["after"]["accuracy"], kept["after"]["accuracy"])
    assert kept["after"]["accuracy"] >= plain["after"]["accuracy"]


def test_markdown_and_html_reports_with_figures(digits_checkpoint, forget_dir, heldout_dir, tmp_path):
    md, page = tmp_path / "r.md", tmp_path / "r.html"
    r = run("forget", digits_checkpoint, "--images", forget_dir, "--out", tmp_path / "o.safetensors",
            "--eval", heldout_dir, "--markdown", md, "--html", page, *FAST)
    assert r.exit_code == 0, r.output
    text = md.read_text()
    assert text.startswith("# l2ul forget") and "goal met" in text
    assert "| forget accuracy | 100.0% | 0.0% |" in text
    assert text.count(".png`") == 8  # one row per image
    assert "## Membership inference" in text and "| after |" in text
    doc = page.read_text()
    assert doc.startswith("<!doctype html>") and "<h1>l2ul forget</h1>" in doc
    assert "<td>forget accuracy</td><td>100.0%</td><td>0.0%</td>" in doc
    assert doc.count("<code>img-") == 8
    if importlib.util.find_spec("matplotlib") is None:
        assert "<img" not in doc and "![" not in text
        return
    for name in ("labels", "accuracy", "mia"):
        for stem in ("r",):
            png = tmp_path / f"{stem}-{name}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(r-{name}.png)" in text


def test_eval_html_report(digits_checkpoint, forget_dir, heldout_dir, tmp_path):
    page = tmp_path / "e.html"
    r = run("eval", digits_checkpoint, "--images", heldout_dir, "--forget", forget_dir, "--html", page, "--device", "cpu", "-q")
    assert r.exit_code == 0, r.output
    doc = page.read_text()
    assert "<h1>l2ul eval</h1>" in doc and "Membership inference" in doc
    if importlib.util.find_spec("matplotlib") is not None:
        assert doc.count('<img src="data:image/png;base64,') == 2  # accuracy and MIA, embedded
        assert not list(tmp_path.glob("e-*.png"))  # an HTML report writes nothing beside it


def _thumbnail_rows(doc: str, columns: int) -> list[tuple[str, ...]]:
    """The HTML Images table's rows that start with an embedded thumbnail: (file name, *cells)."""
    cells = "".join(r"<td>([^<]*)</td>" for _ in range(columns))
    return re.findall(r'<tr><td><img class="thumb" src="data:image/png;base64,[A-Za-z0-9+/=]+" alt="[^"]*">'
                      rf"<code>([^<]*)</code></td>{cells}</tr>", doc)


def test_html_report_stands_alone_and_the_summary_names_every_file(digits_checkpoint, forget_dir, heldout_dir, tmp_path):
    """--html is one file to send: every figure and a thumbnail of each forget image embedded (no
    link to a local file), the version, the command line and a sentence reading each figure; the
    terminal summary names every file written and the health check."""
    from l2ul_cli import __version__
    from l2ul_cli.health import describe

    out, rep, md, page = (tmp_path / n for n in ("o.safetensors", "r.json", "r.md", "r.html"))
    r = run("forget", digits_checkpoint, "--images", forget_dir, "--out", out, "--report", rep, "--eval", heldout_dir,
            "--markdown", md, "--html", page, *[a for a in FAST if a != "-q"])
    assert r.exit_code == 0, r.output
    report, doc, text = json.loads(rep.read_text()), page.read_text(), md.read_text()
    links = re.findall(r'(?:src|href)="([^"]*)"', doc)
    assert links and all(link.startswith("data:image/png;base64,") for link in links)
    expected = [(Path(i["path"]).name, i["label"], i["before"], i["after"]) for i in report["images"]]
    assert len(expected) == 8 and _thumbnail_rows(doc, 3) == expected
    thumb = re.search(r'class="thumb" src="data:image/png;base64,([^"]+)"', doc).group(1)
    assert Image.open(io.BytesIO(base64.b64decode(thumb))).size == (64, 64)  # 16-px digits, scaled up
    cmd = report["command_line"]
    assert cmd.startswith("l2ul forget ") and f"--html {page}" in cmd and "--eval" in cmd
    for document in (doc, text):
        assert f"l2ul {__version__}" in document
    assert f"<pre>{html.escape(cmd)}</pre>" in doc and f"```text\n{cmd}\n```" in text
    reading = "The accuracy on the forget images went from 100.0% to 0.0%, while accuracy on the --eval images went"
    assert reading in text and html.escape(reading) in doc
    auc = report["eval"]["after"]["mia"]["loss_auc"]
    assert f"AUC {auc:.2f}: " in text and "0.5" in text.split(f"AUC {auc:.2f}: ")[1].split("\n")[0]
    assert re.search(r"\d of 8 images now get a class other than their label", text)
    pngs = [tmp_path / f"r-{n}.png" for n in ("labels", "accuracy", "mia")] if importlib.util.find_spec("matplotlib") else []
    (line,) = [line for line in r.stdout.splitlines() if line.startswith("wrote: ")]
    assert line == "wrote: " + ", ".join(str(f) for f in (out, rep, md, *pngs, page))
    assert set(tmp_path.iterdir()) == {forget_dir, out, rep, md, *pngs, page}  # nothing written unnamed
    assert describe(report["health"]) in r.stdout.splitlines()


def test_eval_summary_names_its_files(digits_checkpoint, forget_dir, heldout_dir, tmp_path):
    rep, md = tmp_path / "e.json", tmp_path / "e.md"
    r = run("eval", digits_checkpoint, "--images", heldout_dir, "--forget", forget_dir, "--report", rep,
            "--markdown", md, "--device", "cpu")
    assert r.exit_code == 0, r.output
    pngs = [tmp_path / f"e-{n}.png" for n in ("accuracy", "mia")] if importlib.util.find_spec("matplotlib") else []
    assert r.stdout.splitlines()[-1] == "wrote: " + ", ".join(str(f) for f in (rep, md, *pngs))
    report, text = json.loads(rep.read_text()), md.read_text()
    assert report["command_line"].startswith("l2ul eval ") and report["command_line"] in text
    assert f"Top-1 accuracy {100 * report['accuracy']:.1f}% on 297 images; per class it ranges from" in text


def test_report_into_missing_folder_is_refused_before_the_work(digits_checkpoint, forget_dir, tmp_path):
    r = run("forget", digits_checkpoint, "--images", forget_dir, "--out", tmp_path / "o.safetensors",
            "--html", tmp_path / "nope" / "r.html", *FAST)
    assert r.exit_code == 1
    assert "does not exist" in one_error_line(r)
    assert not (tmp_path / "o.safetensors").exists()


def test_original_anchors_a_stream_and_is_checked(digits_checkpoint, digits, forget_dir, tmp_path):
    """--original: recorded in the report and (as a hash) in the ledger; a checkpoint the ledger
    did not begin from gets a warning; another network is one error line and nothing written."""
    from conftest import write_pngs

    u8, y = digits
    first = tmp_path / "first.safetensors"
    assert run("forget", digits_checkpoint, "--images", forget_dir, "--out", first, *FAST).exit_code == 0
    second_dir = write_pngs(tmp_path / "second", u8, y, [12, 45, 310, 620])
    before = sha(digits_checkpoint)
    out, rep = tmp_path / "second.safetensors", tmp_path / "second.json"
    r = run("forget", first, "--images", second_dir, "--keep", forget_dir, "--original", digits_checkpoint,
            "--out", out, "--report", rep, *FAST)
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    assert report["original"]["sha256"] == before == sha(digits_checkpoint)  # read, never changed
    assert report["goal_met"] and report["keep"]["after"]["forget_accuracy"] == 0.0
    assert not any("--original" in n for n in report["notes"])
    with safe_open(str(out), "pt") as f:
        ledger = json.loads(f.metadata()["l2ul"])["ledger"]
    assert ledger[-1]["settings"]["original_sha256"] == before and str(digits_checkpoint) not in json.dumps(ledger)

    rep2 = tmp_path / "third.json"
    r = run("forget", out, "--images", second_dir, "--original", first, "--out", tmp_path / "third.safetensors",
            "--report", rep2, *FAST)
    assert r.exit_code == 0, r.output
    assert any("is not the checkpoint this ledger began from" in n for n in json.loads(rep2.read_text())["notes"])

    other = Path(__file__).parent.parent / "examples" / "fashion-mnist-lcnet_050.safetensors"
    bad = tmp_path / "bad.safetensors"
    r = run("forget", first, "--images", second_dir, "--original", other, "--out", bad, *FAST)
    assert r.exit_code != 0 and "not the same network" in one_error_line(r)
    assert not bad.exists()


def test_forget_and_relabel_share_one_option_set_except_what_differs():
    """The two commands are built from one declaration: any option added to one and not the
    other must be named here on purpose."""
    import click

    from l2ul_cli.cli import app
    from typer.main import get_command

    commands = get_command(app).commands
    flags = {name: {o for p in commands[name].params if isinstance(p, click.Option) for o in p.opts}
             for name in ("forget", "relabel")}
    assert flags["forget"] - flags["relabel"] == {"--images", "--holdout", "--update-index"}  # LTU and PGU forget only
    assert flags["relabel"] - flags["forget"] == set()
    methods = {name: next(p for p in commands[name].params if p.name == "method").type.choices for name in flags}
    assert set(methods["forget"]) ^ set(methods["relabel"]) == {"neggrad", "correct", "ltu", "pgu"}


def test_help_has_panels_examples_and_a_short_flag():
    r = run("forget", "-h")
    assert r.exit_code == 0
    text = r.stdout
    for panel in ("Inputs & outputs:", "Method:", "Attack:", "Retention:", "Continual:", "Reports:", "Advanced:"):
        assert panel in text
    assert "Examples:" in text and "l2ul forget examples/" in text
    assert "Checkpoint: .safetensors" in text  # the argument's help survives the Click version
    # The loop's defaults come from the presets: each forget method's value is named.
    lr_help = " ".join(text.split("--lr FLOAT", 1)[1].split("--max-steps", 1)[0].split())
    assert "0.001 for neggrad, adv, adv+imp" in lr_help and "correct" not in lr_help


def test_a_damaged_model_is_not_written_and_exits_4(digits_checkpoint, forget_dir, heldout_dir, tmp_path, monkeypatch):
    _break_after_updates(monkeypatch)
    out, rep = tmp_path / "o.safetensors", tmp_path / "r.json"
    r = run("forget", digits_checkpoint, "--images", forget_dir, "--out", out, "--report", rep, "--eval", heldout_dir,
            "--method", "neggrad", *FAST)
    assert r.exit_code == 4
    line = one_error_line(r)
    assert "looks damaged" in line and "--eval images" in line and "no checkpoint written" in line
    assert not out.exists()
    report = json.loads(rep.read_text())
    assert report["healthy"] is False and report["health"]["worst"] == "eval"
    assert report["health"]["probes"]["eval"]["agreement"] < 0.5


def test_health_check_says_what_it_used(digits_checkpoint, forget_dir, heldout_dir, tmp_path):
    """A sound run: healthy, on the probes it had; the paper's NEGGRAD without --eval has none."""
    rep = tmp_path / "r.json"
    r = run("forget", digits_checkpoint, "--images", forget_dir, "--out", tmp_path / "a.safetensors", "--report", rep,
            *DEFAULT_QUICK, "--synthetic-retain", "16")
    assert r.exit_code == 0, r.output
    health = json.loads(rep.read_text())["health"]
    assert health["healthy"] is True and set(health["probes"]) == {"stand_ins"}
    assert health["probes"]["stand_ins"] == {"n_images": 16, "agreement": health["probes"]["stand_ins"]["agreement"]}
    assert health["probes"]["stand_ins"]["agreement"] >= health["threshold"]
    r = run("forget", digits_checkpoint, "--images", forget_dir, "--out", tmp_path / "b.safetensors", "--report", rep,
            "--method", "neggrad", "--max-steps", "1", "--allow-partial", *FAST)
    report = json.loads(rep.read_text())
    assert report["healthy"] is None and report["health"]["probes"] == {}


def test_health_verdict_on_hand_made_probes():
    from l2ul_cli.health import THRESHOLD, assess, describe

    sound = assess({"stand_ins": {"n_images": 256, "agreement": 1.0}, "eval": {"n_images": 300, "agreement": 0.95}})
    assert sound["healthy"] is True and sound["worst"] == "eval" and "sound" in describe(sound)
    broken = assess({"stand_ins": {"n_images": 256, "agreement": 1.0}, "retain": {"n_images": 64, "agreement": 0.2}})
    assert broken["healthy"] is False and broken["worst"] == "retain"
    assert assess({"eval": {"n_images": 0, "agreement": float("nan")}})["healthy"] is None
    assert assess({"eval": {"n_images": 10, "agreement": THRESHOLD}})["healthy"] is True
