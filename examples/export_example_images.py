#!/usr/bin/env python3
"""Write real Fashion-MNIST images as PNG files for the l2ul examples and tests.

    examples/images/forget/<Class>/train-<i>.png   8 training images to forget, from 8
                                                   classes, all classified correctly
    examples/images/test/<Class>/test-<i>.png      300 test images, 30 per class
    examples/images/mistakes/test-<i>.png          6 test images the model gets wrong
    examples/images/fixes.csv                      relabel manifest for those mistakes:
                                                   path,new_label (true class),label (model's)

Folders use the ImageFolder layout (one subfolder per class name) so ``l2ul`` can read
the true labels from the paths. The choice of images is seeded, and the "correct" and
"wrong" checks use the example checkpoint written by ``train_example_model.py``.

    python3 examples/export_example_images.py [--checkpoint PATH] [--out DIR] [--seed N]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled
from l2ul_cli.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist  # noqa: E402

HERE = Path(__file__).resolve().parent
N_FORGET, N_TEST_PER_CLASS, N_MISTAKES = 8, 30, 6


def load_model(path: Path) -> tuple[torch.nn.Module, dict]:
    """Build the plain timm model from the checkpoint's own metadata (no l2ul code involved)."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["l2ul"])
        state_dict = {k: f.get_tensor(k) for k in f.keys()}
    model = timm.create_model(meta["arch"], pretrained=False,
                              num_classes=meta["num_classes"], in_chans=meta["in_chans"])
    model.load_state_dict(state_dict)
    return model.eval(), meta


@torch.no_grad()
def predict(model: torch.nn.Module, meta: dict, images: np.ndarray) -> np.ndarray:
    pre = meta["preprocessing"]
    x = torch.from_numpy(images).float().div(255).unsqueeze(1)
    x = (x - pre["mean"][0]) / pre["std"][0]
    return torch.cat([model(x[i : i + 1000]).argmax(1) for i in range(0, len(x), 1000)]).numpy()


def save_png(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)  # 2-D uint8 -> greyscale "L"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=HERE / "fashion-mnist-lcnet_050.safetensors")
    parser.add_argument("--out", type=Path, default=HERE / "images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rng = np.random.default_rng(args.seed)
    model, meta = load_model(args.checkpoint)
    names = FASHION_MNIST_CLASSES
    for sub in ("forget", "test", "mistakes"):  # start clean so reruns never mix old files in
        shutil.rmtree(args.out / sub, ignore_errors=True)

    # Images to forget: random training images the model gets right, from 8 different classes.
    train_x, train_y = load_fashion_mnist("train")
    candidates = rng.permutation(len(train_y))[:1000]
    right = candidates[predict(model, meta, train_x[candidates]) == train_y[candidates]]
    first_of_class = np.unique(train_y[right], return_index=True)[1]
    for i in sorted(right[np.sort(first_of_class)[:N_FORGET]]):
        save_png(train_x[i], args.out / "forget" / names[train_y[i]] / f"train-{i}.png")

    # Held-out test images: 30 per class, to check that the rest of the model is intact.
    test_x, test_y = load_fashion_mnist("test")
    for c, name in enumerate(names):
        for i in sorted(rng.choice(np.flatnonzero(test_y == c), N_TEST_PER_CLASS, replace=False)):
            save_png(test_x[i], args.out / "test" / name / f"test-{i}.png")

    # Mistakes to fix: test images the model gets wrong, relabelled to their true class.
    pred = predict(model, meta, test_x)
    wrong = rng.permutation(np.flatnonzero(pred != test_y))[:N_MISTAKES]
    with open(args.out / "fixes.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "new_label", "label"])
        for i in sorted(wrong):
            save_png(test_x[i], args.out / "mistakes" / f"test-{i}.png")
            writer.writerow([f"mistakes/test-{i}.png", names[test_y[i]], names[pred[i]]])

    print(f"model test accuracy {np.mean(pred == test_y):.4f}; wrote {N_FORGET} forget, "
          f"{N_TEST_PER_CLASS * len(names)} test and {len(wrong)} mistake images under {args.out}")


if __name__ == "__main__":
    main()
