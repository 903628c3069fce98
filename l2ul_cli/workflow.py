"""The library's front door: ``forget`` and ``relabel`` from paths to a written checkpoint and
a report dict. The CLI calls exactly these; so do the benchmarks and the examples.

Everything that can fail on input (paths, images, labels, output location) is checked before
the first expensive step, and nothing is written unless the run succeeds.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .checkpoint import write_checkpoint
from .config import DEFAULT_METHOD, attack_preset, FORGET_METHODS, RELABEL_METHODS, AttackConfig, Goal, UnlearnConfig, preset
from .data import Sample, check_planned_memory, load_images, outside_note, read_manifest, scan_folder
from .errors import GoalNotMet, InputError, UsageError
from .evaluate import accuracy, predict
from .ledger import continuity, make_entry
from .models import LoadedModel, load_model
from .pickled import Weights
from .paths import check_paths
from .precision import Precision
from .projection import GradientProjector
from .report import HELD_SETS, write_json
from .unlearn import NullProgress, Progress, unlearn

# Below this share of the projected-on images (--retain or stand-ins) keeping their prediction, the
# report warns. A sound run keeps nearly all: 99.6-100 % of the stand-ins on the ResNet-18 benchmark
# at k = 4 and 16; two runs broken by distillation weight 100 at k = 4 kept 91.0 % (test accuracy
# 74.6 %) and 10.9 % (10 %) (benchmarks/RESULTS.md, "A distillation weight that grows").
HELD_AGREEMENT = 0.95


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda (got '{device}')")
    return torch.device(device)


def default_output(checkpoint: Path, goal: str) -> Path:
    """``<input stem>-<goal>.safetensors`` beside the input (for a folder: beside the folder)."""
    stem = checkpoint.name if checkpoint.is_dir() else checkpoint.stem
    return checkpoint.parent / f"{stem}-{goal}.safetensors"


def check_output(out: Path, checkpoint: Path, force: bool, what: str = "output") -> None:
    """Refuse, before any work, to write over the input or over an existing file."""
    inputs = [checkpoint] + ([checkpoint / "model.safetensors", checkpoint / "pytorch_model.bin"] if checkpoint.is_dir() else [])
    if any(out.exists() and i.exists() and os.path.samefile(out, i) for i in inputs) or \
            any(out.resolve() == i.resolve() for i in inputs):
        raise UsageError(f"{out}: the {what} would overwrite the input checkpoint; choose another --out")
    if out.is_dir():
        raise InputError(f"{out}: is a folder; --out needs a file name")
    if out.exists() and not force:
        raise InputError(f"{out}: already exists (use --force to replace it)")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{out}: folder {folder} does not exist")
    # Try it rather than ask os.access, which says yes to root and knows no read-only mounts.
    try:
        fd, probe = tempfile.mkstemp(prefix=".l2ul-probe-", dir=folder)
    except OSError as exc:
        raise InputError(f"{out}: folder {folder} is not writable ({exc.strerror})") from exc
    os.close(fd)
    os.unlink(probe)


def load_samples(loaded: LoadedModel, images: str | os.PathLike | None, manifest: str | os.PathLike | None,
                 *, require_new_label: bool = False) -> list[Sample]:
    if (images is None) == (manifest is None):
        raise UsageError("give exactly one of --images or --manifest")
    if images is not None:
        return scan_folder(images, loaded.class_names, loaded.num_classes)
    return read_manifest(manifest, loaded.class_names, loaded.num_classes, require_new_label=require_new_label)


def _folder_or_manifest(loaded: LoadedModel, item: str | os.PathLike, *, require_new_label: bool = False) -> list[Sample]:
    """Samples of a folder (scanned) or of a CSV manifest, as --keep, --retain and --forget take."""
    p = Path(item)
    if p.is_dir():
        return scan_folder(p, loaded.class_names, loaded.num_classes)
    return read_manifest(p, loaded.class_names, loaded.num_classes, require_new_label=require_new_label)


def _retain_samples(loaded: LoadedModel, retain: Sequence[str | os.PathLike]) -> list[Sample]:
    """Other images of the domain (folders or CSVs; labels, if any, are not used)."""
    return [s for item in retain for s in _folder_or_manifest(loaded, item)]


def _original(path: Path, loaded: LoadedModel, load_kw: dict[str, Any]) -> tuple[LoadedModel, str | None]:
    """The checkpoint before a stream's first request (``--original``): the same network as the
    input, or an error; and a warning when the input's ledger did not begin from it."""
    first = load_model(path, **load_kw)
    mine, theirs = loaded.state_dict(), first.state_dict()
    if first.num_classes != loaded.num_classes or mine.keys() != theirs.keys() or \
            any(mine[k].shape != theirs[k].shape for k in mine):
        raise InputError(f"{path}: --original is not the same network as the input checkpoint")
    first.model.eval()
    segment = [e for e in loaded.ledger if isinstance(e, dict)]
    starts = [i for i, e in enumerate(segment) if e.get("new_segment")]
    # Without a ledger the input is where the stream begins.
    began = segment[starts[-1] if starts else 0].get("input_sha256") if segment else loaded.source.sha256
    note = None
    if began and began != first.source.sha256:  # an entry without the hash cannot be checked
        note = (f"warning: --original {path.name} is not the checkpoint this ledger began from "
                f"(SHA-256 {began[:12]}…); distillation and the penalty anchor use it anyway")
    return first, note


