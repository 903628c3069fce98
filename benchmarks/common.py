"""Shared pieces of the benchmarks: Fashion-MNIST tensors, the cached ResNet-18, and metrics.

The model is trained once per recipe (seeded) and cached under ``benchmarks/.cache`` as an l2ul
checkpoint, so every benchmark loads it exactly as a user's checkpoint is loaded.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from l2ul_cli.checkpoint import write_checkpoint
from l2ul_cli.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist
from l2ul_cli.evaluate import accuracy, membership_inference, predict
from l2ul_cli.models import LoadedModel, build_network, load_model

CACHE = Path(os.environ.get("L2UL_BENCH_CACHE", Path(__file__).parent / ".cache"))
MEAN, STD = 0.2860, 0.3530
GPU_EPOCHS, CPU_EPOCHS = 20, 3  # the recipe (>= 92 %) and its CPU-sized version (flagged as such)
# --quick of index.py and gold.py: the smoke test's sizes of a request through the request API.
QUICK = {"unlearn_overrides": {"max_steps": 3, "synthetic_retain": 8, "synthetic_steps": 2},
         "attack_overrides": {"n_adv": 2, "steps": 2}}


def fmnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_fashion_mnist(split)
    return torch.from_numpy(x.copy()).float().div_(255).unsqueeze(1), torch.from_numpy(y.copy()).long()


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import os

    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def train_resnet18(dev: torch.device, epochs: int, seed: int = 0, arch: str = "resnet18", subset: int = 0,
                   recipe: str = "tool", without: torch.Tensor | None = None,
                   model_args: dict | None = None) -> tuple[Path, dict]:
    """SGD + one-cycle recipe (like the paper's pre-trained models: SGD-trained), cached.
    ``subset`` > 0 trains on that many images only (the smoke test's tiny model).

    ``recipe``: "tool", this benchmark's own (batch 256, a 2-pixel roll of the whole batch, bf16 on
    CUDA, 15 % warm-up); "reference", the one issue 29's table of the official code was made
    with (batch 128, random crops of the image zero-padded by 2 pixels, fp32, torch's one-cycle).

    ``without``: training-image indices left out, the gold standard of unlearning (a model
    retrained as if those images had never been there), cached under a hash of the indices.
    ``model_args``: the constructor's (e.g. ``{"patch_size": 2}`` for a ConvNeXt at 28 px), kept
    in the checkpoint's metadata as timm's config.json keeps them."""
    ref = recipe == "reference"
    tag = "-ref" if ref else ""
    if without is not None:
        tag += "-wo" + hashlib.sha256(without.sort().values.numpy().tobytes()).hexdigest()[:10]
    if model_args:
        tag += "-" + "-".join(f"{k}{v}" for k, v in sorted(model_args.items()))
    path = CACHE / f"fmnist-{arch}{tag}-e{epochs}-s{seed}{f'-n{subset}' if subset else ''}.safetensors"
    if path.exists():
        return path, {}
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    x, y = fmnist("train")
    if subset:
        x, y = x[:subset], y[:subset]
    if without is not None:
        keep = ~torch.isin(torch.arange(len(y)), without)
        x, y = x[keep], y[keep]
    xt, yt = fmnist("test")
    net = build_network(arch, 10, 1, model_args=model_args).to(dev).to(memory_format=torch.channels_last)
    bs = min(128 if ref else 256, len(y))
    steps = epochs * (len(y) // bs)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps, **({} if ref else {"pct_start": 0.15}))
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    xd, yd = x.to(dev), y.to(dev)
    amp = dev.type == "cuda" and not ref
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(y), generator=g).to(dev)
        for i in range(len(y) // bs):
            idx = perm[i * bs:(i + 1) * bs]
            xb = _augment(xd[idx], g, per_image_crop=ref)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(net((xb - MEAN) / STD), yd[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    seconds = time.perf_counter() - t0
    net.eval()
    with torch.no_grad():
        logits = torch.cat([net(((xt[i:i + 1000].to(dev)) - MEAN) / STD).float().cpu() for i in range(0, len(yt), 1000)])
    acc = accuracy(logits, yt)
    info = {"epochs": epochs, "seconds": seconds, "test_accuracy": acc, "device": device_name(dev), "recipe": recipe}
    write_checkpoint(path, net.state_dict(), {
        "arch": arch, "num_classes": 10, "in_chans": 1, "class_names": FASHION_MNIST_CLASSES,
        "preprocessing": {"input_size": [1, 28, 28], "mean": [MEAN], "std": [STD], "crop_pct": 1.0, "interpolation": "bilinear"},
        "ledger": [], "training": info, **({"model_args": model_args} if model_args else {}),
    })
    return path, info


def _augment(xb: torch.Tensor, g: torch.Generator, *, per_image_crop: bool) -> torch.Tensor:
    """A random horizontal flip per image, and a shift of up to 2 pixels: per image, from the
    image zero-padded by 2 (torchvision's RandomCrop(28, padding=2)), or one roll per batch."""
    dev = xb.device
    # The tool's recipe draws its flips from the global generator, as its cached models were made.
    flip = (torch.rand(len(xb), generator=g).to(dev) if per_image_crop else torch.rand(len(xb), device=dev)) < 0.5
    xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(3), xb)
    if not per_image_crop:
        dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
        return torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
    n, _, h, w = xb.shape
    padded = F.pad(xb, (2, 2, 2, 2))
    oy, ox = (torch.randint(0, 5, (n,), generator=g).to(dev) for _ in range(2))
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, :, None]
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, :]
    return padded[torch.arange(n, device=dev)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


class Evaluator:
    """D_r (a fixed 10,000-image subset of the remaining training images), D_test, MIA.

    ``L2UL_BENCH_EVAL_IMAGES`` (the smoke tests' setting) caps both sets at that many images:
    scoring 20,000 images per cell was half of a smoke run's time."""

    def __init__(self, dev: torch.device, seed: int = 1234, n_remaining: int = 10_000):
        self.dev = dev
        self.x, self.y = fmnist("train")
        self.xt, self.yt = fmnist("test")
        if cap := int(os.environ.get("L2UL_BENCH_EVAL_IMAGES", 0)):
            self.xt, self.yt, n_remaining = self.xt[:cap], self.yt[:cap], min(n_remaining, cap)
        self.remaining_pool = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(seed))[:n_remaining]

    def metrics(self, loaded: LoadedModel, forget_idx: torch.Tensor, forget_targets: torch.Tensor, goal: str) -> dict:
        model = loaded.model
        keep = self.remaining_pool[~torch.isin(self.remaining_pool, forget_idx)]
        lf = predict(model, [self.x[forget_idx]], self.dev)
        lr = predict(model, self.x[keep].split(2000), self.dev)
        lt = predict(model, self.xt.split(2000), self.dev)
        f_acc = accuracy(lf, forget_targets) if goal == "relabel" else accuracy(lf, self.y[forget_idx])
        mia = membership_inference(lf, self.y[forget_idx], lt, self.yt)
        return {"D_f": f_acc, "D_r": accuracy(lr, self.y[keep]), "D_test": accuracy(lt, self.yt), "mia_auc": mia["loss_auc"]}


