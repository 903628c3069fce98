"""As if never trained (issue 28): each method and objective beside a model retrained without the
forget images, the gold standard of unlearning.

For each of quality.py's draws (k training images), the benchmark's recipe is trained again,
seeded as the original, on the training set less those images (cached in benchmarks/.cache:
about 2.5 minutes each on 2 CPU cores). Each request then runs through the request API exactly
as the CLI runs it (PNG folders); the held-out set is test images 0–999 (``--holdout`` for the
indistinguishable objective), and D_test and the attacks use the other 9,000 test images, so
no figure is measured on images a request saw.

Per method, objective and k: D_f, D_r, D_test, the loss and confidence attack AUCs (forget vs
test images) beside the retrained model's, and the average gap: mean |Δ| over D_f, D_r, D_test
and the loss AUC (in points), as SalUn reports it. Cells are kept in benchmarks/.cache/gold.json
as they finish, so a long run can be resumed and published in parts.

The methods that need the training data get it as a user holding it would pass it: LTU the
remaining training images (every training image but the draw's) as ``--retain``, of which its
``retain_fraction`` is used, and the held-out set; PGU an index of the whole training set (its
code's retained space, the forget images subtracted per request) and the held-out set for its
stop rule.

    python benchmarks/gold.py                               # k = 16, 64, 128; 3 draws
    python benchmarks/gold.py --ks 16 --variants "l2ul:indistinguishable"
    python benchmarks/gold.py --ks 16 64 --variants ltu:misclassify:retain_fraction=0.3 pgu:misclassify
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (CACHE, CPU_EPOCHS, GPU_EPOCHS, QUICK, Evaluator, device_name, fresh, publish,  # noqa: E402
                    settings, split_settings, train_resnet18)
from index import save_pngs, write_pngs, write_test_pngs  # noqa: E402
from quality import pick  # noqa: E402

from l2ul_cli.config import METHOD_FIELDS  # noqa: E402
from l2ul_cli.datasets import FASHION_MNIST_CLASSES  # noqa: E402
from l2ul_cli.errors import RunFailed  # noqa: E402
from l2ul_cli.evaluate import accuracy, membership_inference, predict  # noqa: E402
from l2ul_cli.make_index import make_index  # noqa: E402
from l2ul_cli.workflow import run_request  # noqa: E402

HOLDOUT = 1000  # test images 0..HOLDOUT-1 are the requests' held-out set; the rest measure
CELLS = CACHE / "gold.json"


def measure(model: torch.nn.Module, ev: Evaluator, idx: torch.Tensor, dev) -> dict:
    """D_f, D_r, D_test and both attacks, forget vs the test images no request saw."""
    keep = ev.remaining_pool[~torch.isin(ev.remaining_pool, idx)]
    xt, yt = ev.xt[HOLDOUT:], ev.yt[HOLDOUT:]
    lf, lr, lt = (predict(model, x.split(2000), dev) for x in (ev.x[idx], ev.x[keep], xt))
    mia = membership_inference(lf, ev.y[idx], lt, yt)
    return {"D_f": accuracy(lf, ev.y[idx]), "D_r": accuracy(lr, ev.y[keep]), "D_test": accuracy(lt, yt),
            "loss_auc": mia["loss_auc"], "confidence_auc": mia["confidence_auc"]}


def gap(cell: dict, gold: dict) -> float:
    """SalUn's average gap, in points: mean |Δ| over D_f, D_r, D_test and the loss AUC."""
    return statistics.mean(abs(cell[key] - gold[key]) * 100 for key in ("D_f", "D_r", "D_test", "loss_auc"))


def parse_variant(spec: str) -> tuple[str, str, dict, dict]:
    """``method:objective[:key=value,...]`` → method, objective, UnlearnConfig and AttackConfig
    overrides (e.g. ``ltu:misclassify:retain_fraction=0.05``)."""
    method, objective, *rest = spec.split(":")
    return method, objective, *split_settings(method, settings(",".join(rest)))


