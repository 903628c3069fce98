"""The ``l2ul`` command line: options -> one library call -> rendering. Nothing else.

Options come from :mod:`.options` (declared once there and on the config dataclasses); the
commands are built from them, so ``forget`` and ``relabel`` cannot drift apart. Errors the user
can cause become one ``error:`` line on stderr (mapped in :func:`_run`, the only place that does
so); results go to stdout, progress and logs to stderr.
"""

from __future__ import annotations

import inspect
import json
import re
import shlex
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import click
import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup
from typing_extensions import Annotated

from . import __version__
from .config import PANELS
from .errors import L2ULError, RunFailed, UsageError
from .threads import choose_threads
from .options import Opt, for_command, split
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

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # The words as typed, before click consumes them: the report's "command_line".
        ctx.meta["l2ul.command_line"] = f"{ctx.info_name or 'l2ul'} {shlex.join(args)}"
        return super().parse_args(ctx, args)


class _Panels(TyperCommand):
    """Plain-text help with the options grouped in the panels of :data:`.config.PANELS`."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        groups: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                panel = "Arguments" if param.param_type_name == "argument" else getattr(param, "rich_help_panel", None)
                groups.setdefault(panel or "Other options", []).append(record)
        for panel in ("Arguments", *PANELS, "Other options"):
            if panel in groups:
                with formatter.section(panel):
                    formatter.write_dl(groups[panel])


app = typer.Typer(
    cls=_Group,
    name="l2ul",
    help="Make a trained image classifier forget, or relabel, specific images without retraining it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _floats(text: Optional[str], what: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(v) for v in re.split(r"[,\s]+", text.strip()) if v]  # 3,224,224 or timm's 3 224 224
    except ValueError:
        raise typer.BadParameter(f"expected numbers separated by commas or spaces, got '{text}'", param_hint=what)


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


def _annotation(o: Opt) -> Any:
    """The typer annotation of an option."""
    helptext = o.help + (f" [default: {o.default_help}]" if o.default_help else "")
    extra: dict[str, Any] = {"callback": _load_config, "is_eager": True} if o.name == "config" else {}
    if o.choices:
        extra["click_type"] = click.Choice(o.choices)
    show = o.default_help is None and o.default is not None and o.type is not bool
    return Annotated[o.type, typer.Option(*o.flags, help=helptext, rich_help_panel=o.panel, show_default=show, **extra)]


CHECKPOINT = inspect.Parameter(
    "checkpoint", inspect.Parameter.POSITIONAL_OR_KEYWORD,
    annotation=Annotated[Path, typer.Argument(help="Checkpoint: .safetensors, .pt/.pth/.bin (weights only), or a timm "
                                              "folder.", show_default=False)])


def _command(name: str, body: Callable[..., None], help: str, epilog: str) -> None:
    """Register ``body`` as ``name`` with the options of :func:`.options.for_command`."""
    params = [CHECKPOINT] + [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, annotation=_annotation(o),
                                               default=inspect.Parameter.empty if o.required else o.default)
                             for o in for_command(name)]

    def command(**values: Any) -> None:
        body(**values)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = help
    app.command(name, cls=_Panels, epilog=epilog)(command)


def _resolved_options() -> dict[str, Any]:
    """Every option's final value (flag, --config or default), for the report."""
    ctx = click.get_current_context()
    return {k: [str(x) for x in v] if isinstance(v, (list, tuple)) else str(v) if isinstance(v, Path) else v
            for k, v in ctx.params.items()}


def _command_line() -> Optional[str]:
    """The command line as it was called (recorded by :meth:`_Group.parse_args`)."""
    return click.get_current_context().meta.get("l2ul.command_line")


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


def _model_inputs(p: dict[str, Any]) -> dict[str, Any]:
    """The options that say how to build the model and read its images, parsed."""
    return {"arch": p["arch"], "input_size": _ints(p["input_size"], "--input-size"),
            "mean": _floats(p["mean"], "--mean"), "std": _floats(p["std"], "--std"),
            "crop_pct": p["crop_pct"], "interpolation": p["interpolation"],
            "weights": p["weights"], "model_kwargs": _model_kwargs(p["model_kwargs"]),
            "threads": choose_threads(p["threads"])}


