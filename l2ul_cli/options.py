"""Every command-line option, declared once.

Request options (paths, device, reports…) are declared in :data:`REQUEST`; the attack's and the
update loop's are the fields of :class:`.config.AttackConfig` and :class:`.config.UnlearnConfig`
that carry CLI metadata, read here with their types, defaults and help. The CLI builds its
commands from :func:`for_command`; ``--config`` files take the same names; the report's
``config`` is the dataclasses themselves.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, List, Optional

from .config import (GOAL_METHODS, INDEX_ENERGY, INDEX_STAND_INS, INTERPOLATIONS, SEPARATE_METHODS, WEIGHT_CHOICES,
                     AttackConfig, UnlearnConfig, cli_fields, default_text)

RUN = ("forget", "relabel")
ALL = ("forget", "relabel", "eval")
EVERY = (*ALL, "info", "history")


@dataclass(frozen=True)
class Opt:
    """One option: its parameter name, flags, Python type, default and help, its panel, the
    commands that have it, and where its value goes (the request, the attack or the loop)."""

    name: str
    flags: tuple[str, ...]
    type: Any
    default: Any
    help: str
    panel: str = "Inputs & outputs"
    commands: tuple[str, ...] = RUN
    target: str = "request"  # "request", "attack" or "unlearn"
    field: str | None = None  # the config field, for attack and unlearn options
    choices: tuple[str, ...] | None = None
    required: bool = False
    default_help: str | None = None  # shown as [default: …] instead of the default itself


_P, _S, _F = Optional[Path], Optional[str], Optional[float]

REQUEST: tuple[Opt, ...] = (
    Opt("images", ("--images",), _P, None, "Folder of images to forget: class sub-folders, or flat (labels = "
        "current predictions).", commands=("forget",)),
    Opt("manifest", ("--manifest",), _P, None, "CSV with columns path[,label] instead of --images.", commands=("forget",)),
    Opt("manifest", ("--manifest",), Path, ..., "CSV with columns path,new_label[,label].", commands=("relabel",),
        required=True),
    Opt("images", ("--images",), _P, None, "Labelled images: class sub-folders.", commands=("eval",)),
    Opt("manifest", ("--manifest",), _P, None, "CSV with columns path,label instead of --images.", commands=("eval",)),
    Opt("arch", ("--arch",), _S, None, "timm name (resnet18) or torchvision:NAME; read from the checkpoint when it "
        "carries one.", commands=(*ALL, "info")),
    Opt("out", ("--out",), _P, None, "Output checkpoint.", default_help="<input stem>-<command>.safetensors beside the input"),
    Opt("force", ("--force",), bool, False, "Replace an existing output file (never the input)."),
    Opt("allow_partial", ("--allow-partial",), bool, False, "Write the checkpoint even when the goal is not met."),
    Opt("input_size", ("--input-size",), _S, None, "H,W or C,H,W (or timm's '3 224 224') the model takes.", commands=ALL,
        default_help="from the checkpoint or model config"),
    Opt("mean", ("--mean",), _S, None, "Per-channel mean, comma-separated.", commands=ALL),
    Opt("std", ("--std",), _S, None, "Per-channel std, comma-separated.", commands=ALL),
    Opt("weights", ("--weights",), str, "auto", "Of a training checkpoint holding both: the model's weights or "
        "its EMA; auto takes the model's (the EMA when it is the only set) and the report says which.",
        commands=(*ALL, "info"), choices=WEIGHT_CHOICES),
    Opt("model_kwargs", ("--model-kwargs",), _S, None, "Architecture arguments, img_size=32,patch_size=4 (or "
        "a JSON object); over the model_args a timm config.json carries, and stored in the output.",
        commands=(*ALL, "info")),
    Opt("crop_pct", ("--crop-pct",), _F, None, "Resize to size / crop-pct before the centre crop (1.0: no crop).",
        commands=ALL, default_help="the checkpoint's, else timm's for the architecture"),
    Opt("interpolation", ("--interpolation",), _S, None, "Resampling of the resize.", commands=ALL,
        choices=INTERPOLATIONS, default_help="the checkpoint's, else timm's for the architecture"),
    Opt("config", ("--config",), _P, None, "TOML (or YAML) file of option = value (keys as the long options; "
        "[forget]/[relabel]/[eval] tables); flags win.", commands=ALL),
    Opt("method", ("--method",), str, "l2ul", "The paper's methods or this tool's own (README, Methods).", panel="Method"),
    Opt("seed", ("--seed",), int, 0, "Seed for attack targets, random starts and batch order.", panel="Method"),
    Opt("retain", ("--retain",), Optional[List[Path]], None, "Other images of the same domain (folder or CSV, labels "
        "not needed): updates are kept orthogonal to what the model's layers see on them; repeatable.",
        panel="Retention"),
    Opt("holdout", ("--holdout",), _P, None, "Labelled images the model never trained on (folder or CSV): "
        "--method ltu trains its membership models on them, --method pgu's stop rule compares with them.", panel="Retention",
        commands=("forget",)),
    Opt("holdout", ("--holdout",), _P, None, "Labelled images the model never trained on (folder or CSV): with "
        "--forget, the membership attacks' reference (instead of --images) and each image's loss percentile.",
        panel="Reports", commands=("eval",)),
    Opt("index", ("--index",), _P, None, "A retained-space index of this checkpoint or of the one its ledger "
        "began from (l2ul index): used instead of --retain or stand-ins; --method pgu needs one.", panel="Retention"),
    Opt("update_index", ("--update-index",), _P, None, "--method pgu: write the index less this request's images "
        "here, for the next request.", panel="Retention", commands=("forget",)),
    Opt("keep", ("--keep",), Optional[List[Path]], None, "Images of earlier requests (folder or CSV) that must stay "
        "forgotten/relabelled; repeatable.", panel="Continual"),
    Opt("original", ("--original",), _P, None, "The checkpoint before the first request of a stream (with --keep): "
        "each request distils towards it and anchors the importance penalty at it.", panel="Continual"),
    Opt("request_id", ("--request-id",), _S, None, "Id recorded in the checkpoint's ledger.", panel="Continual",
        default_help="random"),
    Opt("record_paths", ("--record-paths",), bool, False, "Record image paths in the checkpoint's ledger (by default "
        "only their SHA-256).", panel="Continual"),
    Opt("report", ("--report",), _P, None, "Write the JSON report here.", panel="Reports", commands=ALL),
    Opt("markdown", ("--markdown",), _P, None, "Also write a Markdown report here (figures as PNG files beside it "
        "with the plots extra).", panel="Reports", commands=ALL),
    Opt("html", ("--html",), _P, None, "Also write a self-contained HTML report here.", panel="Reports", commands=ALL),
    Opt("eval_images", ("--eval",), _P, None, "Labelled held-out images to evaluate before and after (accuracy and "
        "membership inference in the report).", panel="Reports"),
    Opt("compare", ("--compare",), _P, None, "A second checkpoint to run on the same images.", panel="Reports",
        commands=("eval",)),
    Opt("forget_set", ("--forget",), _P, None, "Unlearned images (folder or CSV): membership inference against "
        "--images as held-out data.", panel="Reports", commands=("eval",)),
    Opt("json_out", ("--json",), bool, False, "Print the report as JSON on stdout (everything else on stderr).",
        panel="Reports", commands=EVERY),
    Opt("quiet", ("--quiet", "-q"), bool, False, "No progress bars or summary.", panel="Reports", commands=ALL),
    Opt("device", ("--device",), str, "auto", "Where to compute.", panel="Advanced", commands=ALL,
        choices=("auto", "cpu", "cuda")),
    Opt("precision", ("--precision",), str, "auto", "Of the attack and the stand-ins (updates are always fp32): "
        "auto = bf16 on CUDA, and on a CPU with native bf16 where a short timing shows it at least 1.25x faster.",
        panel="Advanced", choices=("auto", "fp32", "bf16")),
    Opt("threads", ("--threads",), Optional[int], None, "CPU threads torch computes with.", panel="Advanced",
        commands=ALL, default_help="OMP_NUM_THREADS, else the cores the 1-minute load leaves free"),
    Opt("debug", ("--debug",), bool, False, "Show tracebacks.", panel="Advanced", commands=EVERY),
)


# ``l2ul index`` builds the model as the requests do; its own options follow.
_SHARED_WITH_INDEX = {"arch", "input_size", "mean", "std", "crop_pct", "interpolation", "weights", "model_kwargs",
                      "force", "json_out", "quiet", "device", "threads", "debug"}
INDEX: tuple[Opt, ...] = (
    Opt("out", ("--out",), Path, ..., "Index file to write (safetensors).", commands=("index",), required=True),
    Opt("retain", ("--retain",), Optional[List[Path]], None, "Images the model trained on that you still hold (folder "
        "or CSV, labels not needed; repeatable). Without it: stand-ins from BatchNorm statistics.",
        panel="Retention", commands=("index",)),
    Opt("stand_ins", ("--stand-ins",), Optional[int], None, "Without --retain: how many stand-in images to make.",
        panel="Retention", commands=("index",), default_help=str(INDEX_STAND_INS)),
    Opt("max_images", ("--max-images",), Optional[int], None, "At most this many --retain images (a seeded subset).",
        panel="Retention", commands=("index",)),
    Opt("energy", ("--energy",), float, INDEX_ENERGY, "Share of each layer's input energy whose directions the "
        "index keeps; a request's projection must stay within it.", panel="Retention", commands=("index",)),
    Opt("seed", ("--seed",), int, 0, "Seed of the stand-ins and of the --max-images subset.", panel="Method",
        commands=("index",)),
)
REQUEST = tuple(replace(o, commands=(*o.commands, "index")) if o.name in _SHARED_WITH_INDEX else o
                for o in REQUEST) + INDEX

def _choices(annotation: Any) -> tuple[str, ...] | None:
    return tuple(typing.get_args(annotation)) if typing.get_origin(annotation) is typing.Literal else None


def _config_opts(cls: type, target: str) -> list[Opt]:
    """The options of a config dataclass. Their CLI default is None: the method's preset decides,
    and the help names each method's value (see :func:`_for_goal`)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in cli_fields(cls):
        meta = f.metadata["cli"]
        choices = _choices(hints[f.name])
        kind = str if choices else next((t for t in typing.get_args(hints[f.name]) if t is not type(None)), hints[f.name])
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        out.append(Opt(flag.split("/")[0][2:].replace("-", "_"), (flag,), Optional[kind], None, meta["help"],
                       panel=meta["panel"], target=target, field=f.name, choices=choices))
    return out


