"""--config: TOML/YAML values become option defaults; flags win; the result is in the report."""

from __future__ import annotations

import json

import pytest

from l2ul_cli.configfile import options_for, read_config_file
from l2ul_cli.errors import InputError
from test_cli import one_error_line, run

KNOWN = {"n-adv": "n_adv", "n_adv": "n_adv", "images": "images", "eval": "eval_images", "keep": "keep"}
PATHS = {"images", "eval_images", "keep"}


def _toml(tmp_path, text, name="l2ul.toml"):
    p = tmp_path / "conf" / name
    p.parent.mkdir(exist_ok=True)
    p.write_text(text)
    return p


def test_keys_sections_and_relative_paths(tmp_path):
    p = _toml(tmp_path, 'n-adv = 3\nimages = "forget"\nkeep = ["a", "/abs/b"]\neval = "test"\n'
                        'seed = 1\n[forget]\nn_adv = 5\n[relabel]\nlr = 1.0\n')
    got = options_for(read_config_file(p), "forget", KNOWN, PATHS, p, elsewhere={"seed", "lr"})
    assert got == {"n_adv": 5, "images": str(p.parent / "forget"), "keep": [str(p.parent / "a"), "/abs/b"],
                   "eval_images": str(p.parent / "test")}


@pytest.mark.parametrize("text,msg", [
    ("bogus = 1\n", "unknown option 'bogus' in the top level"),
    ("[forget]\nseed = 1\n", "unknown option 'seed' in [forget]"),  # known elsewhere, but not here
    ("n-adv = \n", "invalid TOML"),
    ("\xff", "invalid TOML"),
])
def test_bad_files_name_the_file(tmp_path, text, msg):
    p = tmp_path / "c.toml"
    p.write_bytes(text.encode("latin-1"))
    with pytest.raises(InputError) as exc:
        options_for(read_config_file(p), "forget", KNOWN, PATHS, p, elsewhere={"seed"})
    assert str(p) in exc.value.message and msg in exc.value.message


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="config file not found"):
        read_config_file(tmp_path / "nope.toml")


def test_yaml_when_pyyaml_is_there(tmp_path):
    yaml = pytest.importorskip("yaml")
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"n-adv": 2, "forget": {"images": "x"}}))
    assert options_for(read_config_file(p), "forget", KNOWN, PATHS, p) == {"n_adv": 2, "images": str(tmp_path / "x")}


def test_cli_config_flags_win_and_report_records_options(digits_checkpoint, heldout_dir, forget_dir, tmp_path):
    conf = _toml(tmp_path, f'device = "cpu"\nn-adv = 7\n[eval]\nimages = "{forget_dir}"\nforget = "{forget_dir}"\n')
    rep = tmp_path / "r.json"
    r = run("eval", digits_checkpoint, "--config", conf, "--images", heldout_dir, "--report", rep, "-q")
    assert r.exit_code == 0, r.output
    report = json.loads(rep.read_text())
    assert report["n_images"] == 297  # the flag beat the file's [eval] images
    assert report["options"]["images"] == str(heldout_dir)
    assert report["options"]["forget_set"] == str(forget_dir)  # from the file
    assert report["options"]["device"] == "cpu" and report["options"]["config"] == str(conf)
    assert "mia" in report


def test_cli_bad_config_is_one_error_line(digits_checkpoint, tmp_path):
    conf = _toml(tmp_path, "[eval]\nn-adv = 7\n")  # forget has n-adv, eval does not
    r = run("eval", digits_checkpoint, "--config", conf, "--images", tmp_path)
    assert r.exit_code == 1
    assert "unknown option 'n-adv' in [eval]" in one_error_line(r)
