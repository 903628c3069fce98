"""Speed benchmark: the batched unlearning path against a reference-style loop, on one device.

For ResNet-18 on Fashion-MNIST (the quality benchmark's model) and k forget images it measures
seconds per phase, attack throughput (image-passes/s: k·N_adv·T forward+backward passes), the
attack's achieved TFLOP/s (FLOPs counted with torch.utils.flop_counter) against the device's
measured matrix-multiply rate (in the precision the attack ran in, ``--precision`` as the CLI's:
by default bf16 on CUDA, and on a CPU whichever auto timed faster; measured in the same run), the ratio to a reference-style loop
written here (one adversarial copy at a time, fp32, separate forward passes, BatchNorm in train
mode, the whole forget set evaluated after every step), and the wall time of training the model
from scratch with the benchmark's recipe.

    python benchmarks/speed.py                 # CUDA: k = 16, 128
    python benchmarks/speed.py --ks 16         # 2 CPU cores
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import CPU_EPOCHS, GPU_EPOCHS, device_name, fmnist, fresh, settings, split_settings, train_resnet18  # noqa: E402

from l2ul_cli.attack import draw_targets, pgd_l2_targeted  # noqa: E402
from l2ul_cli.config import AttackConfig, preset  # noqa: E402
from l2ul_cli.importance import ImportancePenalty, mas_importance  # noqa: E402
from l2ul_cli.precision import PRECISIONS  # noqa: E402
from l2ul_cli.unlearn import unlearn  # noqa: E402

RESULTS = Path(__file__).parent / "RESULTS.md"


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(dev, dtype: torch.dtype) -> float:
    """Measured dense matrix-multiply TFLOP/s in ``dtype`` (the attack's precision on ``dev``)."""
    n = 8192 if dev.type == "cuda" else 1024
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(dev)
    reps = 50 if dev.type == "cuda" else 5
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(dev)
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


def attack_flops_per_pass(model, x) -> float:
    """FLOPs of one forward+backward (w.r.t. the input) per image."""
    from torch.utils.flop_counter import FlopCounterMode

    d = torch.zeros_like(x, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        loss = F.cross_entropy(model(x + d), torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
        torch.autograd.grad(loss, d)
    return fc.get_total_flops() / x.shape[0]


def test_accuracy(model, x, y, dev) -> float:
    """Share of the 10,000 test images right, so the speed table also shows what each path kept."""
    from l2ul_cli.evaluate import accuracy, predict

    return accuracy(predict(model, x.split(2000), dev), y)


def reference_style(model, x, y, num_classes, attack: AttackConfig, max_steps: int, seed: int, timed_copies: int = 0) -> dict:
    """The reference code's structure, in our own code: per-copy fp32 attack, BN in train mode,
    separate forward passes, the forget set evaluated after every step.

    ``timed_copies`` > 0 times the per-copy attack on that many copies only and scales the time to
    all k·N_adv (each copy is the same independent batch-1 PGD, so its cost is linear in the count);
    the other copies are then made batched, untimed, so the update phase still gets all of them."""
    g = torch.Generator().manual_seed(seed)
    total = x.shape[0] * attack.n_adv
    timed = min(timed_copies or total, total)
    eps = attack.radius(tuple(x.shape[1:]))
    t0 = time.perf_counter()
    copies, targets = [], []
    for i in range(x.shape[0]):
        t = draw_targets(y[i:i + 1].cpu(), num_classes, 1, g).to(x.device).flatten()
        for _ in range(attack.n_adv):
            if len(copies) < timed:
                copies.append(pgd_l2_targeted(model, x[i:i + 1], t, eps=eps, step_size=attack.step_size,
                                              steps=attack.steps, generator=g, batch_size=1))
            targets.append(t)
        if len(copies) >= timed:
            sync(x.device)
            break
    sync(x.device)
    t_attack = (time.perf_counter() - t0) * total / timed
    if timed < total:
        for i in range(len(targets) // attack.n_adv, x.shape[0]):
            targets += [draw_targets(y[i:i + 1].cpu(), num_classes, 1, g).to(x.device).flatten()] * attack.n_adv
        rest = torch.cat(targets[timed:])
        src = torch.arange(x.shape[0], device=x.device).repeat_interleave(attack.n_adv)[timed:]
        copies.append(pgd_l2_targeted(model, x[src], rest, eps=eps, step_size=attack.step_size, steps=attack.steps,
                                      generator=g, batch_size=attack.chunk_rows(tuple(x.shape[1:]), x.device.type)))
    xa, ta = torch.cat(copies), torch.cat(targets)
    t0 = time.perf_counter()
    penalty = ImportancePenalty(model, mas_importance(model, x, chunk_size=1), 1.0)
    sync(x.device)
    t_imp = time.perf_counter() - t0
    t0 = time.perf_counter()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-5)
    steps = 0
    for steps in range(1, max_steps + 1):
        model.train()
        idx = torch.randint(0, xa.shape[0], (min(256, xa.shape[0]),), generator=g).to(x.device)
        loss = -F.cross_entropy(model(x), y) + F.cross_entropy(model(xa[idx]), ta[idx]) + penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            if (model(x).argmax(1) != y).all():
                break
    sync(x.device)
    return {"attack": t_attack, "importance": t_imp, "updates": time.perf_counter() - t0, "steps": steps,
            "timed_copies": timed, "copies": total}


# name: (label, torch.compile, autocast dtype, other pgd_l2_targeted arguments)
ATTACK_VARIANTS = {"fp32": ("eager fp32", False, None, {}), "bf16": ("eager bf16 autocast", False, torch.bfloat16, {}),
                   "compile": ("torch.compile fp32", True, None, {}),
                   "compile-bf16": ("torch.compile bf16 autocast", True, torch.bfloat16, {}),
                   "bf16-1024": ("eager bf16 autocast, 1,024 rows a chunk", False, torch.bfloat16, {"batch_size": 1024}),
                   "graph": ("CUDA graph fp32", False, None, {"cuda_graph": True}),
                   "graph-bf16": ("CUDA graph bf16 autocast", False, torch.bfloat16, {"cuda_graph": True}),
                   "graph-bf16-1024": ("CUDA graph bf16 autocast, 1,024 rows a chunk", False, torch.bfloat16,
                                       {"cuda_graph": True, "batch_size": 1024})}


def attack_variants(ckpt, dev, x, y, attack: AttackConfig, names: list[str]) -> list[dict]:
    """The batched attack in fp32, under bf16 autocast, through torch.compile, replayed as CUDA
    graphs or in larger chunks, on the same images and seeds: seconds (twice: the first call of the compiled model includes compiling)
    and attack success (share of copies the fp32 model puts in their target class), so a faster
    variant is only adopted if it attacks as well."""
    from l2ul_cli.attack import adversarial_set

    judge = fresh(ckpt, dev).model
    rows = []
    for name, compiled, dtype, extra in (ATTACK_VARIANTS[n] for n in names):
        model = fresh(ckpt, dev).model  # channels_last already: load_model does it for conv nets
        if compiled:
            model = torch.compile(model)
        times = []
        try:
            for _ in range(2):
                sync(dev)
                t0 = time.perf_counter()
                xa, ta, _ = adversarial_set(model, x, y, 10, n_adv=attack.n_adv, generator=torch.Generator().manual_seed(0),
                                            eps=attack.radius(tuple(x.shape[1:])), step_size=attack.step_size,
                                            steps=attack.steps, autocast_dtype=dtype,
                                            **{"batch_size": attack.chunk_rows(tuple(x.shape[1:]), dev.type), **extra})
                sync(dev)
                times.append(time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - a variant that fails (no compiler, say) is a row, not the end of the run
            rows.append({"variant": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"})
            print(rows[-1], flush=True)
            continue
        with torch.no_grad():
            success = float((judge(xa).argmax(1) == ta).float().mean())
        rows.append({"variant": name, "first_s": times[0], "second_s": times[1], "success": success})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ks", type=int, nargs="*")
    ap.add_argument("--n-adv", type=int, default=20)
    ap.add_argument("--attack-steps", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--train-subset", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=None, help="update-step cap for both paths [default: the method's]")
    ap.add_argument("--method", default="l2ul", help="method of the batched path (the paper's adv+imp can diverge: −CE)")
    ap.add_argument("--set", nargs="*", default=[], help="UnlearnConfig/AttackConfig overrides, e.g. synthetic_retain=0")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--reference-copies", type=int, default=0,
                    help="time the reference-style per-copy attack on this many copies and scale to all [default: all]")
    ap.add_argument("--attack-variants", nargs="*", choices=list(ATTACK_VARIANTS), default=[],
                    help="also time the attack this way (largest k only), e.g. fp32 bf16 compile")
    ap.add_argument("--precision", choices=PRECISIONS, default="auto", help="of the attack and stand-ins, as the CLI's")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device)
    ks = args.ks or ([16, 128] if dev.type == "cuda" else [16])
    epochs = args.epochs or (GPU_EPOCHS if dev.type == "cuda" else CPU_EPOCHS)
    ckpt, _ = train_resnet18(dev, epochs, arch=args.arch, subset=args.train_subset)
    from l2ul_cli.checkpoint import read_checkpoint

    train_info = read_checkpoint(ckpt).meta.get("training", {})
    x_all, y_all = fmnist("train")
    x_test, y_test = fmnist("test")
    before = test_accuracy(fresh(ckpt, dev).model, x_test, y_test, dev)
    unl, att = split_settings(args.method, settings(",".join(args.set)))
    attack = replace(AttackConfig(n_adv=args.n_adv, steps=args.attack_steps), **att)
    config = preset(args.method, max_steps=args.max_steps, **unl)
    rows = []
    for k in ks:
        idx = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(k))[:k]
        x, y = x_all[idx].to(dev), y_all[idx].to(dev)
        loaded = fresh(ckpt, dev)
        flops = attack_flops_per_pass(loaded.model, x[:1].repeat(64, 1, 1, 1))
        sync(dev)
        t0 = time.perf_counter()
        r = unlearn(loaded.model, x, y, goal="forget", num_classes=10,
                    config=config, attack=attack, seed=0, precision=args.precision)
        sync(dev)
        total = time.perf_counter() - t0
        passes = k * attack.n_adv * attack.steps
        row = {"k": k, "attack": r.seconds["attack"], "importance": r.seconds["importance"], "updates": r.seconds["updates"],
               "synthesis": r.seconds.get("synthesis", 0.0),
               "total": total, "steps": r.steps, "goal": r.goal_met, "precision": r.precision, "passes_s": passes / r.seconds["attack"],
               "tflops": flops * passes / r.seconds["attack"] / 1e12,
               "test": test_accuracy(loaded.model, x_test, y_test, dev)}
        if not args.no_reference:
            ref_model = fresh(ckpt, dev).model
            ref = reference_style(ref_model, x, y, 10, attack, config.max_steps, 0, args.reference_copies)
            ref["test"] = test_accuracy(ref_model, x_test, y_test, dev)
            row["ref_total"] = ref["attack"] + ref["importance"] + ref["updates"]
            row["ref"] = ref
        rows.append(row)
        print(row, flush=True)
    # The matrix rate in the precision the attack ran in (auto may have timed its choice).
    ran = rows[-1]["precision"]
    attack_dtype = torch.bfloat16 if ran.startswith("bfloat16") else torch.float32
    rate = matmul_rate(dev, attack_dtype)
    retrain = train_info.get("seconds")
    sampled = [r["ref"] for r in rows if "ref" in r and r["ref"]["timed_copies"] < r["ref"]["copies"]]
    lines = [f"## Speed · {device_name(dev)}", "",
             f"Command: `python benchmarks/speed.py {' '.join(sys.argv[1:])}`. ResNet-18 on Fashion-MNIST 28×28 "
             f"({100 * before:.1f} % test accuracy before), "
             f"{args.method} (batched path; the reference-style loop runs ADV+IMP's structure), N_adv={attack.n_adv}, T={attack.steps} PGD steps, update cap {config.max_steps}. Matrix-multiply rate "
             f"measured in this run: {rate:.1f} TFLOP/s ({str(attack_dtype).removeprefix('torch.')}, the attack's precision here: {ran}). "
             + (f"Retraining from scratch with the benchmark recipe: {retrain:.0f} s ({train_info.get('epochs')} epochs, "
                f"{train_info.get('device')}, {100 * train_info.get('test_accuracy', 0):.1f} %). " if retrain else "")
             + (f"The reference-style attack was timed on its first {sampled[0]['timed_copies']} copies and scaled to all "
                "(each copy is the same batch-1 PGD); its other copies were made batched, untimed, for its update phase." if sampled else ""),
             "", "| k | attack s | importance s | stand-ins s | updates s (steps) | total s | image-passes/s | attack TFLOP/s (% of matmul) | D_test after | reference-style total s (steps, D_test after) | speed-up | vs retraining |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = f"{r['ref_total']:.1f} ({r['ref']['steps']}, {100 * r['ref']['test']:.1f} %)" if "ref_total" in r else "–"
        up = f"{r['ref_total'] / r['total']:.1f}×" if "ref_total" in r else "–"
        vs = f"{retrain / r['total']:.1f}×" if retrain else "–"
        lines.append(f"| {r['k']} | {r['attack']:.2f} | {r['importance']:.2f} | {r['synthesis']:.2f} | {r['updates']:.2f} ({r['steps']}{'' if r['goal'] else ', goal NOT met'}) | {r['total']:.2f} | "
                     f"{r['passes_s']:,.0f} | {r['tflops']:.3f} ({100 * r['tflops'] / rate:.1f}%) | {100 * r['test']:.1f} % | {ref} | {up} | {vs} |")
    print("\n".join(lines), flush=True)  # the main table survives a variant that runs out of time
    if args.attack_variants:
        k = ks[-1]
        idx = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(k))[:k]
        lines += ["", f"Attack variants, k = {k} (same images and seeds; success: share of copies the fp32 model puts in their target class):", "",
                  "| attack | first call s | second call s | success |", "|---|---|---|---|"]
        for v in attack_variants(ckpt, dev, x_all[idx].to(dev), y_all[idx].to(dev), attack, args.attack_variants):
            lines.append(f"| {v['variant']} | failed: {v['error']} | | |" if "error" in v else
                         f"| {v['variant']} | {v['first_s']:.2f} | {v['second_s']:.2f} | {100 * v['success']:.1f} % |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