def _keep_samples(loaded: LoadedModel, keep: Sequence[str | os.PathLike], goal: str) -> list[Sample]:
    """Images of earlier requests (folders or CSVs) that must stay forgotten / relabelled."""
    out: list[Sample] = []
    for item in keep:
        got = _folder_or_manifest(loaded, item, require_new_label=goal == "relabel")
        if goal == "forget":
            _labelled(got, "--keep")
        out.extend(got)
    return out


def _image_rows(loaded: LoadedModel, samples: Sequence[Sample], labels: torch.Tensor, before: torch.Tensor,
                after: torch.Tensor, new: torch.Tensor | None) -> list[dict[str, Any]]:
    rows = []
    for i, s in enumerate(samples):
        row = {
            "path": str(s.path),
            "label": loaded.class_name(int(labels[i])),
            "label_source": "given" if s.label is not None else "prediction",
            "before": loaded.class_name(int(before[i])),
            "after": loaded.class_name(int(after[i])),
        }
        if new is not None:
            row["new_label"] = loaded.class_name(int(new[i]))
        rows.append(row)
    return rows


def run_request(
    goal: Goal,
    checkpoint: str | os.PathLike,
    *,
    images: str | os.PathLike | None = None,
    manifest: str | os.PathLike | None = None,
    arch: str | None = None,
    out: str | os.PathLike | None = None,
    report_path: str | os.PathLike | None = None,
    method: str = DEFAULT_METHOD,
    device: str = "auto",
    seed: int = 0,
    force: bool = False,
    allow_partial: bool = False,
    input_size: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    attack: AttackConfig | None = None,
    attack_overrides: dict[str, Any] | None = None,
    unlearn_overrides: dict[str, Any] | None = None,
    request_id: str | None = None,
    record_paths: bool = False,
    keep: Sequence[str | os.PathLike] = (),
    retain: Sequence[str | os.PathLike] = (),
    original: str | os.PathLike | None = None,
    eval_images: str | os.PathLike | None = None,
    precision: Precision = "auto",
    progress: Progress | None = None,
    options: dict[str, Any] | None = None,
    extra_reads: Mapping[str, Sequence[str | os.PathLike | None]] | None = None,
    extra_writes: Mapping[str, str | os.PathLike | None] | None = None,
    weights: Weights = "auto",
    model_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Unlearn (``goal="forget"``) or relabel (``goal="relabel"``) and write the result.

    ``retain``: folders or CSVs of other images from the same domain (no labels needed); every
    update is then kept orthogonal to what the layers see on them (:mod:`.projection`).
    ``original``: the checkpoint before a stream's first request; with ``keep``, each request
    then distils towards it and anchors the importance penalty at it (:func:`.unlearn.unlearn`).
    ``extra_reads`` / ``extra_writes``: other paths of the command, by option (``--config``;
    ``--markdown`` and its figures), that no write may replace (:func:`.paths.check_paths`).
    ``weights``, ``model_kwargs``: as :func:`.models.load_model` takes them; ``original`` is read
    with the same choice (``auto``: the weights the input's stream began from).

    Returns the report dict. Raises :class:`GoalNotMet` (after writing the report, and the
    checkpoint only with ``allow_partial``) when the step cap is hit first.
    """
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    progress = progress or NullProgress()
    allowed = FORGET_METHODS if goal == "forget" else RELABEL_METHODS
    if method not in allowed:
        raise UsageError(f"--method must be one of {', '.join(allowed)} for {goal} (got '{method}')")
    given = {k: v for k, v in (unlearn_overrides or {}).items() if v is not None}
    for key, value in given.items():
        if isinstance(value, (int, float)) and value < 0:  # a bool is never negative
            raise UsageError(f"--{key.replace('_', '-')} must not be negative (got {value})")
    cfg: UnlearnConfig = preset(method, **given)
    # Settings of a term the method does not have would be ignored: say so instead.
    if "margin" in given and cfg.objective != "margin":
        raise UsageError(f"--margin shapes the bounded objective only; {method} uses {cfg.objective} (add --objective margin)")
    for key in ("shift_copies", "mix_copies"):
        if given.get(key) and cfg.adv_loss != "kd":
            raise UsageError(f"--{key.replace('_', '-')} adds distillation anchors; {method} has adv-loss "
                             f"{cfg.adv_loss} (add --adv-loss kd)")
    attack = attack or attack_preset(method, **(attack_overrides or {}))
    dev = resolve_device(device)
    ckpt = Path(checkpoint)
    out_path = Path(out) if out is not None else default_output(ckpt, goal)
    writes = {"--out": out_path, "--report": report_path, **(extra_writes or {})}
    check_paths({"CHECKPOINT": [ckpt], "--original": [original], "--images": [images], "--manifest": [manifest],
                 "--keep": keep, "--retain": retain, "--eval": [eval_images], **(extra_reads or {})}, writes)

    t0 = time.perf_counter()
    loaded = load_model(ckpt, arch, input_size=input_size, mean=mean, std=std, device=dev, weights=weights,
                        model_kwargs=model_kwargs)
    check_output(out_path, ckpt, force)
    if report_path is not None:
        check_output(Path(report_path), ckpt, True, "report")
    first, first_note = None, None
    if original is not None:
        check_output(out_path, Path(original), force)
        first_weights = weights if weights != "auto" else (loaded.lineage_weights or "auto")
        first, first_note = _original(Path(original), loaded, dict(arch=arch, input_size=input_size, mean=mean, std=std, device=dev,
                                                                   weights=first_weights, model_kwargs=model_kwargs))
    samples = load_samples(loaded, images, manifest, require_new_label=goal == "relabel")
    kept = _keep_samples(loaded, keep, goal)
    retained = _retain_samples(loaded, retain)
    # Manifests list images anywhere, and a hard link may sit outside its folder.
    check_paths({f"an image of {'--images' if images is not None else '--manifest'}": [s.path for s in samples],
                 "an image of --keep": [s.path for s in kept], "an image of --retain": [s.path for s in retained]}, writes)
    n_all = len(samples) + len(kept)  # and their copies: adversarial, shifted, mixed; stand-ins or --retain
    check_planned_memory(n_all * (1 + attack.n_adv + cfg.shift_copies + cfg.mix_copies)
                         + (len(retained) or cfg.stand_ins(n_all)), loaded.preprocessing, "the images, their attack and anchor copies, stand-ins")
    x = load_images(samples, loaded.preprocessing).to(dev)
    x_keep = load_images(kept, loaded.preprocessing).to(dev) if kept else None
    x_retain = load_images(retained, loaded.preprocessing).to(dev) if retained else None
    seconds["load"] = time.perf_counter() - t0

    broken = continuity(loaded.ledger, loaded.state_dict()) if loaded.ledger or loaded.source.meta.get("_unparsable") else None
    if loaded.source.meta.get("_unparsable"):
        broken = "the checkpoint's l2ul metadata does not parse; a new ledger starts here"
    model = loaded.model
    before_logits = predict(model, [x], dev)
    before_pred = before_logits.argmax(1)
    labels = torch.tensor([s.label if s.label is not None else int(before_pred[i]) for i, s in enumerate(samples)])
    # With --eval, a forget request also gets the membership-inference check before and after.
    mia_set = [replace(s, label=int(labels[i])) for i, s in enumerate(samples)] if goal == "forget" else None
    eval_before = evaluate_checkpoint(ckpt, images=eval_images, device=str(dev), loaded=loaded,
                                      forget_set=mia_set) if eval_images else None
    new = None
    if goal == "relabel":
        new = torch.tensor([s.new_label for s in samples])
        same = [s.source for i, s in enumerate(samples) if s.label is None and int(before_pred[i]) == s.new_label]
        targets = new
        before_key = "relabel_accuracy"
        before_value = accuracy(before_logits, new)
    else:
        targets = labels
        before_key = "forget_accuracy"
        before_value = accuracy(before_logits, labels)

    n = len(samples)
    x_all, t_all, a_all = x, targets, labels
    if kept:
        # Earlier requests' images join the goal check and the regularisers, so this request
        # cannot make the model remember them again.
        k_pred = predict(model, [x_keep], dev)
        k_labels = torch.tensor([s.label if s.label is not None else int(k_pred[i].argmax()) for i, s in enumerate(kept)])
        k_targets = torch.tensor([s.new_label for s in kept]) if goal == "relabel" else k_labels
        x_all = torch.cat([x, x_keep])
        t_all, a_all = torch.cat([targets, k_targets]), torch.cat([labels, k_labels])
        keep_before = accuracy(k_pred, k_targets)
    projector = None
    if x_retain is not None:
        t0 = time.perf_counter()
        projector = GradientProjector(model, x_retain, energy=cfg.retain_energy)
        projector.source = f"{len(retained)} --retain images"
        seconds["retain"] = time.perf_counter() - t0
    result = unlearn(
        model, x_all, t_all.to(dev), goal=goal, num_classes=loaded.num_classes, config=cfg, attack=attack,
        attack_labels=a_all.to(dev), seed=seed, precision=precision, progress=progress, projector=projector,
        kept=len(kept), original=first.model if first is not None else None,
    )
    seconds.update(result.seconds)
    all_logits = result.logits
    result.logits = all_logits[:n]
    after_pred = result.logits.argmax(1)
    after_value = accuracy(result.logits, targets)

    notes = list(result.notes)
    if first_note:
        notes.append(first_note)
    if broken:
        notes.append(f"warning: {broken}; the ledger starts a new segment")
    if loaded.ledger and not kept:
        notes.append(f"{len(loaded.ledger)} earlier request(s) in the ledger were not re-checked (pass their images with --keep)")
    if outside := outside_note(samples + kept + retained):
        notes.append(outside)
    if goal == "relabel" and same:
        notes.append(f"{len(same)} image(s) were already predicted as their new label before the run")
    report: dict[str, Any] = {
        "command": goal,
        "goal_met": result.goal_met,
        "method": method,
        "device": str(dev) if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})",
        "seed": seed,
        "precision": result.precision,
        "arch": loaded.arch,
        "weights": {"used": loaded.weights_used, "reason": loaded.weights_reason},
        "n_images": len(samples),
        "before": {before_key: before_value},
        "after": {before_key: after_value},
        "steps": result.steps,
        "seconds": seconds,
        "input": str(ckpt),
        "input_sha256": loaded.source.sha256,
        "output": None,
        "output_sha256": None,
        "adv_attack_success": result.adv_attack_success,
        "lambda_final": result.lam_final,
        "config": {"attack": {**asdict(attack), "eps": attack.radius(tuple(x.shape[1:])),
                              "batch_size": attack.chunk_rows(tuple(x.shape[1:]), x.device.type)},
                   "unlearn": {**asdict(cfg), "adv_weight": result.adv_weight}},
        "images": _image_rows(loaded, samples, labels, before_pred, after_pred, new),
        "notes": notes,
    }
    report["projection"] = result.projection
    if first is not None:
        report["original"] = {"path": str(original), "sha256": first.source.sha256}
        report["config"]["original_sha256"] = first.source.sha256  # the ledger records the hash, not the path
    if projector is not None:
        report["retain"] = {"n_images": len(retained), "agreement": projector.agreement(model, x_retain)}
    if result.stand_in_agreement is not None:
        report["stand_ins"] = {"n_images": cfg.stand_ins(len(x_all)), "agreement": result.stand_in_agreement}
    for key, what in HELD_SETS:
        if key in report and report[key]["agreement"] < HELD_AGREEMENT:
            notes.append(f"warning: only {report[key]['agreement']:.1%} of the {what} keep their prediction although the "
                         "projection holds them: accuracy elsewhere has probably dropped (measure it with --eval)")
    if options is not None:
        report["options"] = options  # as resolved from flags, --config and defaults
    if kept:
        key = "forget_accuracy" if goal == "forget" else "relabel_accuracy"
        report["keep"] = {"n_images": len(kept), "before": {key: keep_before},
                          "after": {key: accuracy(all_logits[n:], t_all[n:])}}
    if eval_before is not None:
        eval_after = evaluate_checkpoint(ckpt, images=eval_images, device=str(dev), loaded=loaded, forget_set=mia_set)
        report["eval"] = {"images": str(eval_images), "before": eval_before, "after": eval_after}
        report["before"]["accuracy"] = eval_before["accuracy"]
        report["after"]["accuracy"] = eval_after["accuracy"]
    # Both commands report accuracy against the current labels (the forget report's keys).
    report["before"]["forget_accuracy"] = accuracy(before_logits, labels)
    report["after"]["forget_accuracy"] = accuracy(result.logits, labels)
    write_it = result.goal_met or allow_partial
    if write_it:
        t0 = time.perf_counter()
        loaded.ledger.append(make_entry(
            command=goal, method=method, settings=report["config"], samples=samples, before=report["before"],
            after=report["after"], goal_met=result.goal_met, input_sha256=loaded.source.sha256,
            output_weights=loaded.state_dict(), request_id=request_id, record_paths=record_paths,
            new_segment=broken,
        ))
        meta = loaded.metadata()
        report["output_sha256"] = write_checkpoint(out_path, loaded.state_dict(), meta)
        report["output"] = str(out_path)
        seconds["write"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    if report_path is not None:
        write_json(report_path, report)
    if not result.goal_met:
        raise GoalNotMet(
            f"goal not met after {result.steps} steps ({after_value:.1%} {'still correct' if goal == 'forget' else 'relabelled'}); "
            + ("wrote the partial checkpoint" if allow_partial else "no checkpoint written (raise --max-steps or use --allow-partial)")
        , report=report)
    return report


def forget(checkpoint: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
    """Make the model misclassify every given image (NEGGRAD / ADV / ADV+IMP)."""
    kwargs.setdefault("method", DEFAULT_METHOD)
    return run_request("forget", checkpoint, **kwargs)


def relabel(checkpoint: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
    """Make the model predict each listed image's new label (CORRECT / ADV / ADV+IMP)."""
    kwargs.setdefault("method", DEFAULT_METHOD)
    return run_request("relabel", checkpoint, **kwargs)


def _labelled(samples: Sequence[Sample], what: str) -> torch.Tensor:
    missing = [s.source for s in samples if s.label is None]
    if missing:
        raise InputError(f"{missing[0]}: {what} needs labelled images (class sub-folders, or a manifest 'label' column)")
    return torch.tensor([s.label for s in samples])


def _logits(loaded: LoadedModel, samples: Sequence[Sample], dev: torch.device, batch_size: int = 256) -> torch.Tensor:
    from .data import iter_batches

    return predict(loaded.model, iter_batches(samples, loaded.preprocessing, batch_size), dev)


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    images: str | os.PathLike | None = None,
    manifest: str | os.PathLike | None = None,
    arch: str | None = None,
    device: str = "auto",
    compare: str | os.PathLike | None = None,
    forget_set: str | os.PathLike | Sequence[Sample] | None = None,
    input_size: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    loaded: LoadedModel | None = None,
    weights: Weights = "auto",
    model_kwargs: dict[str, Any] | None = None,
    extra_reads: Mapping[str, Sequence[str | os.PathLike | None]] | None = None,
    extra_writes: Mapping[str, str | os.PathLike | None] | None = None,
) -> dict[str, Any]:
    """Metrics of a checkpoint on labelled images; optionally against another checkpoint
    (``compare``) and with a membership-inference check of unlearned images (``forget_set``: a
    folder, a CSV or labelled samples, with ``images`` as the held-out data).

    ``extra_writes``: the paths the caller will write (``--report``, ``--markdown``…), by option;
    none may replace an input (nor ``extra_reads``, e.g. ``--config``)."""
    from .evaluate import membership_inference, streisand, summarize

    t0 = time.perf_counter()
    dev = resolve_device(device)
    writes = dict(extra_writes or {})
    forget_path = [forget_set] if isinstance(forget_set, (str, os.PathLike)) else []
    check_paths({"CHECKPOINT": [checkpoint], "--images": [images], "--manifest": [manifest], "--compare": [compare],
                 "--forget": forget_path, **(extra_reads or {})}, writes)
    if loaded is None:
        loaded = load_model(checkpoint, arch, input_size=input_size, mean=mean, std=std, device=dev, weights=weights,
                            model_kwargs=model_kwargs)
    samples = load_samples(loaded, images, manifest)
    check_paths({f"an image of {'--images' if images is not None else '--manifest'}": [s.path for s in samples]}, writes)
    labels = _labelled(samples, "evaluation")
    logits = _logits(loaded, samples, dev)
    report: dict[str, Any] = {"command": "eval", "checkpoint": str(checkpoint), "arch": loaded.arch,
                              "weights": {"used": loaded.weights_used, "reason": loaded.weights_reason},
                              "device": str(dev), **summarize(logits, labels, loaded.num_classes, loaded.class_names)}
    if compare is not None:
        other = load_model(compare, arch, input_size=input_size, mean=mean, std=std, device=dev, model_kwargs=model_kwargs)
        if other.num_classes != loaded.num_classes:
            raise InputError(f"{compare}: has {other.num_classes} classes, {checkpoint} has {loaded.num_classes}")
        o_logits = _logits(other, samples, dev)
        pred, o_pred = logits.argmax(1), o_logits.argmax(1)
        changed = (pred != o_pred).nonzero().flatten().tolist()
        report["compare"] = {
            "checkpoint": str(compare),
            "accuracy": accuracy(o_logits, labels),
            "agreement": float((pred == o_pred).float().mean()),
            "changed": [{"path": str(samples[i].path), "label": loaded.class_name(int(labels[i])),
                         "this": loaded.class_name(int(pred[i])), "other": loaded.class_name(int(o_pred[i]))}
                        for i in changed],
        }
    f_samples: list[Sample] = []
    if forget_set is not None:
        is_path = isinstance(forget_set, (str, os.PathLike))
        f_samples = _folder_or_manifest(loaded, forget_set) if is_path else list(forget_set)
        check_paths({"an image of --forget": [s.path for s in f_samples]}, writes)
        f_labels = _labelled(f_samples, "--forget")
        f_logits = _logits(loaded, f_samples, dev)
        report["forget"] = {"n_images": len(f_samples), "forget_accuracy": accuracy(f_logits, f_labels),
                            "streisand": streisand(f_labels, f_logits.argmax(1), loaded.num_classes)}
        report["mia"] = membership_inference(f_logits, f_labels, logits, labels)
    if outside := outside_note(samples + f_samples):
        report["notes"] = [outside]
    report["seconds"] = {"total": time.perf_counter() - t0}
    return report
