"""The library's front door: ``forget`` and ``relabel`` from paths to a written checkpoint and
a report dict. The CLI calls exactly these; so do the benchmarks and the examples.

Everything that can fail on input (paths, images, labels, output location) is checked before
the first expensive step, and nothing is written unless the run succeeds.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .checkpoint import write_checkpoint
from .config import DEFAULT_METHOD, SEPARATE_METHODS, AttackConfig, UnlearnConfig, attack_config, resolve
from .data import Sample, check_planned_memory, load_images, outside_note, read_manifest, scan_folder
from .errors import DamagedModel, GoalNotMet, InputError, UsageError
from .goals import FORGET, INDISTINGUISHABLE, Goal, LossTargetGoal, goal_named
from .health import assess, damage_message
from .evaluate import accuracy, predict
from .ledger import continuity, make_entry
from .models import LoadedModel, load_model
from .paths import check_paths
from .pickled import Weights
from .precision import Precision
from .report import HELD_SETS, write_json
from .threads import Threads, use_threads
from .index import RetainedIndex
from .retention import index_space
from .unlearn import ImageSet, NullProgress, Progress, UnlearnResult, unlearn

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


def _keep_samples(loaded: LoadedModel, keep: Sequence[str | os.PathLike], goal: Goal) -> list[Sample]:
    """Images of earlier requests (folders or CSVs) that must stay forgotten / relabelled."""
    out: list[Sample] = []
    for item in keep:
        got = _folder_or_manifest(loaded, item, require_new_label=not goal.away)
        if goal.away:  # what to move away from must be known, not guessed from the predictions
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


@dataclass
class _Request:
    """What a request's inputs resolve to, before any update."""

    goal: Goal
    config: UnlearnConfig
    attack: AttackConfig
    device: torch.device
    checkpoint: Path
    out: Path
    loaded: LoadedModel
    samples: list[Sample]
    kept: list[Sample]
    retained: list[Sample]
    new: ImageSet
    keep: ImageSet | None
    retain: torch.Tensor | None
    first: LoadedModel | None
    original: str | None  # --original as given
    broken: str | None  # why the input's ledger cannot be continued (checked before any update)
    evaluated: list[Sample]  # --eval images
    notes: list[str]
    method: str = DEFAULT_METHOD
    holdout: ImageSet | None = None  # --holdout: labelled images the model never trained on
    index: RetainedIndex | None = None  # --index, checked against the checkpoint
    index_file: dict[str, Any] | None = None  # its path and SHA-256, for the report and the ledger
    update_index: Path | None = None


@dataclass
class RequestOptions:
    """What a forget or relabel request takes besides its goal and checkpoint: the CLI's options.

    ``retain``: folders or CSVs of other images from the same domain (no labels needed); every
    update is then kept orthogonal to what the layers see on them (:mod:`.retention`).
    ``original``: the checkpoint before a stream's first request; with ``keep``, each request
    then distils towards it and anchors the importance penalty at it (:func:`.unlearn.unlearn`).
    ``extra_reads`` / ``extra_writes``: other paths of the command, by option (``--config``;
    ``--markdown`` and its figures), that no write may replace (:func:`.paths.check_paths`).
    ``weights``, ``model_kwargs``: as :func:`.models.load_model` takes them; ``original`` is read
    with the same choice (``auto``: the weights the input's stream began from).
    ``threads``: the CPU threads to compute with (:func:`.threads.choose_threads`; None: as set).
    ``options``, ``command_line``: as the CLI resolved and received them, for the report.
    """

    images: str | os.PathLike | None = None
    manifest: str | os.PathLike | None = None
    arch: str | None = None
    out: str | os.PathLike | None = None
    report_path: str | os.PathLike | None = None
    method: str = DEFAULT_METHOD
    device: str = "auto"
    seed: int = 0
    force: bool = False
    allow_partial: bool = False
    input_size: Sequence[int] | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    attack: AttackConfig | None = None
    attack_overrides: dict[str, Any] | None = None
    unlearn_overrides: dict[str, Any] | None = None
    request_id: str | None = None
    record_paths: bool = False
    keep: Sequence[str | os.PathLike] = ()
    retain: Sequence[str | os.PathLike] = ()
    original: str | os.PathLike | None = None
    eval_images: str | os.PathLike | None = None
    holdout: str | os.PathLike | None = None
    index: str | os.PathLike | None = None
    update_index: str | os.PathLike | None = None
    precision: Precision = "auto"
    progress: Progress | None = None
    options: dict[str, Any] | None = None
    extra_reads: Mapping[str, Sequence[str | os.PathLike | None]] | None = None
    extra_writes: Mapping[str, str | os.PathLike | None] | None = None
    weights: Weights = "auto"
    model_kwargs: dict[str, Any] | None = None
    command_line: str | None = None
    threads: Threads | None = None

    def load_kw(self) -> dict[str, Any]:
        """How to build the model and read its images (:func:`.models.load_model`)."""
        return dict(arch=self.arch, input_size=self.input_size, mean=self.mean, std=self.std, crop_pct=self.crop_pct,
                    interpolation=self.interpolation, weights=self.weights, model_kwargs=self.model_kwargs)