def overrides(method: str, objective: str, unl: dict, att: dict, quick: bool) -> dict:
    """The request's unlearn and attack overrides: the variant's, over the smoke test's sizes
    (of those, LTU and PGU take only their own fields)."""
    q_unl, q_att = (QUICK["unlearn_overrides"], QUICK["attack_overrides"]) if quick else ({}, {})
    if method in METHOD_FIELDS:
        q_unl, q_att = {k: v for k, v in q_unl.items() if k in METHOD_FIELDS[method]}, {}
    unl = {**q_unl, **unl, **({"objective": objective} if objective == "indistinguishable" else {})}
    return {"unlearn_overrides": unl, "attack_overrides": {**q_att, **att}}


def request(ckpt, ev: Evaluator, dev, idx, work: Path, seed: int, spec: str, data: dict,
            quick: bool = False) -> dict:
    """One request through the request API; ``data``: the held-out folder, and the retain
    manifest or index the method needs."""
    method, objective, unl, att = parse_variant(spec)
    folder = work / f"forget-{len(idx)}-{seed}"
    if not folder.exists():
        write_pngs(ev, idx, folder)
    out = work / "out.safetensors"
    kw = overrides(method, objective, unl, att, quick)
    if objective == "indistinguishable" or method in ("ltu", "pgu"):
        kw["holdout"] = data["holdout"]
    if method == "ltu":
        kw["retain"] = [data["retain"]]
    if method == "pgu":
        kw["index"] = data["index"]
    try:
        rep = run_request("forget", ckpt, images=folder, out=out, method=method, device=str(dev), seed=seed,
                          force=True, allow_partial=True, **kw)
    except RunFailed as exc:  # goal not met or damaged: written anyway (allow_partial), measured
        rep = exc.report
    m = measure(fresh(out, dev).model, ev, idx, dev)
    extra = rep.get("indistinguishable", {})
    return {**m, "steps": rep["steps"], "goal_met": rep["goal_met"], "healthy": rep["healthy"],
            "seconds": rep["seconds"]["total"], "met": extra.get("met")}


def training_pngs(ev: Evaluator, n_train: int, work: Path) -> dict[int, Path]:
    """The training images as PNG class folders, once per run (LTU's retain pool, PGU's index)."""
    return save_pngs(ev.x, ev.y, torch.arange(n_train), work / "train", "train")


def retain_manifest(ev: Evaluator, train: dict[int, Path], idx: torch.Tensor, path: Path) -> Path:
    """A CSV of every training image but the draw's: the remaining data, labelled."""
    drop = set(idx.tolist())
    rows = ["path,label"] + [f"{p},{FASHION_MNIST_CLASSES[int(ev.y[i])]}" for i, p in train.items() if i not in drop]
    path.write_text("\n".join(rows) + "\n")
    return path


def load_cells() -> dict:
    return json.loads(CELLS.read_text()) if CELLS.exists() else {}


def save_cell(key: str, value: dict) -> None:
    cells = load_cells()
    cells[key] = value
    tmp = CELLS.with_suffix(".tmp")
    tmp.write_text(json.dumps(cells, indent=1))
    tmp.replace(CELLS)


def mean_sd(vals: list[float], scale: float = 100.0, digits: int = 1) -> str:
    m = statistics.mean(vals) * scale
    return f"{m:.{digits}f}" + (f" ± {statistics.stdev(vals) * scale:.{digits}f}" if len(vals) > 1 else "")


