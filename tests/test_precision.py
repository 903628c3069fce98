"""auto: bf16 on CUDA, on a CPU bf16 only where timing shows it pays; fp32 and bf16 when asked;
the report says which ran and how auto chose."""

from __future__ import annotations

import pytest
import torch

from torch import nn

from l2ul_cli import precision


def test_auto_is_fp32_on_cpu_and_explicit_choices_hold(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.autocast_dtype(cpu) is None  # even native bf16 slows depthwise nets on a CPU
    assert precision.autocast_dtype(cpu, "bf16") is torch.bfloat16
    assert precision.autocast_dtype(cpu, "fp32") is None
    assert precision.autocast_dtype(torch.device("meta")) is None
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.autocast_dtype(cpu, "fp16")


def test_report_wording_says_when_bf16_is_emulated(monkeypatch):
    cpu = torch.device("cpu")
    assert precision.describe(None, cpu) == "fp32"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.describe(torch.bfloat16, cpu) == "bfloat16 autocast (attack, stand-ins), emulated on this CPU"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.describe(torch.bfloat16, cpu) == "bfloat16 autocast (attack, stand-ins)"
    assert isinstance(precision.cpu_has_native_bf16(), bool)


def test_auto_on_a_cpu_takes_bf16_only_where_timing_shows_it_pays(monkeypatch):
    cpu, net = torch.device("cpu"), nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 3))
    timed: list = []

    def fake(seconds):
        def pass_seconds(model, x, dtype, repeats=3):
            timed.append((tuple(x.shape), dtype))
            return seconds[dtype]
        return pass_seconds

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(precision, "_pass_seconds", fake({None: 2.0, torch.bfloat16: 1.0}))
    dtype, how = precision.choose(net, (1, 28, 28), cpu)
    assert dtype is torch.bfloat16 and how == "auto: bf16 timed at 2.00x fp32's speed on this CPU"
    assert timed == [((128, 1, 28, 28), None), ((128, 1, 28, 28), torch.bfloat16)]
    timed.clear()
    precision.choose(net, (3, 224, 224), cpu)  # large images: fewer of them, at least 8
    assert timed[0][0] == (8, 3, 224, 224)
    monkeypatch.setattr(precision, "_pass_seconds", fake({None: 1.0, torch.bfloat16: 0.9}))
    assert precision.choose(net, (1, 28, 28), cpu) == (None, "auto: bf16 timed at 1.11x fp32's speed on this CPU")
    # Explicit choices and CPUs without native bf16 are not timed.
    timed.clear()
    assert precision.choose(net, (1, 28, 28), cpu, "fp32") == (None, None)
    assert precision.choose(net, (1, 28, 28), cpu, "bf16") == (torch.bfloat16, None)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.choose(net, (1, 28, 28), cpu) == (None, None)
    assert timed == []
    assert precision.describe(None, cpu, "auto: bf16 timed at 1.11x fp32's speed on this CPU") == \
        "fp32 (auto: bf16 timed at 1.11x fp32's speed on this CPU)"


def test_timing_a_pass_leaves_the_model_as_it_was():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    seconds = precision._pass_seconds(net, torch.rand(4, 1, 8, 8), torch.bfloat16, repeats=1)
    assert seconds > 0 and net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # no BatchNorm update either
    assert all(p.grad is None for p in net.parameters())