def _model_kwargs(text: Optional[str]) -> Optional[dict[str, Any]]:
    """--model-kwargs: a JSON object, or timm's train.py style ``key=value`` pairs (comma- or
    space-separated; values read as Python literals, else kept as strings)."""
    import ast

    if text is None:
        return None
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--model-kwargs: not JSON ({exc.msg} at character {exc.pos})") from None
        return value
    out: dict[str, Any] = {}
    for pair in text.replace(",", " ").split():
        key, sep, raw = pair.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--model-kwargs: '{pair}' is not key=value (e.g. img_size=32,patch_size=4, or a JSON object)")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def _paths_of(p: dict[str, Any], *writes: str) -> dict[str, Any]:
    """The command's other reads and writes, by option, that no output may replace."""
    from .paths import documents_writes

    return {"extra_reads": {"--config": [p["config"]]},
            "extra_writes": {**{f"--{w}": p[w] for w in writes}, **documents_writes(p["markdown"], p["html"])}}


def _request(goal: str, **p: Any) -> None:
    """forget and relabel: the options (flag, --config or default, as typer converted them) go to
    one library call; the two commands differ only in their options."""
    from .workflow import run_request

    request, attack, unlearn = split(goal, p)
    err = _stderr()
    progress = RichProgress(err, enabled=not p["quiet"])
    options, command_line = _resolved_options(), _command_line()
    skip = {"checkpoint", "markdown", "html", "json_out", "quiet", "debug", "config", "report", "eval_images",
            "keep", "retain", "arch", "input_size", "mean", "std", "weights", "model_kwargs", "threads",
            "crop_pct", "interpolation"}

    def body():
        _check_documents(p["checkpoint"], p["markdown"], p["html"])
        try:
            r = run_request(
                goal, p["checkpoint"], **{k: v for k, v in request.items() if k not in skip}, **_model_inputs(p),
                report_path=p["report"], eval_images=p["eval_images"], keep=p["keep"] or (), retain=p["retain"] or (),
                attack_overrides=attack, unlearn_overrides=unlearn, progress=progress, options=options,
                command_line=command_line, **_paths_of(p))
        except RunFailed as exc:
            if exc.report is not None:
                _finish(exc.report, p)
            raise
        finally:
            progress.close()
        _finish(r, p)

    _run(body, p["debug"])


def _check_documents(checkpoint: Path, markdown: Optional[Path], html: Optional[Path]) -> None:
    """Refuse unwritable report paths before the work, not after it."""
    from .workflow import check_output

    for path, what in ((markdown, "Markdown report"), (html, "HTML report")):
        if path is not None:
            check_output(path, checkpoint, True, what)


def _finish(report: dict, p: dict[str, Any]) -> None:
    """After a run: the documents, then the JSON (--json) and the summary, which names every file
    written (the checkpoint and --report were written by the run already)."""
    from .document import write_document
    from .report import render_eval

    wrote = [report["output"]] if report.get("output") else []
    wrote += [str(p["report"])] if p["report"] is not None else []
    for path, fmt in ((p["markdown"], "markdown"), (p["html"], "html")):
        if path is not None:
            wrote += write_document(path, report, fmt)
    if p["json_out"]:
        typer.echo(to_json(report))
    if not p["quiet"]:
        render = render_eval if report["command"] == "eval" else render_run
        render(report, _stderr() if p["json_out"] else Console(), wrote)


