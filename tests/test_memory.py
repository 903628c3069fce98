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


def test_a_step_split_into_passes_gets_the_gradient_of_one_pass():
    net, x = _net(), torch.rand(20, 1, 10, 10, generator=torch.Generator().manual_seed(1))
    y = torch.arange(20) % 3

    def grads(rows):
        net.zero_grad(set_to_none=True)
        logits, replay = memory.logits_in_parts(net, x, rows)
        torch.nn.functional.cross_entropy(logits[:7], y[:7]).backward()  # any loss of the logits
        if replay is not None:
            replay()
        return [p.grad.clone() for p in net.parameters()]

    whole, split = grads(20), grads(6)
    assert memory.logits_in_parts(net, x, 20)[1] is None  # a batch that fits: one pass, no replay
    for a, b in zip(whole, split):
        assert a.abs().max() > 0
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def _request(digits_checkpoint, digits, method: str, **over):
    from l2ul_cli.config import AttackConfig, preset
    from l2ul_cli.models import load_model
    from l2ul_cli.unlearn import unlearn

    u8, labels = digits
    x = torch.tensor(u8[:6], dtype=torch.float32).unsqueeze(1) / 255.0
    model = load_model(digits_checkpoint, None, device=torch.device("cpu")).model
    cfg = preset(method, **{"synthetic_retain": 0, **over})
    return unlearn(model, x, torch.tensor(labels[:6]), goal="forget", num_classes=10, config=cfg,
                   attack=AttackConfig(n_adv=4, steps=10), seed=0, precision="fp32")


def test_update_steps_that_do_not_fit_run_in_passes_with_the_same_result(digits_checkpoint, digits, monkeypatch):
    whole = _request(digits_checkpoint, digits, "l2ul")
    per = memory.saved_bytes_per_image(load_fixture(digits_checkpoint), (1, 16, 16), torch.device("cpu"))
    monkeypatch.setattr(memory, "free_bytes", lambda device: int(12 * per / memory.SHARE))
    split = _request(digits_checkpoint, digits, "l2ul")
    assert not any("passes" in n for n in whole.notes)
    assert any("ran in passes of 12 to fit" in n for n in split.notes), split.notes
    assert whole.goal_met and split.goal_met
    # The same gradients up to summation order: the same run, give or take a step.
    assert abs(split.steps - whole.steps) <= max(2, whole.steps // 10)
    assert (split.logits.argmax(1) == whole.logits.argmax(1)).all()


def test_a_step_that_does_not_fit_with_batchnorm_in_train_mode_is_refused(digits_checkpoint, digits, monkeypatch):
    import pytest

    from l2ul_cli.errors import UsageError

    monkeypatch.setattr(memory, "free_bytes", lambda device: 1)
    with pytest.raises(UsageError, match="does not fit in this device's free memory.*--bn eval"):
        _request(digits_checkpoint, digits, "adv+imp", max_steps=3)


def load_fixture(path):
    from l2ul_cli.models import load_model

    return load_model(path, None, device=torch.device("cpu")).model.eval()


def test_attack_chunks_shrink_to_the_free_memory(monkeypatch):
    from l2ul_cli.anchors import attack_with_retry
    from l2ul_cli.config import AttackConfig

    net, cpu = _net(), torch.device("cpu")
    per = memory.saved_bytes_per_image(net, (1, 10, 10), cpu)
    images, labels = torch.rand(4, 1, 10, 10), torch.tensor([0, 1, 2, 0])
    chunks = []

    class Sink:
        def start(self, phase, total, unit="images"):
            pass

        def advance(self, n=1):
            chunks.append(n)

        def finish(self):
            pass

    def run(**attack):
        chunks.clear()
        attack_with_retry(net, images, labels, 3, AttackConfig(n_adv=5, steps=2, **attack),
                          torch.Generator().manual_seed(0), None, Sink())
        return list(chunks)

    monkeypatch.setattr(memory, "free_bytes", lambda device: int(6 * per / memory.SHARE))
    assert run() == [6, 6, 6, 2]  # 20 copies in chunks of what fits
    assert run(batch_size=10) == [10, 10]  # an explicit chunk size is kept
    monkeypatch.setattr(memory, "free_bytes", lambda device: 10 ** 12)
    assert run() == [20]


def test_measuring_a_model_in_train_mode_leaves_its_batchnorm_statistics_alone():
    net = _net().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert memory.saved_bytes_per_image(net, (1, 10, 10), torch.device("cpu")) > 0
    assert net.training  # the mode is the caller's
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