def fresh(path: Path, dev: torch.device) -> LoadedModel:
    return load_model(path, device=dev)


def settings(spec: str) -> dict[str, str]:
    """``key=value,key=value`` (the benchmarks' variant strings) as a dict; empty parts skipped."""
    return dict(kv.split("=", 1) for kv in filter(None, spec.split(",")))


def split_settings(method: str, pairs: dict[str, str]) -> tuple[dict, dict]:
    """``key=value`` strings → (UnlearnConfig overrides, AttackConfig overrides), each value
    cast to its field's type; shared by quality.py's method strings and variants.py."""
    from dataclasses import fields

    from l2ul_cli.config import AttackConfig, preset

    afields = {f.name for f in fields(AttackConfig)}
    unl, att = {}, {}
    for key, val in pairs.items():
        cur = getattr(AttackConfig() if key in afields else preset(method), key)
        if isinstance(cur, bool):
            cast = val in ("1", "true")
        elif cur is None or isinstance(cur, float):
            cast = float(val)
        else:
            cast = type(cur)(val)
        (att if key in afields else unl)[key] = cast
    return unl, att


RESULTS = Path(__file__).parent / "RESULTS.md"


def publish(text: str, write: bool) -> None:
    """Print a benchmark's tables and, unless ``--no-write``, append them to RESULTS.md."""
    print(text)
    if write:
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write("\n" + text)