def run_request(goal: str, checkpoint: str | os.PathLike, **options: Any) -> dict[str, Any]:
    """Unlearn (``goal="forget"``) or relabel (``goal="relabel"``) and write the result;
    ``options``: the fields of :class:`RequestOptions`.

    Returns the report dict. Raises :class:`DamagedModel` when the health check finds the model
    broken elsewhere, else :class:`GoalNotMet` when the step cap is hit first (each after writing
    the report, and the checkpoint only with ``allow_partial``).
    """
    o = RequestOptions(**options)
    t_start = t0 = time.perf_counter()
    threads_used = use_threads(o.threads)
    req = _prepare(goal, checkpoint, o)
    seconds = {"load": time.perf_counter() - t0}
    model, dev = req.loaded.model, req.device
    before_logits = predict(model, [req.new.images], dev)
    keep_before = predict(model, [req.keep.images], dev) if req.keep is not None else None
    # With --eval, a forget request also gets the membership-inference check before and after.
    mia_set = [replace(s, label=int(req.new.labels[i])) for i, s in enumerate(req.samples)] if req.goal.away else None
    evaluated = [_evaluate(req, mia_set)] if req.evaluated else []
    held_before = predict(model, [req.holdout.images], dev) if isinstance(req.goal, LossTargetGoal) else None
    result = _run_method(req, seed=o.seed, precision=o.precision, progress=o.progress or NullProgress())
    seconds.update(result.seconds)
    report = _report(req, result, method=o.method, seed=o.seed, before_logits=before_logits, keep_before=keep_before)
    report.update({**result.extra, "threads": threads_used})
    if held_before is not None:
        report["indistinguishable"] = _indistinguishable(req, before_logits, result.logits, held_before)
    if evaluated:
        evaluated.append(_evaluate(req, mia_set))
    health = _finish_report(req, report, result, evaluated, o)
    report["seconds"] = seconds
    if (result.goal_met and health["healthy"] is not False) or o.allow_partial:
        t0 = time.perf_counter()
        _write(req, report, method=o.method, request_id=o.request_id, record_paths=o.record_paths,
               updated_index=result.updated_index)
        seconds["write"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    if o.report_path is not None:
        write_json(o.report_path, report)
    if health["healthy"] is False:
        raise DamagedModel(damage_message(health, report["output"]), report=report)
    if not result.goal_met:
        raise _goal_not_met(req.goal, report, o.allow_partial)
    return report


def _finish_report(req: _Request, report: dict[str, Any], result: UnlearnResult,
                   evaluated: list[tuple[dict[str, Any], torch.Tensor]], o: RequestOptions) -> dict[str, Any]:
    """The report's index, --eval, health, options and command line; returns the health verdict."""
    if req.index_file is not None:
        report["index"] = req.index_file
        report["config"]["index_sha256"] = req.index_file["sha256"]  # the ledger's record of which index
    probes = dict(result.probes)
    if evaluated:
        (before, pred_before), (after, pred_after) = evaluated
        report["eval"] = {"images": str(o.eval_images), "before": before, "after": after}
        report["before"]["accuracy"], report["after"]["accuracy"] = before["accuracy"], after["accuracy"]
        probes["eval"] = {"n_images": len(pred_after), "agreement": float((pred_before == pred_after).float().mean())}
    report["health"] = health = assess(probes)
    report["healthy"] = health["healthy"]
    if o.options is not None:
        report["options"] = o.options  # as resolved from flags, --config and defaults
    if o.command_line is not None:
        report["command_line"] = o.command_line  # as typed, so a report says how to run it again
    return health


def _indistinguishable(req: _Request, before: torch.Tensor, after: torch.Tensor, held_before: torch.Tensor) -> dict:
    """The attacks against the --holdout images before and after, and the accuracies they
    should match: a forgotten image should be right about as often as an unseen one (binomial
    noise at this k) and the attack AUCs near 0.5."""
    from .evaluate import auc_interval, membership_inference

    labels, held = req.new.labels, req.holdout
    held_after = predict(req.loaded.model, [held.images], req.device)
    k, p = len(labels), accuracy(held_before, held.labels)
    out: dict[str, Any] = {"holdout": len(held), "holdout_accuracy": p, "tolerance": req.goal.tolerance,
                           "binomial_noise": 1.96 * (p * (1 - p) / max(1, k)) ** 0.5}
    for when, f_logits, h_logits in (("before", before, held_before), ("after", after, held_after)):
        m = membership_inference(f_logits, labels, h_logits, held.labels)
        out[when] = {"forget_accuracy": accuracy(f_logits, labels), "holdout_accuracy": accuracy(h_logits, held.labels),
                     "loss_auc": m["loss_auc"], "confidence_auc": m["confidence_auc"],
                     "loss_auc_interval": auc_interval(m["loss_auc"], k, len(held))}
    a = out["after"]
    out["met"] = bool(abs(a["forget_accuracy"] - p) <= out["binomial_noise"]
                      and all(abs(a[key] - 0.5) <= 0.05 for key in ("loss_auc", "confidence_auc")))
    return out


def _run_method(req: _Request, *, seed: int, precision: Precision, progress: Progress) -> UnlearnResult:
    """The method's algorithm: the core's composition (:func:`.unlearn.unlearn`), or LTU's own."""
    if req.method == "ltu":
        from .ltu import run_ltu

        return run_ltu(req.loaded.model, req.new, req.retain, req.holdout, goal=req.goal, config=req.config,
                       seed=seed, device=req.device)
    if req.method == "pgu":
        from .pgu import run_pgu

        return run_pgu(req.loaded.model, req.new, req.index, req.holdout, goal=req.goal, config=req.config,
                       device=req.device, progress=progress)
    return unlearn(
        req.loaded.model, req.new.images, req.new.targets.to(req.device), goal=req.goal,
        num_classes=req.loaded.num_classes, config=req.config, attack=req.attack,
        attack_labels=req.new.labels.to(req.device), seed=seed, precision=precision, progress=progress,
        retain=req.retain, keep=req.keep, original=req.first.model if req.first is not None else None,
        space=index_space(req.loaded.model, req.index, req.config.retain_energy) if req.index is not None else None,
    )


def _goal_not_met(goal: Goal, report: dict[str, Any], allow_partial: bool) -> GoalNotMet:
    after = report["after"][goal.report_key]
    return GoalNotMet(f"goal not met after {report['steps']} steps ({after:.1%} {goal.unmet}); "
                      + ("wrote the partial checkpoint" if allow_partial else
                         "no checkpoint written (raise --max-steps or use --allow-partial)"), report=report)


def _prepare(goal: str, checkpoint: str | os.PathLike, o: RequestOptions) -> _Request:
    """Check every option and input, load the model and the images; nothing expensive yet."""
    g = goal_named(goal)
    cfg = resolve(o.method, g.name, **(o.unlearn_overrides or {}))
    if cfg.objective == "indistinguishable":
        g = INDISTINGUISHABLE
    attack = o.attack or attack_config(o.method, **(o.attack_overrides or {}))
    dev = resolve_device(o.device)
    ckpt = Path(checkpoint)
    out_path = Path(o.out) if o.out is not None else default_output(ckpt, g.name)
    writes = {"--out": out_path, "--report": o.report_path, "--update-index": o.update_index, **(o.extra_writes or {})}
    check_paths({"CHECKPOINT": [ckpt], "--original": [o.original], "--images": [o.images], "--manifest": [o.manifest],
                 "--keep": o.keep, "--retain": o.retain, "--eval": [o.eval_images], "--holdout": [o.holdout],
                 "--index": [o.index], **(o.extra_reads or {})}, writes)
    _check_method_inputs(o)
    load_kw = o.load_kw()
    loaded = load_model(ckpt, device=dev, **load_kw)
    check_output(out_path, ckpt, o.force)
    if o.report_path is not None:
        check_output(Path(o.report_path), ckpt, True, "report")
    first, notes = None, []
    if o.original is not None:
        check_output(out_path, Path(o.original), o.force)
        # auto: the weights (model or EMA) the input's stream began from
        first_weights = o.weights if o.weights != "auto" else (loaded.lineage_weights or "auto")
        first, first_note = _original(Path(o.original), loaded, {**load_kw, "device": dev, "weights": first_weights})
        notes += [first_note] if first_note else []
    samples = load_samples(loaded, o.images, o.manifest, require_new_label=not g.away)
    kept = _keep_samples(loaded, o.keep, g)
    retained = _retain_samples(loaded, o.retain)
    evaluated = load_samples(loaded, o.eval_images, None) if o.eval_images is not None else []
    held_out = _holdout_samples(loaded, o.holdout, samples)
    _check_images(o.images, samples, kept, retained, evaluated + held_out, writes)
    n_all = len(samples) + len(kept)  # and their copies: adversarial, shifted, blended; stand-ins or --retain
    check_planned_memory(n_all * (1 + attack.n_adv + cfg.shift_copies + cfg.mix_copies)
                         + (len(retained) or cfg.stand_ins(n_all)), loaded.preprocessing,
                         "the images, their attack and anchor copies, stand-ins")
    holdout_set = _image_set(loaded, held_out, FORGET, dev) if held_out else None
    new = _image_set(loaded, samples, g, dev, holdout_set)
    cached, index_file = _read_index(o.index, loaded, o.update_index, o.force)
    return _Request(g, cfg, attack, dev, ckpt, out_path, loaded, samples, kept, retained, new,
                    _image_set(loaded, kept, g, dev) if kept else None,
                    load_images(retained, loaded.preprocessing).to(dev) if retained else None,
                    first, None if o.original is None else str(o.original), _broken_ledger(loaded), evaluated, notes,
                    o.method, holdout_set,
                    cached, index_file, None if o.update_index is None else Path(o.update_index))


_NEEDS_HOLDOUT = ("--objective indistinguishable needs --holdout: labelled images the model never trained on (e.g. a "
                  "validation split), whose losses the forget images are brought to")


def _check_method_inputs(o: RequestOptions) -> None:
    """Inputs a method needs or would ignore, refused before anything loads."""
    method, retain, keep, original, holdout, index = o.method, o.retain, o.keep, o.original, o.holdout, o.index
    if method in SEPARATE_METHODS and (given := [k for k, v in (o.attack_overrides or {}).items() if v is not None]):
        raise UsageError(f"--{given[0].replace('_', '-')} sets the adversarial attack, which --method {method} does not run")
    if method == "ltu":
        if not retain:
            raise UsageError("--method ltu needs --retain images of the domain (its meta-test and membership models use them)")
        if keep or original is not None or index is not None:
            raise UsageError("--method ltu does not take --keep, --original or --index")
        if (o.unlearn_overrides or {}).get("objective") == "indistinguishable" and holdout is None:
            raise UsageError(_NEEDS_HOLDOUT)
    elif method == "pgu":
        if index is None:
            raise UsageError("--method pgu needs --index FILE (make one with: l2ul index CHECKPOINT --retain "
                             "TRAINING_IMAGES --out FILE)")
        if keep or original is not None or retain:
            raise UsageError("--method pgu does not take --keep, --original or --retain (its index holds what it keeps)")
    elif (o.unlearn_overrides or {}).get("objective") == "indistinguishable":
        if holdout is None:
            raise UsageError(_NEEDS_HOLDOUT)
        if keep:
            raise UsageError("--objective indistinguishable does not take --keep yet")
    elif holdout is not None:
        raise UsageError(f"--holdout is used by --method ltu and pgu and --objective indistinguishable; {method} "
                         "would ignore it")
    if index is not None and retain:
        raise UsageError("give --index or --retain, not both: each is a retained space")
    if o.update_index is not None and method != "pgu":
        raise UsageError("--update-index writes PGU's reduced index: it needs --method pgu")


def _read_index(path, loaded: LoadedModel, update_index, force: bool) -> tuple[RetainedIndex | None, dict[str, Any] | None]:
    """--index, refused unless made for this checkpoint or the one its ledger began from."""
    if path is None:
        return None, None
    from .files import sha256_file
    from .index import load_index

    if update_index is not None:
        check_output(Path(update_index), Path(path), force, "updated index")
    index = load_index(path)
    index.check_matches(loaded.model, loaded.source.sha256, loaded.ledger)
    return index, {"path": str(path), "sha256": sha256_file(path), "source": index.describe_source(),
                   "images": index.images, "energy": index.energy}


def _holdout_samples(loaded: LoadedModel, holdout, forget: Sequence[Sample]) -> list[Sample]:
    """--holdout images, labelled, none of them a forget image (same file contents)."""
    if holdout is None:
        return []
    from .files import sha256_file

    got = _folder_or_manifest(loaded, holdout)
    _labelled(got, "--holdout")
    forget_sha = {sha256_file(s.path) for s in forget}
    if same := [s for s in got if sha256_file(s.path) in forget_sha]:
        raise InputError(f"{same[0].source}: is also a forget image; --holdout must be images the model never trained on")
    return got


def _check_images(images, samples: list[Sample], kept: list[Sample], retained: list[Sample], evaluated: list[Sample],
                  writes: Mapping[str, Any]) -> None:
    """No write may replace an image read: a manifest lists images anywhere, and a hard link may
    sit outside its folder."""
    check_paths({f"an image of {'--images' if images is not None else '--manifest'}": [s.path for s in samples],
                 "an image of --keep": [s.path for s in kept], "an image of --retain": [s.path for s in retained],
                 "an image of --eval": [s.path for s in evaluated]}, writes)


def _evaluate(req: _Request, mia_set: list[Sample] | None) -> tuple[dict[str, Any], torch.Tensor]:
    """The --eval report of the model as it is now, and its predictions (for the health check)."""
    logits = _logits(req.loaded, req.evaluated, req.device)
    report = evaluate_checkpoint(req.checkpoint, samples=req.evaluated, logits=logits, device=str(req.device),
                                 loaded=req.loaded, forget_set=mia_set)
    return report, logits.argmax(1)


def _image_set(loaded: LoadedModel, samples: Sequence[Sample], goal: Goal, dev: torch.device,
               holdout: ImageSet | None = None) -> ImageSet:
    """The images with their labels (given, else the model's predictions) and the goal's targets."""
    x = load_images(samples, loaded.preprocessing).to(dev)
    logits = predict(loaded.model, [x], dev)
    labels = torch.tensor([s.label if s.label is not None else int(logits[i].argmax()) for i, s in enumerate(samples)])
    if isinstance(goal, LossTargetGoal):
        return ImageSet(x, _target_losses(loaded, logits, labels, holdout, dev), labels)
    targets = labels if goal.away else torch.tensor([s.new_label for s in samples])
    return ImageSet(x, targets, labels)


def _target_losses(loaded: LoadedModel, logits: torch.Tensor, labels: torch.Tensor, holdout: ImageSet,
                   dev: torch.device) -> torch.Tensor:
    """Per image [label, target loss]: the held-out images' losses at evenly spaced quantiles,
    given in the order of the images' own losses, so each moves as little as the match allows."""
    import torch.nn.functional as F

    held = F.cross_entropy(predict(loaded.model, [holdout.images], dev), holdout.labels, reduction="none")
    k = len(labels)
    quantiles = torch.quantile(held, (torch.arange(k, dtype=torch.float32) + 0.5) / k)
    want = torch.empty(k)
    want[F.cross_entropy(logits, labels, reduction="none").argsort()] = quantiles
    return torch.stack([labels.float(), want], dim=1)


def _report(req: _Request, result: UnlearnResult, *, method: str, seed: int, before_logits: torch.Tensor,
            keep_before: torch.Tensor | None) -> dict[str, Any]:
    """The report of a finished run (before any file is written)."""
    g, loaded, dev, new = req.goal, req.loaded, req.device, req.new
    before_pred, after_pred = before_logits.argmax(1), result.logits.argmax(1)
    shape = tuple(new.images.shape[1:])
    report: dict[str, Any] = {
        "command": g.name, "goal_met": result.goal_met, "method": method,
        "device": str(dev) if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})",
        "seed": seed, "precision": result.precision, "arch": loaded.arch,
        "weights": {"used": loaded.weights_used, "reason": loaded.weights_reason},
        "preprocessing": loaded.preprocessing.to_dict(), "n_images": len(req.samples),
        "before": {g.report_key: g.report_value(before_logits, new.targets)},
        "after": {g.report_key: g.report_value(result.logits, new.targets)},
        "steps": result.steps, "seconds": {}, "input": str(req.checkpoint), "input_sha256": loaded.source.sha256,
        "output": None, "output_sha256": None,
        "adv_attack_success": result.adv_attack_success, "lambda_final": result.lam_final,
        "config": {"attack": {**asdict(req.attack), "eps": req.attack.radius(shape),
                              "batch_size": req.attack.chunk_rows(shape, dev.type)},
                   "unlearn": {**asdict(req.config), "adv_weight": result.adv_weight}},
        "images": _image_rows(loaded, req.samples, new.labels, before_pred, after_pred,
                              None if g.away else new.targets),
        "notes": _notes(req, result, before_pred),
        "projection": result.projection,
    }
    if req.first is not None:
        report["original"] = {"path": req.original, "sha256": req.first.source.sha256}
        report["config"]["original_sha256"] = req.first.source.sha256  # the ledger records the hash, not the path
    if result.retained in result.probes:
        report[result.retained] = {"n_images": result.probes[result.retained]["n_images"], "agreement": result.agreement}
    for key, what in HELD_SETS:
        if key in report and report[key]["agreement"] < HELD_AGREEMENT and result.projection:
            report["notes"].append(f"warning: only {report[key]['agreement']:.1%} of the {what} keep their prediction "
                                   "although the projection holds them: accuracy elsewhere has probably dropped "
                                   "(measure it with --eval)")
    if req.keep is not None:
        report["keep"] = {"n_images": len(req.kept), "before": {g.report_key: g.report_value(keep_before, req.keep.targets)},
                          "after": {g.report_key: g.report_value(result.keep_logits, req.keep.targets)}}
    # Both commands report accuracy against the current labels (the forget report's keys).
    report["before"]["forget_accuracy"] = accuracy(before_logits, new.labels)
    report["after"]["forget_accuracy"] = accuracy(result.logits, new.labels)
    return report


