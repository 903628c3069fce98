"""Use a torchvision architecture and a plain PyTorch checkpoint instead of an l2ul one.

Trains torchvision's resnet18 (first convolution adapted to 1 channel) on 5,000 Fashion-MNIST
images for one epoch — just enough to be a real classifier — and saves a plain ``.pth`` state dict
with a ``module.`` prefix, as DataParallel training leaves it. A checkpoint like that carries no
architecture, classes or preprocessing, so the command names them:

    l2ul forget model.pth --arch torchvision:resnet18 --input-size 28,28 --mean 0.286 --std 0.353 ...

    python3 examples/05_torchvision_checkpoint.py [--out-dir DIR] [--train 5000]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from l2ul_cli.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist
from l2ul_cli.models import build_network

HERE = Path(__file__).resolve().parent
MEAN, STD = 0.2860, 0.3530


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=None)
    ap.add_argument("--train", type=int, default=5000, help="training images (one epoch)")
    args = ap.parse_args()
    out = args.out_dir or Path(tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    x, y = load_fashion_mnist("train")
    x = torch.from_numpy(x[: args.train].copy()).float().div(255).unsqueeze(1)
    y = torch.from_numpy(y[: args.train].copy()).long()
    net = build_network("torchvision:resnet18", num_classes=10, in_chans=1)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net.train()
    for i in range(0, len(y), 128):
        loss = F.cross_entropy(net((x[i:i + 128] - MEAN) / STD), y[i:i + 128])
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = out / "tv-resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}, "epoch": 1}, ckpt)
    print(f"saved {ckpt}")

    # Without class names in the checkpoint, class folders are named by index ("7/", not "Sneaker/").
    images = out / "forget-by-index"
    for f in sorted((HERE / "images" / "forget").glob("*/*.png")):
        dest = images / str(FASHION_MNIST_CLASSES.index(f.parent.name))
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest / f.name)

    l2ul = [sys.executable, "-m", "l2ul_cli"]
    common = ["--arch", "torchvision:resnet18", "--input-size", "28,28", "--mean", str(MEAN), "--std", str(STD)]
    subprocess.run([*l2ul, "forget", str(ckpt), "--images", str(images), *common,
                    "--out", str(out / "tv-forgot.safetensors"), "--report", str(out / "tv-forget.json"), "--force",
                    *shlex.split(os.environ.get("L2UL_ARGS", ""))], check=True)
    # The output is an l2ul checkpoint: it now carries arch, classes and preprocessing.
    subprocess.run([*l2ul, "info", str(out / "tv-forgot.safetensors")], check=True)


if __name__ == "__main__":
    main()