def _eval(**p: Any) -> None:
    """eval: one library call, then the JSON report, the documents and the summary."""
    from .report import write_json
    from .workflow import evaluate_checkpoint

    options, command_line = _resolved_options(), _command_line()

    def body():
        _check_documents(p["checkpoint"], p["markdown"], p["html"])
        r = evaluate_checkpoint(p["checkpoint"], images=p["images"], manifest=p["manifest"], device=p["device"],
                                compare=p["compare"], forget_set=p["forget_set"], holdout=p["holdout"],
                                **_model_inputs(p), **_paths_of(p, "report"))
        r["options"] = options
        if command_line is not None:
            r["command_line"] = command_line
        if p["report"] is not None:
            write_json(p["report"], r)
        _finish(r, p)

    _run(body, p["debug"])


_EXAMPLE = "examples/fashion-mnist-lcnet_050.safetensors"
_command("forget", lambda **p: _request("forget", **p),
         "Make the model misclassify every given image; write a new checkpoint and a report.",
         f"\b\nExamples:\n  l2ul forget {_EXAMPLE} --images examples/images/forget/ --out forgot.safetensors\n"
         f"  l2ul forget model.pth --arch resnet18 --images forget/ --retain train-subset/ --eval test/ --html r.html")
_command("relabel", lambda **p: _request("relabel", **p),
         "Make the model predict each listed image's new label; write a new checkpoint and a report.",
         f"\b\nExamples:\n  l2ul relabel {_EXAMPLE} --manifest examples/images/fixes.csv --out fixed.safetensors\n"
         f"  l2ul relabel model.safetensors --manifest fixes.csv --eval test/ --report r.json")
_command("eval", _eval, "Accuracy, top-5, per-class accuracy and confusion of a checkpoint on labelled images.",
         f"\b\nExamples:\n  l2ul eval forgot.safetensors --images examples/images/test/ --compare {_EXAMPLE}\n"
         "  l2ul eval forgot.safetensors --images examples/images/test/ --forget examples/images/forget/")
def _index(**p: Any) -> None:
    """index: one library call, then the JSON (--json) and the summary."""
    from .make_index import make_index
    from .report import render_index

    progress = RichProgress(_stderr(), enabled=not p["quiet"])

    def body():
        try:
            return make_index(p["checkpoint"], p["out"], retain=p["retain"] or (), stand_ins=p["stand_ins"],
                              max_images=p["max_images"], energy=p["energy"], device=p["device"], seed=p["seed"],
                              force=p["force"], progress=progress, **_model_inputs(p))
        finally:
            progress.close()

    r = _run(body, p["debug"])
    if p["json_out"]:
        typer.echo(to_json(r))
    if not p["quiet"]:
        render_index(r, _stderr() if p["json_out"] else Console(), [r["output"]])


def _info(**p: Any) -> None:
    from .info import checkpoint_info
    from .report import render_index, render_info

    r = _run(lambda: checkpoint_info(p["checkpoint"], p["arch"], weights=p["weights"],
                                     model_kwargs=_model_kwargs(p["model_kwargs"])), p["debug"])
    if p["json_out"]:
        typer.echo(to_json(r))
    else:
        (render_index if r.get("kind") == "index" else render_info)(r, Console())


def _history(**p: Any) -> None:
    from .info import checkpoint_history
    from .report import render_history

    r = _run(lambda: checkpoint_history(p["checkpoint"]), p["debug"])
    typer.echo(to_json(r)) if p["json_out"] else render_history(r, Console())


_command("index", _index, "The retained space of a checkpoint, built once, for the --index of later requests "
         "(and --method pgu).",
         f"\b\nExamples:\n  l2ul index {_EXAMPLE} --out example.index.safetensors\n"
         "  l2ul index model.safetensors --retain train-subset/ --max-images 5000 --out model.index.safetensors")
_command("history", _history, "The ledger of requests applied to a checkpoint written by l2ul.",
         "\b\nExample:\n  l2ul history forgot.safetensors --json")
_command("info", _info, "Architecture, classes, preprocessing, parameter count and ledger summary of a checkpoint.",
         f"\b\nExample:\n  l2ul info {_EXAMPLE}")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"l2ul {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = None,
) -> None:
    """l2ul: instance-wise unlearning for trained image classifiers (Cha et al., AAAI 2024)."""
