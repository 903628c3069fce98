"""The ``l2ul`` command line: options -> one library call -> rendering. Nothing else.

Errors the user can cause become one ``error:`` line on stderr (mapped in :func:`_run`, the only
place that does so); results go to stdout, progress and logs to stderr.
"""

from __future__ import annotations

import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Callable, List, Optional

import click
import typer
from rich.console import Console
from typer.core import TyperGroup
from typing_extensions import Annotated

from . import __version__
from .config import DEFAULT_METHOD, METHODS, AttackConfig, UnlearnConfig
from .errors import GoalNotMet, L2ULError
from .progress import RichProgress
from .report import render_run, to_json


class _Group(TyperGroup):
    """Click's own usage errors in the house style: one ``error:`` line on stderr, exit 2."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:  # bare `l2ul`: show the help
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            msg = " ".join(exc.format_message().split())
            hint = f" (see '{exc.ctx.command_path} --help')" if isinstance(exc, click.UsageError) and exc.ctx else ""
            typer.echo(f"error: {msg[:1].lower()}{msg[1:]}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_Group,
    name="l2ul",
    help="Make a trained image classifier forget, or relabel, specific images without retraining it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    rich_markup_mode=None,
)


class ForgetMethod(str, Enum):
    neggrad = "neggrad"
    adv = "adv"
    adv_imp = "adv+imp"
    l2ul = "l2ul"


class RelabelMethod(str, Enum):
    correct = "correct"
    adv = "adv"
    adv_imp = "adv+imp"
    l2ul = "l2ul"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class PrecisionChoice(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class BNMode(str, Enum):
    eval = "eval"
    train = "train"


class Objective(str, Enum):
    ce = "ce"
    margin = "margin"


class AdvLoss(str, Enum):
    none = "none"
    ce = "ce"
    kd = "kd"


def _floats(text: Optional[str], what: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got '{text}'", param_hint=what)


def _ints(text: Optional[str], what: str) -> Optional[list[int]]:
    vals = _floats(text, what)
    return None if vals is None else [int(v) for v in vals]


def _load_config(ctx: typer.Context, value: Optional[Path]) -> Optional[Path]:
    """--config: the file's values become the command's defaults, so flags still win."""
    if value is None:
        return value
    from .configfile import options_for, read_config_file

    def keys(command: click.Command) -> dict[str, str]:
        return {k: p.name for p in command.params if isinstance(p, click.Option) and p.name != "config"
                for o in p.opts if o.startswith("--") for k in (o[2:], o[2:].replace("-", "_"))}

    root = ctx.find_root().command
    others = {k for c in getattr(root, "commands", {}).values() if c is not ctx.command for k in keys(c)}
    paths = {p.name for p in ctx.command.params if isinstance(p.type, click.Path)}
    try:
        values = options_for(read_config_file(value), ctx.info_name or "", keys(ctx.command), paths, value, others)
    except L2ULError as exc:
        raise click.ClickException(exc.message) from None
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


def _resolved_options() -> dict[str, Any]:
    """Every option's final value (flag, --config or default), for the report."""
    ctx = click.get_current_context()
    return {k: (v.value if isinstance(v, Enum) else [str(x) for x in v] if isinstance(v, (list, tuple))
                else str(v) if isinstance(v, Path) else v) for k, v in ctx.params.items()}


def _stderr() -> Console:
    return Console(stderr=True)


def _run(fn: Callable[[], Any], debug: bool) -> Any:
    """Run a command body; map known failures to one line and an exit code."""

    def _term(signum, frame):  # SIGTERM behaves like Ctrl-C: unwind, write nothing
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _term)
    try:
        return fn()
    except L2ULError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(exc.exit_code)
    except KeyboardInterrupt:
        if debug:
            raise
        typer.echo("error: interrupted; nothing was written", err=True)
        raise typer.Exit(130)
    except typer.Exit:
        raise
    except Exception as exc:  # a bug: say so in one line, the traceback is behind --debug
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        typer.echo(f"error: internal error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)", err=True)
        raise typer.Exit(1)
    finally:
        signal.signal(signal.SIGTERM, old)


