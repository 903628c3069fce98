"""Where the test accuracy goes when k training images are forgotten.

Forgets the same k Fashion-MNIST training images as quality.py's seed (same draw), with the
l2ul default and the CLI's attack, then looks at the test images that were right before and
wrong after: their classes, where they went, and whether they followed their nearest forget
image (cosine similarity of the original model's features, the classifier's input).

    python benchmarks/collateral.py benchmarks/.cache/fmnist-resnet18-e3-s0.safetensors --k 64 --seed 0
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from l2ul_cli.config import attack_config, preset
from l2ul_cli.datasets import FASHION_MNIST_CLASSES
from l2ul_cli.models import load_model
from l2ul_cli.unlearn import unlearn

sys.path.insert(0, str(Path(__file__).parent))
from common import fmnist  # noqa: E402
from quality import pick  # noqa: E402


def outputs(model, x: torch.Tensor, chunk: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions, unit-norm features at the classifier's input) of ``x``."""
    head = model.net.get_classifier()
    seen: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].flatten(1).float()))
    try:
        with torch.no_grad():
            preds = torch.cat([model(x[i:i + chunk]).argmax(1) for i in range(0, len(x), chunk)])
    finally:
        handle.remove()
    return preds, F.normalize(torch.cat(seen), dim=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-adv", type=int, default=None, help="[default: the CLI's]")
    ap.add_argument("--attack-steps", type=int, default=None, help="[default: the CLI's]")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--synthetic-retain", type=int, default=None)
    ap.add_argument("--test-subset", type=int, default=0, help="first N test images only (smoke runs)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    xtr, ytr = fmnist("train")
    xte, yte = fmnist("test")
    if args.test_subset:
        xte, yte = xte[:args.test_subset], yte[:args.test_subset]
    idx = pick(len(ytr), args.k, args.seed)
    xf, yf = xtr[idx], ytr[idx]
    model = load_model(args.checkpoint, None, device=dev).model
    p0, feats = outputs(model, xte)
    _, ffeats = outputs(model, xf)
    t0 = time.perf_counter()
    r = unlearn(model, xf, yf, goal="forget", num_classes=10, seed=args.seed,
                config=preset("l2ul", max_steps=args.max_steps, synthetic_retain=args.synthetic_retain),
                attack=attack_config(n_adv=args.n_adv, steps=args.attack_steps))
    p1, _ = outputs(model, xte)
    pf1, _ = outputs(model, xf)
    acc0, acc1 = (p0 == yte).float().mean() * 100, (p1 == yte).float().mean() * 100
    flipped, fixed = (p0 == yte) & (p1 != yte), (p0 != yte) & (p1 == yte)
    print(f"k = {args.k}, seed {args.seed}: goal {'met' if r.goal_met else 'NOT met'} in {r.steps} steps, "
          f"{time.perf_counter() - t0:.0f} s; D_test {acc0:.1f} -> {acc1:.1f} % on {len(yte)} test images; "
          f"{int(flipped.sum())} right -> wrong, {int(fixed.sum())} wrong -> right\n")
    print("| class | forget images | where they went | test images right -> wrong | where those went (top 2) |")
    print("|---|---|---|---|---|")

    def spread(preds: torch.Tensor, top: int = 10) -> str:
        counts = torch.bincount(preds, minlength=10)
        order = [int(i) for i in counts.argsort(descending=True)[:top] if counts[i] > 0]
        return ", ".join(f"{FASHION_MNIST_CLASSES[i]} {int(counts[i])}" for i in order) or "–"

    for c in range(10):
        f_c, t_c = yf == c, flipped & (yte == c)
        print(f"| {FASHION_MNIST_CLASSES[c]} | {int(f_c.sum())} | {spread(pf1[f_c])} | {int(t_c.sum())} | {spread(p1[t_c], 2)} |")
    sim = feats @ ffeats.T
    nearest = sim.argmax(1)
    follows = pf1[nearest] == p1
    same = yf[nearest] == yte
    print("\n| test images | n | nearest forget image of the same class | now predicted as that image's new class |")
    print("|---|---|---|---|")
    for name, mask in (("right -> wrong", flipped), ("all right before", p0 == yte)):
        n = int(mask.sum())
        pct = (lambda m: f"{100 * float(m[mask].float().mean()):.0f} %") if n else (lambda m: "–")
        print(f"| {name} | {n} | {pct(same)} | {pct(follows)} |")


if __name__ == "__main__":
    main()
