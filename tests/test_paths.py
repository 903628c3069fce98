"""No write replaces an input or another write (issue 30): l2ul_cli.paths and the CLI pairs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from l2ul_cli.cli import app
from l2ul_cli.errors import UsageError
from l2ul_cli.paths import check_paths, documents_writes

FAST = ["--n-adv", "4", "--attack-steps", "10", "--device", "cpu", "-q", "--synthetic-retain", "0"]


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def refused(result, *names: str) -> str:
    """Exit non-zero with one ``error:`` line that names every option in ``names``."""
    assert result.exit_code != 0, result.output
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), result.stderr
    assert "internal error" not in err[0]
    for name in names:
        assert name in err[0], err[0]
    return err[0]


def _files(folder: Path) -> dict[Path, str]:
    return {p: sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- the function


def test_plain_distinct_paths_pass(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"x")
    check_paths({"--images": [tmp_path / "in"], "--keep": [], "--eval": [None]},
                {"--out": tmp_path / "o.safetensors", "--report": tmp_path / "r.json", "--html": None})
    # a new file inside a read folder replaces nothing
    check_paths({"--images": [tmp_path / "in"]}, {"--report": tmp_path / "in" / "new.json"})


def test_same_file_by_name_dotdot_symlink_and_hard_link(tmp_path):
    src = tmp_path / "orig.safetensors"
    src.write_bytes(b"weights")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.safetensors").symlink_to(src)
    os.link(src, tmp_path / "hard.safetensors")
    for write in (src, tmp_path / "sub" / ".." / "orig.safetensors", tmp_path / "link.safetensors",
                  tmp_path / "hard.safetensors"):
        with pytest.raises(UsageError, match="--report .* is also --original: it would overwrite the input"):
            check_paths({"--original": [src]}, {"--report": write})


def test_existing_file_inside_a_read_folder_is_refused(tmp_path):
    img = tmp_path / "forget" / "three" / "a.png"
    img.parent.mkdir(parents=True)
    img.write_bytes(b"png")
    with pytest.raises(UsageError, match=r"--report .*a\.png is a file of --images"):
        check_paths({"--images": [tmp_path / "forget"]}, {"--report": img})
    with pytest.raises(UsageError, match="is also --images"):
        check_paths({"--images": [tmp_path / "forget"]}, {"--report": tmp_path / "forget"})


def test_two_writes_to_one_path_are_refused(tmp_path):
    with pytest.raises(UsageError, match="--report .* is also --out: the two would overwrite each other"):
        check_paths({}, {"--report": tmp_path / "x", "--out": tmp_path / "." / "x"})


def test_markdown_figures_are_writes_and_the_html_report_writes_only_itself(tmp_path):
    writes = documents_writes(tmp_path / "r.md", tmp_path / "r.html")
    assert writes["--markdown"] == tmp_path / "r.md" and writes["--html"] == tmp_path / "r.html"
    figures = [p for k, p in writes.items() if "figure" in k]
    assert tmp_path / "r-labels.png" in figures and len(figures) == len(set(figures)) == 3
    assert not [k for k in writes if k.startswith("--html (")]  # its figures are embedded
    check_paths({}, writes)
    img = tmp_path / "imgs" / "r-labels.png"
    img.parent.mkdir()
    img.write_bytes(b"png")
    with pytest.raises(UsageError, match=r"--markdown \(figure labels\)"):
        check_paths({"--images": [img.parent]}, documents_writes(img.parent / "r.md", None))
    check_paths({"--images": [img.parent]}, documents_writes(None, tmp_path / "r.html"))


def test_unusable_names_do_not_crash_the_check(tmp_path):
    long = tmp_path / ("x" * 5000)
    check_paths({"--manifest": [long]}, {"--report": tmp_path / "r.json"})
    with pytest.raises(UsageError):
        check_paths({"--manifest": [long]}, {"--report": long})


# --------------------------------------------------------------------------- the CLI pairs of issue 30


def test_forget_report_over_a_forget_image_is_refused(digits_checkpoint, forget_dir, tmp_path):
    img = next(forget_dir.rglob("*.png"))
    before = _files(forget_dir)
    r = run("forget", digits_checkpoint, "--images", forget_dir, "--out", tmp_path / "o.safetensors",
            "--report", img, *FAST)
    refused(r, "--report", "--images")
    assert _files(forget_dir) == before
    assert not (tmp_path / "o.safetensors").exists()


def test_forget_html_over_a_forget_image_is_refused(digits_checkpoint, forget_dir, tmp_path):
    img = next(forget_dir.rglob("*.png"))
    before = _files(forget_dir)
    r = run("forget", digits_checkpoint, "--images", forget_dir, "--out", tmp_path / "o.safetensors", "--html", img, *FAST)
    refused(r, "--html", "--images")
    assert _files(forget_dir) == before


def test_forget_report_over_original_is_refused(digits_checkpoint, forget_dir, tmp_path):
    orig = tmp_path / "orig.safetensors"
    orig.write_bytes(digits_checkpoint.read_bytes())
    before = sha(orig)
    r = run("forget", digits_checkpoint, "--images", forget_dir, "--original", orig, "--keep", forget_dir,
            "--out", tmp_path / "o.safetensors", "--report", orig, *FAST)
    refused(r, "--report", "--original")
    assert sha(orig) == before


def test_eval_report_over_compare_is_refused(digits_checkpoint, forget_dir, tmp_path):
    other = tmp_path / "other.safetensors"
    other.write_bytes(digits_checkpoint.read_bytes())
    before = sha(other)
    r = run("eval", digits_checkpoint, "--images", forget_dir, "--compare", other, "--report", other,
            "--device", "cpu", "-q")
    refused(r, "--report", "--compare")
    assert sha(other) == before


def _manifest(forget_dir: Path, path: Path) -> Path:
    rows = ["path,new_label"] + [f"{p},{'zero' if p.parent.name != 'zero' else 'one'}" for p in sorted(forget_dir.rglob("*.png"))]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_relabel_report_over_the_manifest_is_refused(digits_checkpoint, forget_dir, tmp_path):
    fixes = _manifest(forget_dir, tmp_path / "fixes.csv")
    before = sha(fixes)
    r = run("relabel", digits_checkpoint, "--manifest", fixes, "--out", tmp_path / "o.safetensors", "--report", fixes, *FAST)
    refused(r, "--report", "--manifest")
    assert sha(fixes) == before


def test_report_over_an_image_listed_in_a_manifest_is_refused(digits_checkpoint, forget_dir, tmp_path):
    fixes = _manifest(forget_dir, tmp_path / "fixes.csv")  # the images live outside the manifest's folder
    img = sorted(forget_dir.rglob("*.png"))[0]
    link = tmp_path / "hard.png"
    os.link(img, link)  # the same file under another name
    before = _files(forget_dir)
    r = run("relabel", digits_checkpoint, "--manifest", fixes, "--out", tmp_path / "o.safetensors", "--report", link, *FAST)
    refused(r, "--report", "--manifest")
    assert _files(forget_dir) == before


def test_report_over_the_config_file_is_refused(digits_checkpoint, forget_dir, tmp_path):
    fixes = _manifest(forget_dir, tmp_path / "fixes.csv")
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('n-adv = 4\n[relabel]\nattack-steps = 10\n', encoding="utf-8")
    before = sha(cfg)
    r = run("relabel", digits_checkpoint, "--manifest", fixes, "--config", cfg, "--out", tmp_path / "o.safetensors",
            "--report", cfg, *FAST)
    refused(r, "--report", "--config")
    assert sha(cfg) == before
    r = run("eval", digits_checkpoint, "--images", forget_dir, "--config", cfg, "--markdown", cfg, "--device", "cpu", "-q")
    refused(r, "--markdown", "--config")
    assert sha(cfg) == before


def test_report_equal_to_out_is_refused(digits_checkpoint, forget_dir, tmp_path):
    out = tmp_path / "o.safetensors"
    r = run("forget", digits_checkpoint, "--images", forget_dir, "--out", out, "--report", tmp_path / "x" / ".." / "o.safetensors",
            *FAST)
    refused(r, "--report", "--out")
    assert not out.exists()


def test_index_and_holdout_paths_are_reads_too(digits_checkpoint, forget_dir, heldout_dir, tmp_path):
    index = tmp_path / "x.index.safetensors"
    index.write_bytes(b"not yet an index")
    before = sha(index)
    r = run("forget", digits_checkpoint, "--images", forget_dir, "--method", "pgu", "--index", index,
            "--update-index", index, "--out", tmp_path / "o.safetensors", "--device", "cpu", "-q")
    refused(r, "--update-index", "--index")
    r = run("forget", digits_checkpoint, "--images", forget_dir, "--index", index, "--report", index,
            "--out", tmp_path / "o.safetensors", *FAST)
    refused(r, "--report", "--index")
    assert sha(index) == before
    held = next(heldout_dir.rglob("*.png"))
    kept = sha(held)
    r = run("eval", digits_checkpoint, "--images", forget_dir, "--forget", forget_dir, "--holdout", heldout_dir,
            "--report", held, "--device", "cpu", "-q")
    refused(r, "--report", "--holdout")
    r = run("index", digits_checkpoint, "--retain", heldout_dir, "--out", held, "--device", "cpu", "-q")
    refused(r, "--out", "--retain")
    assert sha(held) == kept