def table(cells: dict, variants: list[str], ks: list[int], seeds: list[int]) -> list[str]:
    lines = ["| variant | k | draws | D_f | D_r | D_test | loss AUC | conf. AUC | avg gap | steps | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ["retrained", "original", *variants]:
        for k in ks:
            runs = [cells[f"{name}|{k}|{s}"] for s in seeds if f"{name}|{k}|{s}" in cells]
            golds = [cells[f"retrained|{k}|{s}"] for s in seeds if f"{name}|{k}|{s}" in cells]
            if not runs:
                continue
            gaps = [gap(r, g) for r, g in zip(runs, golds)]
            steps = ", ".join(str(r["steps"]) for r in runs) if "steps" in runs[0] else "–"
            secs = f"{statistics.mean(r['seconds'] for r in runs):.0f}" if "seconds" in runs[0] else "–"
            lines.append(f"| {name} | {k} | {len(runs)} | {mean_sd([r['D_f'] for r in runs])} | "
                         f"{mean_sd([r['D_r'] for r in runs])} | {mean_sd([r['D_test'] for r in runs], digits=2)} | "
                         f"{mean_sd([r['loss_auc'] for r in runs], 1, 3)} | {mean_sd([r['confidence_auc'] for r in runs], 1, 3)} | "
                         f"{mean_sd(gaps, 1, 2)} | {steps} | {secs} |")
    return lines


def shared_data(ckpt: Path, ev: Evaluator, dev, args, work: Path) -> dict:
    """What the requests share: the held-out folder; the training PNGs when LTU or PGU runs; the
    index of them when PGU runs (cached beside the model; its build seconds printed: a one-off,
    not in any cell)."""
    methods = {parse_variant(v)[0] for v in args.variants}
    data = {"holdout": write_test_pngs(ev, HOLDOUT, work / "holdout")}
    if methods & {"ltu", "pgu"}:
        data["train"] = training_pngs(ev, args.train_subset or len(ev.y), work)
    if "pgu" in methods:
        data["index"] = CACHE / f"{ckpt.stem}.train-index.safetensors"  # 10 min for 60,000 on 2 cores
        if not data["index"].exists():
            built = make_index(ckpt, data["index"], retain=[work / "train"], device=str(dev))
            print("index:", built["source"], built["seconds"], built["directions"], "directions", flush=True)
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ks", type=int, nargs="*", default=[16, 64, 128])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--variants", nargs="*", default=["l2ul:misclassify", "l2ul:indistinguishable"],
                    help="method:objective[:key=value,...], each a request through the CLI's API")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--train-subset", type=int, default=0)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke test: few steps, tiny attack and stand-ins")
    ap.add_argument("--publish-only", action="store_true", help="tabulate the saved cells; run nothing")
    args = ap.parse_args()
    dev = torch.device(args.device)
    epochs = args.epochs or (CPU_EPOCHS if dev.type == "cpu" else GPU_EPOCHS)
    ckpt, _ = train_resnet18(dev, epochs, arch=args.arch, subset=args.train_subset)
    ev = Evaluator(dev)
    seeds = list(range(args.seeds))
    tag = f"{args.arch}-e{epochs}-n{args.train_subset}{'-quick' if args.quick else ''}"
    cells = {key.split("@")[0]: v for key, v in load_cells().items() if key.endswith("@" + tag)}
    with tempfile.TemporaryDirectory(prefix="l2ul-gold-") as tmp:
        work = Path(tmp)
        data = {} if args.publish_only else shared_data(ckpt, ev, dev, args, work)
        for k in args.ks:
            for s in seeds:
                idx = pick(len(ev.y), k, s)
                if "train" in data:
                    data["retain"] = retain_manifest(ev, data["train"], idx, work / "retain.csv")
                for name in ["original", "retrained", *args.variants]:
                    if f"{name}|{k}|{s}" in cells or args.publish_only:
                        continue
                    if name in ("original", "retrained"):
                        path = ckpt if name == "original" else train_resnet18(
                            dev, epochs, arch=args.arch, subset=args.train_subset, without=idx)[0]
                        cell = measure(fresh(path, dev).model, ev, idx, dev)
                    else:
                        cell = request(ckpt, ev, dev, idx, work, s, name, data, args.quick)
                    cells[f"{name}|{k}|{s}"] = cell
                    save_cell(f"{name}|{k}|{s}@{tag}", cell)
                    print(name, k, s, cell, flush=True)
    lines = [f"## As if never trained: beside models retrained without the forget images · {args.arch} · {device_name(dev)}",
             "", f"Command: `python benchmarks/gold.py {' '.join(sys.argv[1:])}`. The benchmark's model ({epochs} epochs) "
             f"and, per draw (quality.py's draws {seeds[0]}–{seeds[-1]}), the same recipe and seed retrained without the "
             f"draw's images. Requests through the request API (PNG folders, the CLI's defaults); --holdout: test images "
             f"0–{HOLDOUT - 1}. D_test and both attack AUCs (forget vs test) on test images {HOLDOUT}–9999. "
             "avg gap: mean |Δ| from the retrained model over D_f, D_r, D_test and the loss AUC, in points. mean ± std over draws.",
             "", *table(cells, args.variants, args.ks, seeds)]
    publish("\n".join(lines) + "\n", not args.no_write)


if __name__ == "__main__":
    main()