def _notes(req: _Request, result: UnlearnResult, before_pred: torch.Tensor) -> list[str]:
    loaded = req.loaded
    notes = list(result.notes) + req.notes
    if req.broken:
        notes.append(f"warning: {req.broken}; the ledger starts a new segment")
    if loaded.ledger and not req.kept:
        notes.append(f"{len(loaded.ledger)} earlier request(s) in the ledger were not re-checked (pass their images with --keep)")
    if outside := outside_note(req.samples + req.kept + req.retained):
        notes.append(outside)
    if not req.goal.away:
        same = [s for i, s in enumerate(req.samples) if s.label is None and int(before_pred[i]) == s.new_label]
        if same:
            notes.append(f"{len(same)} image(s) were already predicted as their new label before the run")
    return notes


def _broken_ledger(loaded: LoadedModel) -> str | None:
    """Why the input's ledger cannot be continued, if it cannot."""
    if loaded.source.meta.get("_unparsable"):
        return "the checkpoint's l2ul metadata does not parse; a new ledger starts here"
    return continuity(loaded.ledger, loaded.state_dict()) if loaded.ledger else None


def _write(req: _Request, report: dict[str, Any], *, method: str, request_id: str | None, record_paths: bool,
           updated_index: RetainedIndex | None = None) -> None:
    """Append the request to the ledger and write the checkpoint (atomically), and PGU's reduced
    index with --update-index; fill in the report."""
    loaded = req.loaded
    loaded.ledger.append(make_entry(
        command=req.goal.name, method=method, settings=report["config"], samples=req.samples, before=report["before"],
        after=report["after"], goal_met=report["goal_met"], input_sha256=loaded.source.sha256,
        output_weights=loaded.state_dict(), request_id=request_id, record_paths=record_paths,
        new_segment=req.broken,
    ))
    report["output_sha256"] = write_checkpoint(req.out, loaded.state_dict(), loaded.metadata())
    report["output"] = str(req.out)
    if req.update_index is not None and updated_index is not None:
        from .index import save_index

        updated_index.sha256 = loaded.source.sha256 if not updated_index.sha256 else updated_index.sha256
        report["updated_index"] = {"path": str(req.update_index), "sha256": save_index(req.update_index, updated_index),
                                   "images": updated_index.images, "forgotten": updated_index.forgotten}


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
    holdout: str | os.PathLike | None = None,
    input_size: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    loaded: LoadedModel | None = None,
    samples: Sequence[Sample] | None = None,
    logits: torch.Tensor | None = None,
    weights: Weights = "auto",
    model_kwargs: dict[str, Any] | None = None,
    extra_reads: Mapping[str, Sequence[str | os.PathLike | None]] | None = None,
    extra_writes: Mapping[str, str | os.PathLike | None] | None = None,
    threads: Threads | None = None,
) -> dict[str, Any]:
    """Metrics of a checkpoint on labelled images; optionally against another checkpoint
    (``compare``) and with a membership-inference check of unlearned images (``forget_set``: a
    folder, a CSV or labelled samples, with ``images`` as the held-out data). ``samples`` and
    their ``logits``, when the caller has them, replace ``images`` and the pass over them.
    ``holdout``: labelled images the model never trained on (folder or CSV); with ``forget_set``
    the attacks compare with them instead of ``images``, and each forget image's loss is placed
    in their loss distribution.

    ``extra_writes``: the paths the caller will write (``--report``, ``--markdown``…), by option;
    none may replace an input (nor ``extra_reads``, e.g. ``--config``)."""
    from .evaluate import summarize

    t0 = time.perf_counter()
    threads_used = use_threads(threads)
    dev = resolve_device(device)
    writes = dict(extra_writes or {})
    forget_path = [forget_set] if isinstance(forget_set, (str, os.PathLike)) else []
    check_paths({"CHECKPOINT": [checkpoint], "--images": [images], "--manifest": [manifest], "--compare": [compare],
                 "--forget": forget_path, "--holdout": [holdout], **(extra_reads or {})}, writes)
    load_kw = dict(arch=arch, input_size=input_size, mean=mean, std=std, crop_pct=crop_pct, interpolation=interpolation,
                   device=dev, model_kwargs=model_kwargs)
    if loaded is None:
        loaded = load_model(checkpoint, weights=weights, **load_kw)
    samples = list(samples) if samples is not None else load_samples(loaded, images, manifest)
    check_paths({f"an image of {'--images' if images is not None else '--manifest'}": [s.path for s in samples]}, writes)
    labels = _labelled(samples, "evaluation")
    logits = logits if logits is not None else _logits(loaded, samples, dev)
    report: dict[str, Any] = {"command": "eval", "checkpoint": str(checkpoint), "arch": loaded.arch,
                              "weights": {"used": loaded.weights_used, "reason": loaded.weights_reason},
                              "preprocessing": loaded.preprocessing.to_dict(), "device": str(dev), "threads": threads_used,
                              **summarize(logits, labels, loaded.num_classes, loaded.class_names)}
    if compare is not None:
        report["compare"] = _compare(load_model(compare, **load_kw), loaded, samples, labels, logits, dev, compare, checkpoint)
    f_samples: list[Sample] = []
    if forget_set is not None:
        is_path = isinstance(forget_set, (str, os.PathLike))
        f_samples = _folder_or_manifest(loaded, forget_set) if is_path else list(forget_set)
        check_paths({"an image of --forget": [s.path for s in f_samples]}, writes)
        reference = (_holdout_samples(loaded, holdout, f_samples), "--holdout") if holdout is not None else (samples, "--images")
        report.update(_forget_report(loaded, f_samples, reference, logits if holdout is None else None, dev))
    elif holdout is not None:
        raise UsageError("--holdout is the reference of --forget's membership check: give --forget too")
    if outside := outside_note(samples + f_samples):
        report["notes"] = [*report.get("notes", []), outside]
    report["seconds"] = {"total": time.perf_counter() - t0}
    return report


