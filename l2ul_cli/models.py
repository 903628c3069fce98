"""Building a network from a timm or torchvision name, and wrapping it so that everything
else in l2ul works in [0, 1] pixel space.

The wrapper (:class:`PixelClassifier`) applies the mean/std normalisation inside ``forward``:
attacks, importance and evaluation then never need to know the model's preprocessing, and the
state dict written back out is the plain network's, loadable by timm or torchvision directly.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import INTERPOLATIONS
from .checkpoint import FORBIDDEN_MODEL_ARGS, RawCheckpoint, read_checkpoint
from .pickled import Weights
from .errors import CheckpointError, UsageError

TORCHVISION_PREFIX = "torchvision:"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Limits on preprocessing, from metadata or options: a side of more than MAX_SIDE pixels, or a
# crop_pct below MIN_CROP_PCT (the image is first resized to side / crop_pct), would let a
# crafted checkpoint plan images of gigabytes each.
MAX_SIDE = 4096
MIN_CROP_PCT, MAX_CROP_PCT = 0.25, 2.0
# The crop modes of timm's transforms_imagenet_eval (INTERPOLATIONS, its interpolations: config.py).
CROP_MODES = ("center", "squash", "border")
MAX_STATS = 16  # values of mean/std (channels)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer()


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _shown(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:60] + "…"


@dataclass(frozen=True)
class Preprocessing:
    """How an image file becomes the network's input; stored in every checkpoint l2ul writes."""

    input_size: tuple[int, int, int]  # channels, height, width
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    crop_mode: str = "center"  # timm's: center, squash or border

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["crop_mode"] == "center":  # the default, as checkpoints written before it was a key
            del d["crop_mode"]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def problem(self) -> str | None:
        """What is out of range, as ``key: reason``; None when every value can be used."""
        c, h, w = self.input_size
        if not (1 <= c <= MAX_STATS and 1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
            return f"input_size: each side must be 1 to {MAX_SIDE} pixels (got {c}x{h}x{w})"
        for key, values in (("mean", self.mean), ("std", self.std)):
            if not (1 <= len(values) <= MAX_STATS and all(_is_number(v) for v in values)):
                return f"{key}: must be 1 to {MAX_STATS} finite numbers (got {_shown(values)})"
        if not all(v > 0 for v in self.std):
            return f"std: must be positive (got {_shown(self.std)})"
        if not (_is_number(self.crop_pct) and MIN_CROP_PCT <= self.crop_pct <= MAX_CROP_PCT):
            return f"crop_pct: must be {MIN_CROP_PCT} to {MAX_CROP_PCT} (got {_shown(self.crop_pct)})"
        if self.interpolation not in INTERPOLATIONS:
            return f"interpolation: must be one of {', '.join(INTERPOLATIONS)} (got {_shown(self.interpolation)})"
        if self.crop_mode not in CROP_MODES:
            return f"crop_mode: must be one of {', '.join(CROP_MODES)} (got {_shown(self.crop_mode)})"
        return None

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "preprocessing") -> "Preprocessing":
        """From stored (untrusted) values; :class:`CheckpointError` ``"<where>.<key> …"``."""
        def bad(key: str, what: str) -> CheckpointError:
            return CheckpointError(f"{where}.{key} {what}")

        size = d.get("input_size")
        if not (isinstance(size, (list, tuple)) and len(size) == 3 and all(_is_int(v) for v in size)):
            raise bad("input_size", f"must be 3 integers [channels, height, width] (got {_shown(size)})")
        stats = {}
        for key in ("mean", "std"):
            v = d.get(key)
            if not (isinstance(v, (list, tuple)) and all(_is_number(x) for x in v)):
                raise bad(key, f"must be a list of finite numbers (got {_shown(v)})")
            stats[key] = tuple(float(x) for x in v)
        crop, interp, mode = d.get("crop_pct", 1.0), d.get("interpolation", "bilinear"), d.get("crop_mode", "center")
        if not _is_number(crop):
            raise bad("crop_pct", f"must be a number (got {_shown(crop)})")
        for key, value in (("interpolation", interp), ("crop_mode", mode)):
            if not (isinstance(value, str) and len(value) <= 32):
                raise bad(key, f"must be a name such as {'bilinear' if key == 'interpolation' else 'center'} (got {_shown(value)})")
        pre = cls(input_size=tuple(int(v) for v in size), mean=stats["mean"], std=stats["std"],  # type: ignore[arg-type]
                  crop_pct=float(crop), interpolation=interp, crop_mode=mode)
        if problem := pre.problem():
            raise CheckpointError(f"{where}.{problem}")
        return pre


