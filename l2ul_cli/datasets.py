"""Fashion-MNIST read from local idx files, for the examples, tests and benchmarks.

Nothing is ever downloaded: the files come from the Debian package ``dataset-fashion-mnist``
(or any folder named by ``L2UL_FASHION_MNIST``), so runs are offline and reproducible.
The idx format is read directly with numpy and gzip rather than through torchvision's
dataset classes, whose code paths try to download files that are missing.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import InputError

#: Standard class order of Fashion-MNIST; names are filesystem-safe because they become
#: ImageFolder subfolder names ("T-shirt/top" would otherwise be a nested path).
FASHION_MNIST_CLASSES: list[str] = [
    "T-shirt_top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle_boot",
]

ENV_VAR = "L2UL_FASHION_MNIST"
DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")

_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
_PREFIX = {"train": "train", "test": "t10k"}


def fashion_mnist_root() -> Path:
    """Folder holding the four idx .gz files; ``$L2UL_FASHION_MNIST`` wins over the default."""
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEFAULT_ROOT


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Read one gzipped idx file, checking its magic number so a wrong file fails clearly."""
    if not path.is_file():
        raise InputError(
            f"{path}: Fashion-MNIST file not found; run `apt-get install dataset-fashion-mnist` "
            f"or set {ENV_VAR} to a folder with the idx .gz files"
        )
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise InputError(f"{path}: not a readable gzip file ({exc})") from exc
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise InputError(f"{path}: too short to be an idx file")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise InputError(f"{path}: idx magic number {found:#010x}, expected {magic:#010x}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(shape))
    if len(data) - header_len != count:
        raise InputError(f"{path}: holds {len(data) - header_len} bytes of data, header says {count}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape).copy()


def load_fashion_mnist(
    split: Literal["train", "test"] = "train",
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 (N, 28, 28), labels int64 (N,))`` for the train or test split."""
    if split not in _PREFIX:
        raise InputError(f"unknown Fashion-MNIST split {split!r} (use 'train' or 'test')")
    root = fashion_mnist_root()
    prefix = _PREFIX[split]
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz", _IMAGES_MAGIC, 3)
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", _LABELS_MAGIC, 1).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise InputError(
            f"{root}: {split} split has {images.shape[0]} images but {labels.shape[0]} labels"
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise InputError(f"{root}: {split} labels go beyond the 10 Fashion-MNIST classes")
    return images, labels