CONFIG: tuple[Opt, ...] = (*_config_opts(AttackConfig, "attack"), *_config_opts(UnlearnConfig, "unlearn"))


def for_command(command: str) -> list[Opt]:
    """The options of ``command``, in panel order (declaration order within a panel)."""
    from .config import PANELS

    mine = [o for o in (*REQUEST, *CONFIG) if command in o.commands]
    if command in GOAL_METHODS:
        mine = [_for_goal(o, command) for o in mine]
    return sorted(mine, key=lambda o: PANELS.index(o.panel))


def _for_goal(opt: Opt, goal: str) -> Opt:
    """The method choices of ``goal``, and the loop's defaults as its methods' presets give them."""
    methods = GOAL_METHODS[goal]
    if opt.name == "method":
        paper = [m for m in methods if m not in ("l2ul", *SEPARATE_METHODS)]
        others = [m for m in methods if m in SEPARATE_METHODS]
        return replace(opt, choices=methods, help=f"{', '.join(paper)} (Cha et al.'s)"
                       + (f", {' and '.join(others)} (their papers')" if others else "")
                       + " or l2ul (this tool's: bounded objective, distillation, projected updates).")
    if opt.target in ("attack", "unlearn"):
        cls = AttackConfig if opt.target == "attack" else UnlearnConfig
        meta = next(f.metadata["cli"] for f in cli_fields(cls) if f.name == opt.field)
        return replace(opt, default_help=default_text(opt.field, methods, attack=opt.target == "attack",
                                                      none=meta["default_help"] or "none"))
    return opt


def split(command: str, values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A command's option values as (request, attack overrides, unlearn overrides) by target."""
    parts: dict[str, dict[str, Any]] = {"request": {}, "attack": {}, "unlearn": {}}
    for o in for_command(command):
        if o.name in values:
            parts[o.target][o.field or o.name] = values[o.name]
    return parts["request"], parts["attack"], parts["unlearn"]
