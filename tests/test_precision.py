"""auto: bf16 on CUDA, fp32 on CPU; fp32 and bf16 when asked; the report says which ran."""

from __future__ import annotations

import pytest
import torch

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