class CentreTapConv2d(nn.Conv2d):
    """A k x k convolution with "same" zero padding that, on a 1x1 feature map, runs as the 1x1
    convolution of its centre tap: every other tap reads padding there, so the output is the same
    and its weights' gradient is zero either way. Small images reach 1x1 maps early (ResNet-18's
    last stage at 28x28 and at CIFAR's 32x32): there a fifth of the network's multiply-adds were
    products with padding (66 → 53 MFLOP per 28x28 image, torch.utils.flop_counter). Any other
    input runs the full convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] == 1 and x.shape[-1] == 1:
            kh, kw = self.kernel_size
            centre = self.weight[:, :, kh // 2:kh // 2 + 1, kw // 2:kw // 2 + 1]
            return F.conv2d(x, centre, self.bias, self.stride, 0, 1, self.groups)
        return super().forward(x)


def use_centre_taps(net: nn.Module) -> int:
    """Make every plain ``nn.Conv2d`` whose padding is "same" for its odd kernel (dilation 1, zero
    padding) a :class:`CentreTapConv2d`, in place (weights and state dict unchanged); returns how
    many. Subclasses (e.g. timm's dynamically padded ones) are left as they are."""
    n = 0
    for m in net.modules():
        k = m.kernel_size if type(m) is nn.Conv2d else None
        if k and k != (1, 1) and k[0] % 2 and k[1] % 2 and m.padding == (k[0] // 2, k[1] // 2) \
                and m.dilation == (1, 1) and m.padding_mode == "zeros":
            m.__class__ = CentreTapConv2d
            n += 1
    return n


class PixelClassifier(nn.Module):
    """``net`` behind a fixed normalisation: takes images in [0, 1], returns logits.

    Convolutional nets run in channels_last memory format (weights and inputs): forward+backward
    of 160 images at 28x28 on one CPU core measured 1.7x faster for resnet18 and 1.4x for
    lcnet_050, and it is the layout cuDNN's tensor-core kernels want on CUDA. Results are the
    same up to float rounding. Convolutions on 1x1 maps skip their padding (:class:`CentreTapConv2d`)."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], channels_last: bool | None = None):
        super().__init__()
        if channels_last is None:  # lazy (uninitialised) parameters cannot change layout yet
            channels_last = any(isinstance(m, nn.Conv2d) for m in net.modules()) and not any(
                isinstance(p, nn.parameter.UninitializedParameter) for p in net.parameters())
        self.channels_last = channels_last
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        use_centre_taps(net)
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)


@dataclass
class LoadedModel:
    """A ready-to-use classifier and everything needed to write it back with its settings."""

    model: PixelClassifier
    arch: str
    num_classes: int
    in_chans: int
    class_names: list[str] | None
    preprocessing: Preprocessing
    source: RawCheckpoint
    ledger: list[dict[str, Any]] = field(default_factory=list)
    model_args: dict[str, Any] = field(default_factory=dict)  # given to the constructor (timm's model_args)

    @property
    def weights_used(self) -> str:
        """Which weights of the file: "state_dict" (its only ones), "model" or "ema"."""
        return self.source.weights_used

    @property
    def weights_reason(self) -> str:
        return self.source.weights_reason

    @property
    def net(self) -> nn.Module:
        return self.model.net

    def class_name(self, index: int) -> str:
        if self.class_names and 0 <= index < len(self.class_names):
            return self.class_names[index]
        return str(index)

    def metadata(self) -> dict[str, Any]:
        """The l2ul metadata block for a checkpoint written from this model."""
        return {
            "arch": self.arch,
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "class_names": self.class_names,
            "preprocessing": self.preprocessing.to_dict(),
            "ledger": self.ledger,
            **({"model_args": self.model_args} if self.model_args else {}),
            **({"weights": self.lineage_weights} if self.lineage_weights else {}),
        }

    @property
    def lineage_weights(self) -> str | None:
        """"model" or "ema": which weights of the training checkpoint this stream began from."""
        if self.source.weights_used in ("model", "ema"):
            return self.source.weights_used
        return self.source.meta.get("weights")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.net.state_dict()


def _quiet():
    """timm and torchvision sometimes print warnings when building; keep stdout clean."""
    return contextlib.redirect_stdout(io.StringIO())


def build_network(arch: str, num_classes: int | None = None, in_chans: int | None = None, *, meta: bool = False,
                  model_args: dict[str, Any] | None = None) -> nn.Module:
    """Create an untrained network by name: ``resnet18`` (timm) or ``torchvision:resnet18``;
    ``model_args`` go to its constructor (``img_size=32, patch_size=4`` of a timm ViT)."""
    kwargs: dict[str, Any] = dict(model_args or {})
    ctx = torch.device("meta") if meta else contextlib.nullcontext()
    try:
        with ctx, _quiet():
            if arch.startswith(TORCHVISION_PREFIX):
                import torchvision

                name = arch[len(TORCHVISION_PREFIX):]
                if num_classes is not None:
                    kwargs["num_classes"] = num_classes
                net = torchvision.models.get_model(name, weights=None, **kwargs)
                if in_chans is not None and in_chans != 3:
                    _set_first_conv_channels(net, in_chans)
            else:
                import timm

                if num_classes is not None:
                    kwargs["num_classes"] = num_classes
                if in_chans is not None:
                    kwargs["in_chans"] = in_chans
                net = timm.create_model(arch, pretrained=False, **kwargs)
    except (RuntimeError, ValueError, KeyError, TypeError, AssertionError) as exc:  # timm asserts on bad arguments
        raise UsageError(f"unknown or unbuildable architecture '{arch}' ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc
    return net


def _set_first_conv_channels(net: nn.Module, in_chans: int) -> None:
    """torchvision models have no ``in_chans``: replace the first convolution."""
    for parent in net.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                new = nn.Conv2d(
                    in_chans, child.out_channels, child.kernel_size, child.stride, child.padding,
                    child.dilation, child.groups, child.bias is not None, child.padding_mode,
                    device=child.weight.device,
                )
                setattr(parent, name, new)
                return


def _head_and_stem(net: nn.Module) -> tuple[str, str]:
    """Names of the classifier weight (out = classes) and first conv weight (in = channels)."""
    cfg = getattr(net, "pretrained_cfg", None) or {}
    params = dict(net.named_parameters())
    head = f"{cfg['classifier']}.weight" if isinstance(cfg.get("classifier"), str) else None
    stem = f"{cfg['first_conv']}.weight" if isinstance(cfg.get("first_conv"), str) else None
    if head not in params:
        head = [n for n, p in params.items() if p.ndim == 2 and n.endswith("weight")][-1:]
        head = head[0] if head else ""
    if stem not in params:
        stem = next((n for n, p in params.items() if p.ndim == 4), "")
    return head, stem


def infer_shapes(arch: str, state_dict: dict[str, torch.Tensor], model_args: dict[str, Any] | None = None) -> tuple[int, int]:
    """Number of classes and input channels, read from the checkpoint's own tensors."""
    args = {k: v for k, v in (model_args or {}).items() if k not in ("num_classes", "in_chans")}
    probe = build_network(arch, meta=True, model_args=args)
    # Built on the meta device, so arguments asking for a giant network cost nothing yet.
    have, need = sum(t.numel() for t in state_dict.values()), sum(p.numel() for p in probe.parameters())
    if need > 2 * have + (64 << 20):
        raise CheckpointError(f"checkpoint does not fit '{arch}'{' with ' + str(args) if args else ''}: the network "
                              f"would have {need:,} parameters, the checkpoint holds {have:,} values")
    head, stem = _head_and_stem(probe)
    if head not in state_dict:
        raise CheckpointError(f"checkpoint does not fit '{arch}': missing classifier weight '{head}'")
    num_classes = int(state_dict[head].shape[0])
    in_chans = int(state_dict[stem].shape[1]) if stem in state_dict and state_dict[stem].ndim == 4 else 3
    return num_classes, in_chans


def resolve_preprocessing(
    net: nn.Module,
    in_chans: int,
    stored: dict[str, Any] | None = None,
    *,
    input_size: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    source: str = "metadata",
) -> Preprocessing:
    """One place that decides preprocessing: user overrides > checkpoint metadata > model config.

    Stored values are checked as untrusted (:class:`CheckpointError` naming ``source`` and the
    key); out-of-range results of the options are :class:`UsageError`."""
    if stored and all(k in stored for k in ("input_size", "mean", "std")):
        base = Preprocessing.from_dict(stored, f"{source} preprocessing")
    elif getattr(net, "pretrained_cfg", None):
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=net)  # timm's own defaults for the architecture
        base = Preprocessing(input_size=(in_chans, *cfg["input_size"][-2:]), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                             crop_pct=float(cfg["crop_pct"]), interpolation=str(cfg["interpolation"]),
                             crop_mode=str(cfg.get("crop_mode") or "center"))
    else:  # torchvision: its classification references' eval transform
        base = Preprocessing((in_chans, 224, 224), IMAGENET_MEAN, IMAGENET_STD, 0.875, "bilinear")
    size = base.input_size
    if input_size is not None:
        dims = [int(v) for v in input_size]
        if not 1 <= len(dims) <= 3:
            raise UsageError(f"--input-size takes H,W (or C,H,W or one side), got {len(dims)} values")
        size = (in_chans, dims[-2], dims[-1]) if len(dims) >= 2 else (in_chans, dims[0], dims[0])
    m = tuple(mean) if mean is not None else base.mean
    s = tuple(std) if std is not None else base.std
    pre = Preprocessing(
        input_size=(in_chans, size[1], size[2]),
        mean=_fit_channels(m, in_chans, "mean"),
        std=_fit_channels(s, in_chans, "std"),
        crop_pct=base.crop_pct if crop_pct is None else float(crop_pct),
        interpolation=base.interpolation if interpolation is None else interpolation,
        crop_mode=base.crop_mode,
    )
    if problem := pre.problem():
        raise UsageError(f"preprocessing {problem} (from --input-size/--mean/--std/--crop-pct/--interpolation "
                         "or the model's config)")
    return pre


def _fit_channels(values: tuple[float, ...], in_chans: int, what: str) -> tuple[float, ...]:
    """ImageNet statistics are given for 3 channels; a grey model gets their average."""
    if not values:
        raise UsageError(f"--{what} needs at least one value")
    if len(values) == in_chans:
        return tuple(float(v) for v in values)
    if len(values) == 1:
        return tuple(float(values[0]) for _ in range(in_chans))
    if in_chans == 1:
        return (sum(values) / len(values),)
    raise UsageError(f"--{what} has {len(values)} values but the model takes {in_chans} channels")


def load_state_strict(net: nn.Module, state_dict: dict[str, torch.Tensor], arch: str, path: os.PathLike | str) -> None:
    """Strict loading with a one-line explanation of the first mismatch."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''} ({len(missing)} in all)")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{' …' if len(unexpected) > 3 else ''} ({len(unexpected)} in all)")
        raise CheckpointError(f"{path}: does not match architecture '{arch}': {'; '.join(parts)}")
    for k, v in expected.items():
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{path}: does not match architecture '{arch}': {k} has shape "
                f"{tuple(state_dict[k].shape)}, the architecture expects {tuple(v.shape)}"
            )
    full = {k: state_dict.get(k, v) for k, v in expected.items()}
    net.load_state_dict({k: t.to(expected[k].dtype) for k, t in full.items()}, strict=True)


def load_model(
    path: str | os.PathLike,
    arch: str | None = None,
    *,
    input_size: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: str | torch.device = "cpu",
    weights: Weights = "auto",
    model_kwargs: dict[str, Any] | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
) -> LoadedModel:
    """Read a checkpoint, build its architecture, load the weights strictly, wrap for pixels.

    ``weights``: of a training checkpoint, the model's, its EMA or ``auto``
    (:func:`.checkpoint.read_checkpoint`; ``weights_used``/``weights_reason`` of the result say).
    ``model_kwargs``: constructor arguments, over those the checkpoint carries (timm's
    ``model_args``); kept in the metadata written, so the output rebuilds without them."""
    raw = read_checkpoint(path, weights)
    meta = raw.meta
    if meta.get("_unparsable"):
        meta = {}
    arch = arch or meta.get("arch")
    if not arch:
        raise UsageError(f"{raw.path}: the checkpoint does not say its architecture; pass --arch (e.g. resnet18 or torchvision:resnet50)")
    if bad := [k for k in (model_kwargs or {}) if k in FORBIDDEN_MODEL_ARGS or not isinstance(k, str)]:
        raise UsageError(f"model_kwargs: {bad[0]!r} cannot be given (l2ul builds the network and loads its weights itself)")
    model_args = {**(meta.get("model_args") or {}), **(model_kwargs or {})}
    num_classes, in_chans = infer_shapes(arch, raw.state_dict, model_args)
    ctor = {k: v for k, v in model_args.items() if k not in ("num_classes", "in_chans")}
    net = build_network(arch, num_classes, in_chans, model_args=ctor)
    if input_size is None and model_kwargs and "img_size" in model_kwargs:  # the size the network is built for
        side = model_kwargs["img_size"]
        input_size = [side, side] if isinstance(side, int) else side
    load_state_strict(net, raw.state_dict, arch, raw.path)
    net.eval()
    class_names = meta.get("class_names")
    if class_names is not None and len(class_names) != num_classes:
        class_names = None
    pre = resolve_preprocessing(net, in_chans, meta.get("preprocessing"), input_size=input_size, mean=mean, std=std,
                                crop_pct=crop_pct, interpolation=interpolation, source=f"{raw.path}: metadata")
    # eval() on the wrapper too: a fresh nn.Module is in training mode, and code that saves and
    # restores ``model.training`` (predict, the attack, MAS) would otherwise put the net back in
    # training mode (BatchNorm on batch statistics) afterwards.
    model = PixelClassifier(net, pre.mean, pre.std).to(device).eval()
    ledger = meta.get("ledger") if isinstance(meta.get("ledger"), list) else []
    return LoadedModel(
        model=model, arch=arch, num_classes=num_classes, in_chans=in_chans,
        class_names=list(class_names) if class_names else None, preprocessing=pre,
        source=raw, ledger=list(ledger), model_args=model_args,
    )
