"""bf16 only where the hardware runs it natively; fp32 when asked or elsewhere."""

from __future__ import annotations

import torch

from l2ul_cli import precision


def test_cpu_bf16_follows_the_native_probe(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.autocast_dtype(cpu) is torch.bfloat16
    assert precision.autocast_dtype(cpu, amp=False) is None  # fp32 when asked
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.autocast_dtype(cpu) is None  # emulated bf16 is slower: fp32


def test_native_probe_answers_without_error():
    assert isinstance(precision.cpu_has_native_bf16(), bool)
    assert precision.autocast_dtype(torch.device("meta")) is None
