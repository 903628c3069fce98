"""One request at 224×224 on a ResNet-50 (issue 26): seconds per phase.

At the default settings a request at this size is hours of work for 2 CPU cores (256 stand-ins ×
200 synthesis steps, 16 images × 20 copies × 100 PGD steps, a few hundred update steps), so on a
CPU each phase runs a few of its iterations, the time of one iteration is measured (from the
progress callbacks, so set-up is apart), and the phase is scaled to the default's count. `--full`
runs the request at the default settings as it is (a GPU). Every phase goes through the library
(`unlearn`), on the model as the CLI loads it; only the iteration counts are capped.

The network is untrained (timm resnet50, in_chans=1, seeded): an iteration costs the same whatever
the weights, but the number of update steps depends on them. The labels to forget are the untrained
net's own predictions (it gets most true labels wrong, and a request already met takes no steps). It is taken from `--update-steps`
(default 300: the 28-px ResNet-18's steps at k = 16, benchmarks/RESULTS.md "Index once, forget
many"). The images are Fashion-MNIST training images upsampled to 224 (bilinear).

    python benchmarks/speed224.py                  # 2 CPU cores: capped, scaled
    python benchmarks/speed224.py --full           # a GPU: the request as the CLI runs it
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import FASHION_MNIST_CLASSES, MEAN, STD, device_name, fmnist, fresh, publish  # noqa: E402

from l2ul_cli.checkpoint import write_checkpoint  # noqa: E402
from l2ul_cli.config import AttackConfig, preset  # noqa: E402
from l2ul_cli.models import build_network  # noqa: E402
from l2ul_cli.unlearn import unlearn  # noqa: E402


class Clock:
    """A progress sink that keeps, per phase, when it started, each advance and when it finished."""

    def __init__(self):
        self.phases: dict[str, dict] = {}
        self._now: dict | None = None
        self._t0 = time.perf_counter()

    def _log(self, what: str) -> None:  # on stderr: a long CPU run shows where it is
        print(f"[{time.perf_counter() - self._t0:7.1f} s] {what}", file=sys.stderr, flush=True)

    def start(self, phase: str, total: int, unit: str = "images") -> None:
        self._now = self.phases[phase] = {"start": time.perf_counter(), "ticks": [], "units": [], "unit": unit}
        self._log(f"{phase}: {total} {unit}")

    def advance(self, n: int = 1) -> None:
        self._now["ticks"].append(time.perf_counter())
        self._now["units"].append(n)
        self._log(f"  +{n} ({sum(self._now['units'])})")

    def finish(self) -> None:
        self._now["end"] = time.perf_counter()
        self._log("  done")

    def per_unit(self, phase: str) -> tuple[float, int]:
        """Seconds per unit after the first advance (set-up and warm-up apart), and units run."""
        p = self.phases[phase]
        ticks, units = p["ticks"], p["units"]
        if not ticks:
            return 0.0, 0
        if len(ticks) < 2:
            return (ticks[0] - p["start"]) / units[0], sum(units)
        return (ticks[-1] - ticks[0]) / sum(units[1:]), sum(units)


def checkpoint(arch: str, size: int, seed: int) -> Path:
    """An untrained network saved as the CLI reads a checkpoint (224-px preprocessing)."""
    torch.manual_seed(seed)
    net = build_network(arch, 10, 1)
    path = Path(tempfile.mkdtemp()) / f"{arch}-{size}.safetensors"
    write_checkpoint(path, net.state_dict(), {
        "arch": arch, "num_classes": 10, "in_chans": 1, "class_names": FASHION_MNIST_CLASSES, "ledger": [],
        "preprocessing": {"input_size": [1, size, size], "mean": [MEAN], "std": [STD], "crop_pct": 1.0,
                          "interpolation": "bilinear"}})
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--full", action="store_true", help="the default's counts, nothing scaled")
    ap.add_argument("--synthesis-steps", type=int, default=2, help="run (capped); scaled to the default's")
    ap.add_argument("--attack-steps", type=int, default=2, help="PGD steps run (capped); scaled to the default's")
    ap.add_argument("--max-steps", type=int, default=4, help="update steps run (capped)")
    ap.add_argument("--update-steps", type=int, default=300, help="update steps the scaled request is charged")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device)
    full_cfg, full_attack = preset("l2ul"), AttackConfig()
    cfg = full_cfg if args.full else replace(full_cfg, synthetic_steps=args.synthesis_steps, max_steps=args.max_steps)
    attack = full_attack if args.full else replace(full_attack, steps=args.attack_steps)
    x, y = fmnist("train")
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.k))[:args.k]
    images = F.interpolate(x[idx], size=(args.size, args.size), mode="bilinear", align_corners=False).to(dev)
    loaded = fresh(checkpoint(args.arch, args.size, 0), dev)
    with torch.no_grad():  # an untrained net gets most labels wrong already: forget its own predictions instead
        labels = loaded.model.eval()(images).argmax(1)
    clock = Clock()
    t0 = time.perf_counter()
    r = unlearn(loaded.model, images, labels, goal="forget", num_classes=10, config=cfg, attack=attack,
                seed=0, progress=clock)
    total = time.perf_counter() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB
    scale = {"attack": full_attack.steps / attack.steps, "synthesis": full_cfg.synthetic_steps / cfg.synthetic_steps}
    rows = []
    for phase in ("attack", "importance", "synthesis", "updates"):
        measured = r.seconds.get(phase, 0.0)
        per, units = clock.per_unit(phase) if phase in clock.phases else (0.0, 0)
        if args.full or phase == "importance":
            est = measured
        elif phase == "updates":  # set-up (the loop, the final check) plus the charged steps
            est = measured - per * units + per * args.update_steps
        else:  # the iterations scale; the rest (the projection's build after the stand-ins) does not
            p = clock.phases[phase]
            iterations = p["end"] - p["start"]
            est = measured - iterations + iterations * scale[phase]
        rows.append((phase, measured, per, units, clock.phases.get(phase, {}).get("unit", ""), est))
    lines = [f"## One request at {args.size}×{args.size} · {args.arch} · {device_name(dev)}", "",
             f"Command: `python benchmarks/speed224.py {' '.join(sys.argv[1:])}`. timm {args.arch} (in_chans=1, untrained, "
             f"seeded), l2ul default, k = {args.k} Fashion-MNIST images upsampled to {args.size} px; precision {r.precision}; "
             f"peak memory {peak_gib:.1f} GiB. "
             + ("The default's counts, nothing scaled." if args.full else
                f"Run capped at {cfg.synthetic_steps} synthesis steps, {attack.steps} PGD steps and {r.steps} update steps "
                f"({total:.0f} s in all); each phase's iterations scaled to the default's ({full_cfg.synthetic_steps} synthesis "
                f"steps, {full_attack.steps} PGD steps, {args.update_steps} update steps charged), the rest of the phase "
                "(set-up, the projection's build) as measured."),
             "", "| phase | measured s | s per unit (units run) | s at the default's counts |", "|---|---|---|---|"]
    for phase, measured, per, units, unit, est in rows:
        lines.append(f"| {phase} | {measured:.1f} | {per:.3f} per {unit.rstrip('s') or 'unit'} ({units}) | {est:,.0f} |")
    lines.append(f"| **total** | {total:.1f} | | **{sum(e for *_, e in rows):,.0f}** ({sum(e for *_, e in rows) / 3600:.1f} h) |")
    publish("\n".join(lines) + "\n", not args.no_write)


if __name__ == "__main__":
    main()
