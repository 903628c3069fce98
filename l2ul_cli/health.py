"""Is the model still sound? Agreement with the original model on probe images the run already
has, checked before anything is written.

A run that meets its goal can still break the model elsewhere (the paper's ADV+IMP at its own
settings left chance accuracy on the benchmark, benchmarks/RESULTS.md "Health check"). Every
probe set is images of the domain whose class the updates should not change: the images the
projection holds (``--retain`` or stand-ins) and ``--eval`` images. (Copies of the forget images —
adversarial, shifted, blended — move with their image when it moves: they measure how local the
change is, not the model elsewhere.) Below :data:`THRESHOLD` on any of
them the run counts as damaged: no checkpoint unless ``--allow-partial``, and a distinct exit.
"""

from __future__ import annotations

from typing import Any

# Collapse, not drift, is what this refuses (drift below 95 % of the held images is a warning in
# the report): sound runs keep 92.7-100 % of every probe set, collapsed ones 10.9-13.7 %
# (RESULTS.md "Health check").
THRESHOLD = 0.75

# Probe sets in the order the report lists them, and how messages name them.
PROBES = (("retain", "--retain images"), ("stand_ins", "stand-in images"), ("eval", "--eval images"))


def assess(probes: dict[str, dict[str, Any]], threshold: float = THRESHOLD) -> dict[str, Any]:
    """``probes``: per probe set, ``{"n_images": n, "agreement": share}``. The verdict: healthy
    (every set at or above the threshold), not, or None when there was nothing to check on."""
    used = {k: probes[k] for k, _ in PROBES if k in probes and probes[k]["n_images"]}
    worst = min(used, key=lambda k: used[k]["agreement"]) if used else None
    healthy = None if worst is None else used[worst]["agreement"] >= threshold
    return {"healthy": healthy, "threshold": threshold, "probes": used, "worst": worst}


def describe(health: dict[str, Any]) -> str:
    """One line on what the check used and found."""
    if health["healthy"] is None:
        return "health: not checked (no probe images: pass --eval or --retain images)"
    names = dict(PROBES)
    parts = [f"{p['agreement']:.1%} of {p['n_images']} {names[k]}" for k, p in health["probes"].items()]
    verdict = "sound" if health["healthy"] else "DAMAGED"
    return f"health: {verdict} — predicted as by the original model: {', '.join(parts)} (threshold {health['threshold']:.0%})"


def damage_message(health: dict[str, Any], wrote: str | None) -> str:
    """The error line of a damaged run."""
    k = health["worst"]
    p = health["probes"][k]
    where = f"wrote {wrote} (--allow-partial)" if wrote else "no checkpoint written"
    return (f"the model looks damaged: only {p['agreement']:.1%} of the {p['n_images']} {dict(PROBES)[k]} keep the "
            f"original model's prediction (threshold {health['threshold']:.0%}); {where} (try --method l2ul, "
            "--retain images of the domain, a smaller --lr, or --allow-partial to keep it anyway)")
