"""Stand-in batches sized from what the model keeps per image and the memory free."""

from __future__ import annotations

import torch
from torch import nn

from l2ul_cli import memory


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()


def test_saved_bytes_grow_with_the_pixels_and_leave_out_the_weights():
    net = _net()
    cpu = torch.device("cpu")
    small = memory.saved_bytes_per_image(net, (1, 8, 8), cpu)
    large = memory.saved_bytes_per_image(net, (1, 16, 16), cpu)
    assert 3.5 < large / small < 4.5  # activations scale with the pixels; the weights would not
    # Each of the two 8-channel convs and norms keeps at least one 8x16x16 fp32 map per image.
    assert large >= 4 * 8 * 16 * 16 * 4
    bf16 = memory.saved_bytes_per_image(net, (1, 16, 16), cpu, torch.bfloat16)
    assert bf16 < large


def test_rows_that_fit_shrinks_with_the_free_memory(monkeypatch):
    net, cpu = _net(), torch.device("cpu")
    per = memory.saved_bytes_per_image(net, (1, 16, 16), cpu)
    monkeypatch.setattr(memory, "free_bytes", lambda device: 40 * per)
    assert memory.rows_that_fit(net, (1, 16, 16), cpu, cap=256, floor=1) == int(40 * per * memory.SHARE) // per
    monkeypatch.setattr(memory, "free_bytes", lambda device: 10 ** 12)
    assert memory.rows_that_fit(net, (1, 16, 16), cpu, cap=256) == 256
    monkeypatch.setattr(memory, "free_bytes", lambda device: None)  # unknown: the cap
    assert memory.rows_that_fit(net, (1, 16, 16), cpu, cap=64) == 64
    monkeypatch.setattr(memory, "free_bytes", lambda device: per)
    assert memory.rows_that_fit(net, (1, 16, 16), cpu, cap=256, floor=8) == 8


def test_free_bytes_on_this_machine():
    free = memory.free_bytes(torch.device("cpu"))
    assert free is None or free > 0


def test_stand_ins_in_smaller_batches_when_memory_is_short(monkeypatch):
    from l2ul_cli.config import resolve
    from l2ul_cli.retention import stand_in_images

    net, cpu = _net(), torch.device("cpu")
    per = memory.saved_bytes_per_image(net, (1, 10, 10), cpu)
    monkeypatch.setattr(memory, "free_bytes", lambda device: int(20 * per / memory.SHARE))
    calls = []

    class Sink:
        def start(self, phase, total, unit="images"):
            calls.append(total)

        def advance(self, n=1):
            pass

        def finish(self):
            pass

    cfg = resolve("l2ul", "forget", synthetic_steps=3)
    images, made = stand_in_images(net, 30, (1, 10, 10), 3, cfg, progress=Sink())
    assert images.shape == (30, 1, 10, 10)
    assert made.endswith("in batches of 20 to fit in memory")
    assert calls == [3 * 2]  # two batches of three steps each, as the progress bar is told
    monkeypatch.setattr(memory, "free_bytes", lambda device: 10 ** 12)
    _, made = stand_in_images(net, 30, (1, 10, 10), 3, cfg)
    assert made.endswith("from BatchNorm statistics")
