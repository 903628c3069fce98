"""Quick comparison of unlearning settings on any l2ul checkpoint and Fashion-MNIST images.

Forgets k random Fashion-MNIST training images with each variant, from the same checkpoint, and
prints test accuracy (2,000 random test images) after each. Meant for sweeps on a small model
such as the shipped example (one variant takes seconds to minutes on a CPU core); the headline
figures come from quality.py.

    python benchmarks/variants.py examples/fashion-mnist-lcnet_050.safetensors --k 8 --seed 0 \\
        default "eps_at_28x28=0.5,noise_copies=10,noise_radius=2" "lr=1e-5,max_steps=3000"

A variant is ``key=value`` pairs, comma-separated: fields of UnlearnConfig or AttackConfig, plus
``method=NAME`` (default l2ul), ``real_retain=1`` (project updates away from ``--retain``
other training images, as the CLI's --retain does) and ``precision=fp32|bf16`` (of the attack
and stand-ins, as the CLI's --precision; default auto). The attack defaults to N_adv=5 and 20 PGD steps (``--n-adv``,
``--attack-steps``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from l2ul_cli.config import attack_config, resolve
from l2ul_cli.datasets import load_fashion_mnist
from l2ul_cli.errors import NumericalError
from l2ul_cli.evaluate import accuracy, predict
from l2ul_cli.models import load_model
from l2ul_cli.precision import choose
from l2ul_cli.projection import GradientProjector
from l2ul_cli.synthesis import invert_batchnorm
from l2ul_cli.anchors import shifted_copies
from l2ul_cli.unlearn import unlearn

sys.path.insert(0, str(Path(__file__).parent))
from common import settings, split_settings  # noqa: E402


def parse(variant: str) -> tuple[str, dict, dict, bool, str]:
    """(method, UnlearnConfig overrides, AttackConfig overrides, use real retain images, precision
    of the attack and stand-ins) of one variant."""
    kv = settings(variant) if variant != "default" else {}
    method = kv.pop("method", "l2ul")
    real = kv.pop("real_retain", "0") in ("1", "true")
    precision = kv.pop("precision", "auto")
    return (method, *split_settings(method, kv), real, precision)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--draw", choices=("variants", "quality"), default="variants",
                    help="which forget images: this script's draw, or quality.py's for the same seed")
    ap.add_argument("--n-adv", type=int, default=5)
    ap.add_argument("--attack-steps", type=int, default=20)
    ap.add_argument("--retain", type=int, default=500, help="other training images, for variants with real_retain=1")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")

    def tensor(a):
        return torch.tensor(a, dtype=torch.float32).unsqueeze(1) / 255.0

    g = torch.Generator().manual_seed(args.seed)
    # quality.py draws its forget images with the seed offset by 10,000 (its pick()).
    perm = torch.randperm(len(ytr), generator=g if args.draw == "variants" else torch.Generator().manual_seed(10_000 + args.seed))
    idx = perm[:args.k].numpy()
    xf, yf = tensor(xtr[idx]), torch.tensor(ytr[idx]).long()
    xr = tensor(xtr[perm[args.k:args.k + args.retain].numpy()])
    ti = torch.randperm(len(yte), generator=g)[:2000].numpy()
    xt, yt = tensor(xte[ti]), torch.tensor(yte[ti]).long()
    dev = torch.device("cpu")
    base = load_model(args.checkpoint, None, device=dev).model
    before = accuracy(predict(base, xt.split(500), dev), yt)
    print(f"k={args.k} seed={args.seed}: test accuracy before {before * 100:.1f} %, "
          f"forget accuracy before {accuracy(predict(base, [xf], dev), yf) * 100:.0f} %")
    # The forget images shifted by 1-2 pixels (drawn apart from any shift anchors, another seed):
    # does the model still know them once the exact images are forgotten?
    x_shift = shifted_copies(xf, 4, 2, torch.Generator().manual_seed(10_000 + args.seed))
    y_shift = yf.repeat_interleave(4)
    print(f"forget images shifted by 1-2 pixels, accuracy before {accuracy(predict(base, [x_shift], dev), y_shift) * 100:.0f} %")
    print("| variant | goal | steps | D_test | drop | D_f shifted | seconds (attack / stand-ins / updates) |\n|---|---|---|---|---|---|---|")
    # Stand-ins depend only on the checkpoint and their settings: made once, shared by variants
    # (their seconds are shown where they were made).
    stand_ins: dict[tuple[int, int], torch.Tensor] = {}
    for v in args.variants:
        method, unl, att, real, precision = parse(v)
        model = load_model(args.checkpoint, None, device=dev).model
        cfg = resolve(method, "forget", **unl)  # as the CLI: an explicit count or lr is taken as given
        synth_s = 0.0
        projector = None
        if real:
            projector = GradientProjector(model, xr, energy=cfg.retain_energy)
        elif (n_stand_ins := cfg.stand_ins(args.k)) > 0:
            key = (n_stand_ins, cfg.synthetic_steps, cfg.synthetic_lr, precision)
            if key not in stand_ins:
                t0 = time.perf_counter()
                stand_ins[key] = invert_batchnorm(model, key[0], tuple(xf.shape[1:]), 10, steps=key[1], lr=key[2], seed=args.seed,
                                                  autocast_dtype=choose(model, tuple(xf.shape[1:]), dev, precision)[0])
                synth_s = time.perf_counter() - t0
            projector = GradientProjector(model, stand_ins[key], energy=cfg.retain_energy)
        attack = attack_config(method, **{"n_adv": args.n_adv, "steps": args.attack_steps, **att})
        t0 = time.perf_counter()
        try:
            r = unlearn(model, xf, yf, goal="forget", num_classes=10, config=cfg,
                        attack=attack, seed=args.seed, precision=precision, projector=projector)
        except NumericalError:
            print(f"| {v} | diverged | – | – | – | {time.perf_counter() - t0:.0f} |", flush=True)
            continue
        acc = accuracy(predict(model, xt.split(500), dev), yt)
        shifted_acc = accuracy(predict(model, [x_shift], dev), y_shift)
        print(f"| {v} | {'met' if r.goal_met else 'NOT met'} | {r.steps} | {acc * 100:.1f} | {(before - acc) * 100:.1f} | "
              f"{shifted_acc * 100:.0f} | {r.seconds['attack']:.0f} / {synth_s:.0f} / {r.seconds['updates']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