def _forget_report(loaded: LoadedModel, f_samples: list[Sample], reference: tuple[list[Sample], str],
                   ref_logits: torch.Tensor | None, dev: torch.device) -> dict[str, Any]:
    """--forget: their accuracy, the spread of their new labels, the two attacks against the
    reference images (--holdout, else --images) with the AUC's interval, and each image's loss
    percentile among the reference's."""
    from .evaluate import auc_interval, membership_inference, per_image_losses, streisand

    ref_samples, name = reference
    ref_labels = _labelled(ref_samples, name)
    ref_logits = ref_logits if ref_logits is not None else _logits(loaded, ref_samples, dev)
    f_labels = _labelled(f_samples, "--forget")
    f_logits = _logits(loaded, f_samples, dev)
    mia = membership_inference(f_logits, f_labels, ref_logits, ref_labels)
    mia.update({"reference": name, "n_reference": len(ref_samples),
                "loss_auc_interval": auc_interval(mia["loss_auc"], len(f_samples), len(ref_samples))})
    rows = [{"path": str(s.path), "label": loaded.class_name(int(f_labels[i])),
             "prediction": loaded.class_name(int(f_logits[i].argmax())), **view}
            for i, (s, view) in enumerate(zip(f_samples, per_image_losses(f_logits, f_labels, ref_logits, ref_labels)))]
    out: dict[str, Any] = {
        "forget": {"n_images": len(f_samples), "forget_accuracy": accuracy(f_logits, f_labels),
                   "reference_accuracy": accuracy(ref_logits, ref_labels),
                   "streisand": streisand(f_labels, f_logits.argmax(1), loaded.num_classes), "images": rows},
        "mia": mia}
    if len(ref_samples) < 50:
        out["notes"] = [f"warning: {len(ref_samples)} {name} images: the attack AUC is noisy (95 % interval "
                        f"{mia['loss_auc_interval'][0]:.2f}-{mia['loss_auc_interval'][1]:.2f})"]
    return out


def _compare(other: LoadedModel, loaded: LoadedModel, samples: Sequence[Sample], labels: torch.Tensor,
             logits: torch.Tensor, dev: torch.device, compare, checkpoint) -> dict[str, Any]:
    """--compare: the other checkpoint's accuracy on the same images, and which predictions differ."""
    if other.num_classes != loaded.num_classes:
        raise InputError(f"{compare}: has {other.num_classes} classes, {checkpoint} has {loaded.num_classes}")
    o_logits = _logits(other, samples, dev)
    pred, o_pred = logits.argmax(1), o_logits.argmax(1)
    changed = (pred != o_pred).nonzero().flatten().tolist()
    return {
        "checkpoint": str(compare),
        "accuracy": accuracy(o_logits, labels),
        "agreement": float((pred == o_pred).float().mean()),
        "changed": [{"path": str(samples[i].path), "label": loaded.class_name(int(labels[i])),
                     "this": loaded.class_name(int(pred[i])), "other": loaded.class_name(int(o_pred[i]))}
                    for i in changed],
    }
