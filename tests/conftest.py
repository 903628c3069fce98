"""Shared fixtures: a tiny timm model trained on real images (scikit-learn's digits) in a few
seconds on CPU, saved as an l2ul checkpoint, and its images written as PNG folders."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


import numpy as np
import pytest
import torch
from PIL import Image

from l2ul_cli.checkpoint import write_checkpoint
from l2ul_cli.models import build_network

# Tiny convolutions run faster on one thread than on two busy cores (seen: up to 100x). The CLI,
# run in-process by the tests, sets its thread count from OMP_NUM_THREADS (l2ul_cli/threads.py).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SIZE = 16
ARCH = "test_resnet"
# Another seed trains another fixture model: floating-point results differ between CPUs, so a test
# whose margins hold over several seeds holds on any machine (L2UL_TEST_SEED=1 python -m pytest).
TRAIN_SEED = int(os.environ.get("L2UL_TEST_SEED", "0"))


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    # Quantise through uint8 exactly as the PNG files will be, so file and tensor agree.
    u8 = (x * 255).round().to(torch.uint8).squeeze(1).numpy()
    return u8, d.target.astype(np.int64)


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    return _digits()


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory, digits) -> Path:
    """test_resnet trained on 1,500 digits; 95-98% on the 297 held out, 100% on its training images.
    Seeded. The learning rate decays to zero: at a constant rate the last steps' noise decided the
    model: held-out accuracy ranged 0.89-0.97 over 5 seeds (0.95-0.98 with the decay), and two CPUs
    trained different enough models at one seed to move tests across their margins."""
    torch.manual_seed(TRAIN_SEED)
    u8, y = digits
    x = torch.tensor(u8, dtype=torch.float32).unsqueeze(1) / 255.0
    xt, yt = x[:1500], torch.tensor(y[:1500])
    net = build_network(ARCH, 10, 1)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    epochs = 12
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(range(0, 1500, 64)))
    g = torch.Generator().manual_seed(TRAIN_SEED)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(1500, generator=g)
        for i in range(0, 1500, 64):
            idx = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(net((xt[idx] - 0.5) / 0.5), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    path = tmp_path_factory.mktemp("model") / "digits.safetensors"
    write_checkpoint(path, net.state_dict(), {
        "arch": ARCH, "num_classes": 10, "in_chans": 1, "class_names": DIGIT_NAMES,
        "preprocessing": {"input_size": [1, SIZE, SIZE], "mean": [0.5], "std": [0.5], "crop_pct": 1.0,
                          "interpolation": "bilinear"},
        "ledger": [],
    })
    return path


FORGET_IDX = [3, 17, 101, 250, 404, 777, 900, 1234]  # the digits of the forget_dir fixture


def write_pngs(root: Path, u8: np.ndarray, labels: np.ndarray, indices, *, by_class: bool = True, names=DIGIT_NAMES) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in indices:
        folder = root / names[int(labels[i])] if by_class else root
        folder.mkdir(exist_ok=True)
        Image.fromarray(u8[i], mode="L").save(folder / f"img-{i:04d}.png")
    return root


@pytest.fixture()
def forget_dir(tmp_path, digits) -> Path:
    """Eight training digits, all classes mixed, in class-name sub-folders."""
    u8, y = digits
    return write_pngs(tmp_path / "forget", u8, y, FORGET_IDX)


@pytest.fixture(scope="session")
def heldout_dir(tmp_path_factory, digits) -> Path:
    u8, y = digits
    return write_pngs(tmp_path_factory.mktemp("heldout") / "test", u8, y, range(1500, 1797))