CheckpointArg = Annotated[Path, typer.Argument(help="Checkpoint: .safetensors, .pt/.pth/.bin (weights only), or a timm folder.", show_default=False)]
ArchOpt = Annotated[Optional[str], typer.Option("--arch", help="timm name (resnet18) or torchvision:NAME; read from the checkpoint when it carries one.")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Output checkpoint [default: <input stem>-<command>.safetensors beside the input].")]
ReportOpt = Annotated[Optional[Path], typer.Option("--report", help="Write the JSON report here.")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="Where to compute.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for attack targets, random starts and batch order.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output file (never the input).")]
PartialOpt = Annotated[bool, typer.Option("--allow-partial", help="Write the checkpoint even when the goal is not met.")]
InputSizeOpt = Annotated[Optional[str], typer.Option("--input-size", help="H,W (or C,H,W) the model takes [default: from the checkpoint or model config].")]
MeanOpt = Annotated[Optional[str], typer.Option("--mean", help="Per-channel mean, comma-separated.")]
StdOpt = Annotated[Optional[str], typer.Option("--std", help="Per-channel std, comma-separated.")]
EpsOpt = Annotated[Optional[float], typer.Option("--eps", help="L2 radius of the attack in [0,1] pixel space [default: 1.0 at 28x28x1, scaled with sqrt(image size)].")]
NAdvOpt = Annotated[int, typer.Option("--n-adv", help="Adversarial copies per image.")]
AttackStepsOpt = Annotated[int, typer.Option("--attack-steps", help="PGD iterations.")]
AttackLrOpt = Annotated[float, typer.Option("--attack-step-size", help="PGD step length (L2).")]
PerCopyOpt = Annotated[bool, typer.Option("--per-copy-targets", help="Draw an attack target for every copy (Algorithm 1 draws one per image).")]
LrOpt = Annotated[Optional[float], typer.Option("--lr", help=f"SGD learning rate of the update steps, projected or not [default: {METHODS['l2ul']['projected_lr']:g} for l2ul ({METHODS['l2ul']['lr']:g} when updates are not projected), {UnlearnConfig.lr:g} for the paper's methods].")]
LamOpt = Annotated[Optional[float], typer.Option("--lam", help="λ of the importance penalty [default: 1].")]
MaxStepsOpt = Annotated[Optional[int], typer.Option("--max-steps", help=f"Step cap [default: {METHODS['l2ul']['max_steps']} for l2ul, {UnlearnConfig.max_steps} for the paper's methods].")]
BNOpt = Annotated[Optional[BNMode], typer.Option("--bn", help="BatchNorm during updates: eval (frozen) or train (reference code) [default: eval].")]
ObjectiveOpt = Annotated[Optional[Objective], typer.Option("--objective", help="Override the method's objective: ce (paper) or margin (bounded).")]
MarginOpt = Annotated[Optional[float], typer.Option("--margin", help="Logit margin past its goal to which the bounded objective pushes each image (the run still stops once every image meets its goal) [default: 0 for l2ul]. On the ResNet-18 benchmark 1 took 18-28 % fewer update steps for 16 images at 0.2-0.6 points more test accuracy lost, but at 64 images saved little and lost 1-1.3 points, and at 4 saved a second or two.")]
AdvLossOpt = Annotated[Optional[AdvLoss], typer.Option("--adv-loss", help="Override the adversarial term: none, ce (paper) or kd (distil the original model).")]
AdvWeightOpt = Annotated[Optional[float], typer.Option("--adv-weight", help="Weight of the adversarial term against the objective on the forget images [default for l2ul: 10 up to 16 images, then 0.8 per image, at most 100; 1 (the paper's) for its methods].")]
ShiftOpt = Annotated[Optional[int], typer.Option("--shift-copies", help="Copies of each image shifted by 1-2 pixels (at 28x28; scaled with the image side) on which every update keeps the original model's outputs (with --adv-loss kd), so the change stays on the image instead of moving its class [default: 8 for l2ul, 0 for the paper's methods].")]
MixOpt = Annotated[Optional[int], typer.Option("--mix-copies", help="Blends of each image with another image of the same class on which every update keeps the original model's outputs (with --adv-loss kd), so the class keeps its place where several of its images move [default: 8 for l2ul, 0 for the paper's methods].")]
RequestOpt = Annotated[Optional[str], typer.Option("--request-id", help="Id recorded in the checkpoint's ledger [default: random].")]
KeepOpt = Annotated[Optional[List[Path]], typer.Option("--keep", help="Images of earlier requests (folder or CSV) that must stay forgotten/relabelled; repeatable.")]
OriginalOpt = Annotated[Optional[Path], typer.Option("--original", help="The checkpoint before the first request of a stream (with --keep): each request distils towards it and anchors the importance penalty at it, so requests do not add up each other's drift.")]
RetainOpt = Annotated[Optional[List[Path]], typer.Option("--retain", help="Other images of the same domain (folder or CSV, labels not needed): updates are kept orthogonal to what the model's layers see on them, which keeps far more accuracy elsewhere; repeatable.")]
SyntheticOpt = Annotated[Optional[int], typer.Option("--synthetic-retain", help="Without --retain: this many stand-in images made from the model's BatchNorm statistics play their part; 0: no projection [default for l2ul: 8 per forget image, at least 256 and at most 512; 0 for the paper's methods].")]
RetainEnergyOpt = Annotated[Optional[float], typer.Option("--retain-energy", help=f"Share of the --retain images' input energy per layer that updates must not touch [default: {UnlearnConfig.retain_energy}].")]
PrecisionOpt = Annotated[PrecisionChoice, typer.Option("--precision", help="Of the attack and the stand-ins (updates are always fp32): auto = bf16 on CUDA; on a CPU with native bf16 (AVX-512 BF16, AMX) bf16 where a short timing of the model shows it at least 1.25x faster (ResNet-18: 1.6x; depthwise nets such as lcnet_050 are slower in bf16), else fp32.")]
RecordPathsOpt = Annotated[bool, typer.Option("--record-paths", help="Record image paths in the checkpoint's ledger (by default only their SHA-256).")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", callback=_load_config, is_eager=True, help="TOML (or YAML) file of option = value (keys as the long options; [forget]/[relabel]/[eval] tables); flags win.")]
MarkdownOpt = Annotated[Optional[Path], typer.Option("--markdown", help="Also write a Markdown report here (figures as PNG files beside it with the plots extra).")]
HtmlOpt = Annotated[Optional[Path], typer.Option("--html", help="Also write an HTML report here (figures as PNG files beside it with the plots extra).")]
EvalOpt = Annotated[Optional[Path], typer.Option("--eval", help="Labelled held-out images to evaluate before and after (accuracy in the report).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout (everything else on stderr).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summary.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]


def _request(goal: str, params: dict[str, Any]) -> None:
    """forget and relabel: the command's parameters (flag, --config or default, as typer converted
    them) go to one library call; the two commands differ only in their options."""
    from .paths import documents_writes
    from .workflow import run_request

    p = {k: (v.value if isinstance(v, Enum) else v) for k, v in params.items()}
    checkpoint, markdown, html, quiet = p["checkpoint"], p["markdown"], p["html"], p["quiet"]
    err = _stderr()
    progress = RichProgress(err, enabled=not quiet)
    options = _resolved_options()

    def body():
        try:
            return run_request(
                goal, checkpoint, images=p.get("images"), manifest=p["manifest"], arch=p["arch"], out=p["out"],
                report_path=p["report"], method=p["method"], device=p["device"], seed=p["seed"], force=p["force"],
                allow_partial=p["allow_partial"], input_size=_ints(p["input_size"], "--input-size"),
                mean=_floats(p["mean"], "--mean"), std=_floats(p["std"], "--std"),
                attack_overrides={"n_adv": p["n_adv"], "eps": p["eps"], "steps": p["attack_steps"],
                                  "step_size": p["attack_step_size"], "per_copy_targets": p["per_copy_targets"]},
                unlearn_overrides={k: p[k] for k in ("lr", "lam", "max_steps", "bn", "objective", "margin", "adv_loss",
                                                      "retain_energy", "synthetic_retain", "shift_copies",
                                                      "mix_copies", "adv_weight")},
                request_id=p["request_id"], eval_images=p["eval_images"], keep=p["keep"] or (), retain=p["retain"] or (),
                original=p["original"],
                record_paths=p["record_paths"], precision=p["precision"], progress=progress, options=options,
                extra_reads={"--config": [p["config"]]}, extra_writes=documents_writes(markdown, html),
            )
        except GoalNotMet as exc:
            if exc.report is not None:
                _documents(exc.report, markdown, html)
            _show(exc.report, p["json_out"], quiet)
            raise
        finally:
            progress.close()

    def body_docs():
        _check_documents(checkpoint, markdown, html)
        r = body()
        _documents(r, markdown, html)
        return r

    _show(_run(body_docs, p["debug"]), p["json_out"], quiet)


def _check_documents(checkpoint: Path, markdown: Optional[Path], html: Optional[Path]) -> None:
    """Refuse unwritable report paths before the work, not after it."""
    from .workflow import check_output

    for path, what in ((markdown, "Markdown report"), (html, "HTML report")):
        if path is not None:
            check_output(path, checkpoint, True, what)


def _documents(report: dict, markdown: Optional[Path], html: Optional[Path]) -> None:
    from .document import write_document

    if markdown is not None:
        write_document(markdown, report, "markdown")
    if html is not None:
        write_document(html, report, "html")


def _show(report: Optional[dict], json_out: bool, quiet: bool) -> None:
    if report is None:
        return
    if json_out:
        typer.echo(to_json(report))
    if not quiet:
        render_run(report, _stderr() if json_out else Console())


_A = AttackConfig()


@app.command()
def forget(
    checkpoint: CheckpointArg,
    images: Annotated[Optional[Path], typer.Option("--images", help="Folder of images to forget: class sub-folders, or flat (labels = current predictions).")] = None,
    manifest: Annotated[Optional[Path], typer.Option("--manifest", help="CSV with columns path[,label] instead of --images.")] = None,
    arch: ArchOpt = None,
    out: OutOpt = None,
    report: ReportOpt = None,
    method: Annotated[ForgetMethod, typer.Option("--method", help="neggrad, adv, adv+imp (paper) or l2ul (bounded + distillation).")] = ForgetMethod(DEFAULT_METHOD),
    device: DeviceOpt = Device.auto,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    allow_partial: PartialOpt = False,
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    eps: EpsOpt = _A.eps,
    n_adv: NAdvOpt = _A.n_adv,
    attack_steps: AttackStepsOpt = _A.steps,
    attack_step_size: AttackLrOpt = _A.step_size,
    per_copy_targets: PerCopyOpt = False,
    lr: LrOpt = None,
    lam: LamOpt = None,
    max_steps: MaxStepsOpt = None,
    bn: BNOpt = None,
    objective: ObjectiveOpt = None,
    margin: MarginOpt = None,
    adv_loss: AdvLossOpt = None,
    adv_weight: AdvWeightOpt = None,
    shift_copies: ShiftOpt = None,
    mix_copies: MixOpt = None,
    request_id: RequestOpt = None,
    keep: KeepOpt = None,
    original: OriginalOpt = None,
    retain: RetainOpt = None,
    synthetic_retain: SyntheticOpt = None,
    retain_energy: RetainEnergyOpt = None,
    record_paths: RecordPathsOpt = False,
    precision: PrecisionOpt = PrecisionChoice.auto,
    eval_images: EvalOpt = None,
    config: ConfigOpt = None,
    markdown: MarkdownOpt = None,
    html: HtmlOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Make the model misclassify every given image; write a new checkpoint and a report."""
    _request("forget", locals())


@app.command()
def relabel(
    checkpoint: CheckpointArg,
    manifest: Annotated[Path, typer.Option("--manifest", help="CSV with columns path,new_label[,label].")],
    arch: ArchOpt = None,
    out: OutOpt = None,
    report: ReportOpt = None,
    method: Annotated[RelabelMethod, typer.Option("--method", help="correct, adv, adv+imp (paper) or l2ul (bounded + distillation).")] = RelabelMethod(DEFAULT_METHOD),
    device: DeviceOpt = Device.auto,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    allow_partial: PartialOpt = False,
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    eps: EpsOpt = _A.eps,
    n_adv: NAdvOpt = _A.n_adv,
    attack_steps: AttackStepsOpt = _A.steps,
    attack_step_size: AttackLrOpt = _A.step_size,
    per_copy_targets: PerCopyOpt = False,
    lr: LrOpt = None,
    lam: LamOpt = None,
    max_steps: MaxStepsOpt = None,
    bn: BNOpt = None,
    objective: ObjectiveOpt = None,
    margin: MarginOpt = None,
    adv_loss: AdvLossOpt = None,
    adv_weight: AdvWeightOpt = None,
    shift_copies: ShiftOpt = None,
    mix_copies: MixOpt = None,
    request_id: RequestOpt = None,
    keep: KeepOpt = None,
    original: OriginalOpt = None,
    retain: RetainOpt = None,
    synthetic_retain: SyntheticOpt = None,
    retain_energy: RetainEnergyOpt = None,
    record_paths: RecordPathsOpt = False,
    precision: PrecisionOpt = PrecisionChoice.auto,
    eval_images: EvalOpt = None,
    config: ConfigOpt = None,
    markdown: MarkdownOpt = None,
    html: HtmlOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Make the model predict each listed image's new label; write a new checkpoint and a report."""
    _request("relabel", locals())


@app.command("eval")
def eval_(
    checkpoint: CheckpointArg,
    images: Annotated[Optional[Path], typer.Option("--images", help="Labelled images: class sub-folders.")] = None,
    manifest: Annotated[Optional[Path], typer.Option("--manifest", help="CSV with columns path,label instead of --images.")] = None,
    arch: ArchOpt = None,
    report: ReportOpt = None,
    compare: Annotated[Optional[Path], typer.Option("--compare", help="A second checkpoint to run on the same images.")] = None,
    forget_set: Annotated[Optional[Path], typer.Option("--forget", help="Unlearned images (folder or CSV): membership inference against --images as held-out data.")] = None,
    config: ConfigOpt = None,
    markdown: MarkdownOpt = None,
    html: HtmlOpt = None,
    device: DeviceOpt = Device.auto,
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Accuracy, top-5, per-class accuracy and confusion of a checkpoint on labelled images."""
    from .paths import documents_writes
    from .report import render_eval, write_json
    from .workflow import evaluate_checkpoint

    options = _resolved_options()

    def body():
        _check_documents(checkpoint, markdown, html)
        r = evaluate_checkpoint(checkpoint, images=images, manifest=manifest, arch=arch, device=device.value,
                                compare=compare, forget_set=forget_set, input_size=_ints(input_size, "--input-size"),
                                mean=_floats(mean, "--mean"), std=_floats(std, "--std"), extra_reads={"--config": [config]},
                                extra_writes={"--report": report, **documents_writes(markdown, html)})
        r["options"] = options
        if report is not None:
            write_json(report, r)
        _documents(r, markdown, html)
        return r

    r = _run(body, debug)
    if json_out:
        typer.echo(to_json(r))
    if not quiet:
        render_eval(r, _stderr() if json_out else Console())


@app.command()
def history(
    checkpoint: CheckpointArg,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """The ledger of requests applied to a checkpoint written by l2ul."""
    from .checkpoint import read_checkpoint
    from .ledger import continuity
    from .report import render_history

    def body():
        raw = read_checkpoint(checkpoint)
        ledger = raw.meta.get("ledger") if isinstance(raw.meta.get("ledger"), list) else []
        return {"checkpoint": str(checkpoint), "sha256": raw.sha256, "ledger": ledger,
                "warning": continuity(ledger, raw.state_dict)}

    r = _run(body, debug)
    if json_out:
        typer.echo(to_json(r))
    else:
        render_history(r, Console())


@app.command()
def info(
    checkpoint: CheckpointArg,
    arch: ArchOpt = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Architecture, classes, preprocessing, parameter count and ledger summary of a checkpoint."""
    from .models import load_model
    from .report import render_info

    def body():
        m = load_model(checkpoint, arch)
        return {"checkpoint": str(checkpoint), "sha256": m.source.sha256, "arch": m.arch,
                "num_classes": m.num_classes, "in_chans": m.in_chans, "class_names": m.class_names,
                "preprocessing": m.preprocessing.to_dict(), "weights": {"used": m.weights_used, "reason": m.weights_reason},
                "parameters": sum(p.numel() for p in m.net.parameters()),
                "requests": len(m.ledger)}

    r = _run(body, debug)
    if json_out:
        typer.echo(to_json(r))
    else:
        render_info(r, Console())


def _version(value: bool) -> None:
    if value:
        typer.echo(f"l2ul {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = None,
) -> None:
    """l2ul: instance-wise unlearning for trained image classifiers (Cha et al., AAAI 2024)."""
