"""The CPU thread count: --threads, OMP_NUM_THREADS, else the cores the load leaves free."""

from __future__ import annotations

import json

import pytest
import torch

from l2ul_cli.errors import UsageError
from l2ul_cli.threads import choose_threads
from test_cli import FAST, one_error_line, run


@pytest.mark.parametrize("load, want", [(0.05, 2), (0.7, 1), (1.3, 1), (9.0, 1)])
def test_default_leaves_busy_cores_alone(load, want):
    t = choose_threads(cores=2, load=load, env="")
    assert t.n == want and "busy" in t.reason


def test_explicit_choices_win_in_order():
    assert choose_threads(3, cores=2, load=5.0, env="1").n == 3
    assert choose_threads(None, cores=8, load=0.0, env="2").reason == "OMP_NUM_THREADS"
    assert choose_threads(None, cores=8, load=0.0, env="junk").n == 8
    with pytest.raises(UsageError):
        choose_threads(0)


def test_cli_reports_its_threads_and_refuses_zero(digits_checkpoint, forget_dir, tmp_path):
    rep = tmp_path / "r.json"
    r = run("forget", digits_checkpoint, "--images", forget_dir, "--out", tmp_path / "o.safetensors", "--report", rep,
            "--threads", "1", "--max-steps", "2", "--allow-partial", *FAST)
    assert r.exit_code in (0, 3), r.output
    assert json.loads(rep.read_text())["threads"] == {"n": 1, "reason": "--threads"}
    assert torch.get_num_threads() == 1
    r = run("forget", digits_checkpoint, "--images", forget_dir, "--out", tmp_path / "p.safetensors", "--threads", "0", *FAST)
    assert r.exit_code == 2 and "--threads" in one_error_line(r)
    assert not (tmp_path / "p.safetensors").exists()
