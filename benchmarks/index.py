"""Index once, forget many (issue 27): requests with and without a retained-space index, and PGU.

On the benchmark's ResNet-18 (Fashion-MNIST), through the request API exactly as the CLI runs
it (PNG folders), for each draw of k training images:

- the default method making its stand-ins (no index);
- the default method with an index of 512 stand-ins, and with one of real training images;
- PGU with an index of real training images that holds the forget images (its own stop rule
  against held-out test images, and the tool's misclassify goal).

It reports D_f, D_r, D_test, MIA AUC, steps and seconds per phase, each index's build time (a
one-off), and the end-to-end ratio of a request without an index to one with it.

    python benchmarks/index.py                       # k = 16, 3 draws
    python benchmarks/index.py --ks 16 64 --train-images 5000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import CPU_EPOCHS, GPU_EPOCHS, QUICK, Evaluator, device_name, fresh, publish, train_resnet18  # noqa: E402
from quality import pick  # noqa: E402

from l2ul_cli.datasets import FASHION_MNIST_CLASSES  # noqa: E402
from l2ul_cli.errors import RunFailed  # noqa: E402
from l2ul_cli.make_index import make_index  # noqa: E402
from l2ul_cli.workflow import run_request  # noqa: E402



def save_pngs(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, folder: Path, prefix: str) -> dict[int, Path]:
    """Images ``idx`` of ``x`` as ``<folder>/<class>/<prefix>-<i>.png``; the path of each."""
    paths = {}
    for i in idx.tolist():
        d = folder / FASHION_MNIST_CLASSES[int(y[i])]
        d.mkdir(parents=True, exist_ok=True)
        paths[i] = d / f"{prefix}-{i}.png"
        Image.fromarray((x[i, 0] * 255).round().byte().numpy(), mode="L").save(paths[i])
    return paths


def write_pngs(ev: Evaluator, idx: torch.Tensor, folder: Path) -> Path:
    save_pngs(ev.x, ev.y, idx, folder, "train")
    return folder


def write_test_pngs(ev: Evaluator, n: int, folder: Path) -> Path:
    save_pngs(ev.xt, ev.yt, torch.arange(n), folder, "test")
    return folder


def request(ckpt, ev: Evaluator, dev, idx, folder: Path, out: Path, seed: int, **kw) -> dict:
    try:
        rep = run_request("forget", ckpt, images=folder, out=out, device=str(dev), seed=seed, force=True,
                          allow_partial=True, **kw)
    except RunFailed as exc:  # goal not met or damaged: written anyway (allow_partial), measured
        rep = exc.report
    m = ev.metrics(fresh(out, dev), idx, ev.y[idx], "forget")
    return {**m, "steps": rep["steps"], "goal_met": rep["goal_met"], "healthy": rep["healthy"],
            "seconds": rep["seconds"]}


def row(name: str, k: int, runs: list[dict], baseline: float | None) -> str:
    def col(key: str) -> str:
        vals = [r[key] * 100 for r in runs]
        return f"{statistics.mean(vals):.2f}" + (f" ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else "")

    total = statistics.mean(r["seconds"]["total"] for r in runs)
    phases = sorted({p for r in runs for p in r["seconds"] if p not in ("total",)})
    spent = ", ".join(f"{p} {statistics.mean(r['seconds'].get(p, 0.0) for r in runs):.1f}" for p in phases)
    ratio = f"{baseline / total:.2f}×" if baseline else "–"
    mia = statistics.mean(r["mia_auc"] for r in runs)
    return (f"| {name} | {k} | {col('D_f')} | {col('D_r')} | {col('D_test')} | {mia:.3f} | "
            f"{', '.join(str(r['steps']) for r in runs)} | {sum(bool(r['goal_met']) for r in runs)}/{len(runs)} | "
            f"{total:.1f} | {ratio} | {spent} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ks", type=int, nargs="*", default=[16])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train-images", type=int, default=5000, help="real training images in the indexes")
    ap.add_argument("--stand-ins", type=int, default=512)
    ap.add_argument("--holdout", type=int, default=1000, help="test images for PGU's stop rule")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--train-subset", type=int, default=0)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke test: the stand-ins of --stand-ins, few steps")
    ap.add_argument("--only", nargs="*", default=[], help="run only the variants whose name holds one of these")
    ap.add_argument("--energies", type=float, nargs="*", default=[],
                    help="also the default at these retain energies (stand-ins, no index)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    epochs = args.epochs or (CPU_EPOCHS if dev.type == "cpu" else GPU_EPOCHS)
    ckpt, _ = train_resnet18(dev, epochs, arch=args.arch, subset=args.train_subset)
    ev = Evaluator(dev)
    draws = {(k, s): pick(len(ev.y), k, s) for k in args.ks for s in range(args.seeds)}
    quick = QUICK if args.quick else {}
    with tempfile.TemporaryDirectory(prefix="l2ul-index-") as tmp:
        work = Path(tmp)
        # The real images hold every draw's forget images, as a training set does.
        forget_all = torch.unique(torch.cat(list(draws.values())))
        rest = torch.randperm(len(ev.y), generator=torch.Generator().manual_seed(99))
        rest = rest[~torch.isin(rest, forget_all)][:max(0, args.train_images - len(forget_all))]
        train = write_pngs(ev, torch.cat([forget_all, rest]), work / "train")
        holdout = write_test_pngs(ev, args.holdout, work / "holdout")
        n_train = len(forget_all) + len(rest)
        # Each variant names the index it needs ("stand-ins", "train" or none); "index" becomes its path.
        variants = {
            "l2ul, stand-ins (no index)": {},
            f"l2ul, index of {args.stand_ins} stand-ins": {"index": "stand-ins"},
            f"l2ul, index of {n_train} training images": {"index": "train"},
            "pgu (its stop rule, --holdout)": {"method": "pgu", "index": "train", "holdout": holdout},
            "pgu, --pgu-stop goal": {"method": "pgu", "index": "train", "unlearn_overrides": {"pgu_stop": "goal"}},
            **{f"l2ul, stand-ins, retain energy {e}": {"unlearn_overrides": {"retain_energy": e}} for e in args.energies},
        }
        variants = {n: kw for n, kw in variants.items() if not args.only or any(o in n for o in args.only)}
        makers = {"stand-ins": lambda: make_index(ckpt, work / "standins.index.safetensors", stand_ins=args.stand_ins,
                                                  device=str(dev)),
                  "train": lambda: make_index(ckpt, work / "train.index.safetensors", retain=[train], device=str(dev))}
        built = {n: make() for n, make in makers.items() if any(kw.get("index") == n for kw in variants.values())}
        print({n: (b["source"], b["seconds"]) for n, b in built.items()}, flush=True)
        for kw in variants.values():
            if "index" in kw:
                kw["index"] = built[kw["index"]]["output"]
        cells: dict[tuple[str, int], list[dict]] = {}
        for (k, s), idx in draws.items():
            folder = write_pngs(ev, idx, work / f"forget-{k}-{s}")
            for name, kw in variants.items():
                kw = {**quick, **kw, "unlearn_overrides": {**quick.get("unlearn_overrides", {}),
                                                          **kw.get("unlearn_overrides", {})}}
                if kw.get("method") == "pgu":
                    kw["unlearn_overrides"] = {k2: v for k2, v in kw["unlearn_overrides"].items() if k2 == "pgu_stop"}
                    kw.pop("attack_overrides", None)
                cells.setdefault((name, k), []).append(request(ckpt, ev, dev, idx, folder, work / "out.safetensors", s, **kw))
                print(name, k, s, cells[(name, k)][-1], flush=True)
    lines = [f"## Index once, forget many · {args.arch} · {device_name(dev)}", "",
             f"Command: `python benchmarks/index.py {' '.join(sys.argv[1:])}`. Requests through the request API "
             f"(PNG folders) on the benchmark's model ({epochs} epochs); draws 0–{args.seeds - 1} of quality.py. "
             + ("Index builds (one-off): " + "; ".join(f"{b['source']}: {sum(b['seconds'].values()):.1f} s "
                                                    f"({b['directions']:,} of {b['dimensions']:,} directions, "
                                                    f"{b['bytes'] / 2**20:.1f} MiB)" for b in built.values()) + "."
              if built else "No index built (no variant run uses one)."), "",
             "| variant | k | D_f | D_r | D_test | MIA AUC | steps | goal met | s end to end | no-index ÷ this | s per phase |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in args.ks:
        plain = cells.get(("l2ul, stand-ins (no index)", k))
        base = statistics.mean(r["seconds"]["total"] for r in plain) if plain else None
        lines += [row(name, k, cells[(name, k)], base) for name in variants]
    out = "\n".join(lines) + "\n"
    publish(out, not args.no_write)


if __name__ == "__main__":
    main()
