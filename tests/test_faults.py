"""Faults: interrupts, NaN, CUDA out-of-memory retry. Nothing partial is ever written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from l2ul_cli import anchors as anchors_mod
from l2ul_cli.cli import app

from test_cli import FAST, sha


def _no_outputs(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.suffix in (".safetensors", ".tmp") or p.name.endswith(".tmp")]


@pytest.mark.parametrize("phase", ["attack", "synthesis", "updates"])
def test_interrupt_leaves_nothing(phase, digits_checkpoint, forget_dir, tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM, which the CLI turns into the same) mid-phase: one line, exit 130."""
    from l2ul_cli import progress as progress_mod

    real_advance = progress_mod.RichProgress.advance
    real_start = progress_mod.RichProgress.start
    state = {"phase": None}

    def start(self, name, total, unit="images"):
        state["phase"] = name
        return real_start(self, name, total, unit)

    def advance(self, n=1):
        if state["phase"] == phase:
            raise KeyboardInterrupt
        return real_advance(self, n)

    monkeypatch.setattr(progress_mod.RichProgress, "start", start)
    monkeypatch.setattr(progress_mod.RichProgress, "advance", advance)
    before = sha(digits_checkpoint)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = CliRunner().invoke(app, ["forget", str(digits_checkpoint), "--images", str(forget_dir),
                                 "--out", str(out_dir / "o.safetensors"), "--report", str(out_dir / "r.json"), *FAST,
                                 "--synthetic-retain", "8"])
    assert r.exit_code == 130
    assert r.stderr.strip() == "error: interrupted; nothing was written"
    assert list(out_dir.iterdir()) == []
    assert sha(digits_checkpoint) == before


def test_sigterm_handler_raises_keyboardinterrupt(digits_checkpoint, forget_dir, tmp_path, monkeypatch):
    import os
    import signal

    def boom(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt")

    from l2ul_cli import unlearn as unlearn_mod

    monkeypatch.setattr(unlearn_mod, "mas_importance", boom)
    out = tmp_path / "o.safetensors"
    r = CliRunner().invoke(app, ["forget", str(digits_checkpoint), "--images", str(forget_dir), "--out", str(out), *FAST])
    assert r.exit_code == 130
    assert not out.exists()


def test_nan_loss_stops_cleanly(digits_checkpoint, forget_dir, tmp_path):
    out = tmp_path / "o.safetensors"
    r = CliRunner().invoke(app, ["forget", str(digits_checkpoint), "--images", str(forget_dir), "--out", str(out),
                                 "--method", "neggrad", "--lr", "1e30", "--max-steps", "50", *FAST])
    assert r.exit_code == 1
    line = r.stderr.strip()
    assert line.startswith("error:") and ("nan" in line or "inf" in line) and "\n" not in line
    assert not out.exists()


def test_cuda_oom_in_attack_retries_with_smaller_chunks(monkeypatch):
    """The first attempt fails as CUDA would; the retry halves the chunk and gives the same copies."""
    from l2ul_cli.config import AttackConfig
    from l2ul_cli.anchors import NullProgress, attack_with_retry

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    x = torch.rand(4, 1, 4, 4)
    y = torch.tensor([0, 1, 2, 0])
    cfg = AttackConfig(n_adv=3, steps=5, eps=0.5, batch_size=8)
    real = anchors_mod.adversarial_set
    sizes = []

    def flaky(*args, batch_size, **kw):
        sizes.append(batch_size)
        if batch_size > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, batch_size=batch_size, **kw)

    monkeypatch.setattr(anchors_mod, "adversarial_set", flaky)
    got = attack_with_retry(model, x, y, 3, cfg, torch.Generator().manual_seed(1), None, NullProgress())
    assert sizes == [8, 4]
    monkeypatch.setattr(anchors_mod, "adversarial_set", real)
    want = attack_with_retry(model, x, y, 3, AttackConfig(n_adv=3, steps=5, eps=0.5, batch_size=4),
                              torch.Generator().manual_seed(1), None, NullProgress())
    for a, b in zip(got, want):
        assert torch.equal(a, b)
