"""Settings of each phase as frozen dataclasses: the one source of truth for every option.

A field's default, type and help (its ``metadata``, made by :func:`cli_option`) are read by the
CLI to build its options and their ``[default: …]`` help, by ``--config`` for its keys, and by
the report for its ``config``. The paper's methods and this tool's own are presets
(:data:`METHODS`) over :class:`UnlearnConfig`; :func:`resolve` applies one with a user's
overrides and refuses combinations that would be silently ignored. The measurements behind
each default live in benchmarks/RESULTS.md, under the section named beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, get_args

from .errors import UsageError

Goal = Literal["forget", "relabel"]
BNMode = Literal["eval", "train"]
Objective = Literal["ce", "margin", "indistinguishable"]
AdvLoss = Literal["none", "ce", "kd"]
Weighting = Literal["sum", "share"]
ImportanceEstimate = Literal["per-sample", "batch"]
PGUStop = Literal["gap", "goal"]
AttackStart = Literal["ball", "noise"]
StandInSource = Literal["auto", "dead-leaves", "forget-statistics"]

# Help panels of ``forget --help`` / ``relabel --help``, in order.
PANELS = ("Inputs & outputs", "Method", "Attack", "Retention", "Continual", "Reports", "Advanced")


def cli_option(help: str, *, flag: str | None = None, panel: str = "Advanced", default_help: str | None = None) -> dict[str, Any]:
    """Field metadata that makes a config field a command-line option (``--field-name`` unless
    ``flag``); ``default_help`` replaces the ``[default: …]`` derived from the presets."""
    return {"cli": {"help": help, "flag": flag, "panel": panel, "default_help": default_help}}


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata=cli_option(help, **kw))


@dataclass(frozen=True)
class AttackConfig:
    """Targeted L2-PGD on the forget images (Algorithm 1)."""

    n_adv: int = _opt(20, "Adversarial copies per image.", panel="Attack")  # paper: 20 on CIFAR-10
    # None: eps_at_28x28 at Fashion-MNIST's 28x28x1, scaled with the square root of the image
    # size (same per-pixel RMS), e.g. 1.98 at 32x32x3 for 1.0.
    eps: float | None = _opt(None, "L2 radius of the attack in [0,1] pixel space.", panel="Attack",
                             default_help="1.0 at 28x28x1, scaled with sqrt(image size)")
    eps_at_28x28: float = 1.0  # the reference code uses 1-5 on CIFAR
    step_size: float = _opt(0.1, "PGD step length (L2).", flag="--attack-step-size", panel="Attack")  # paper: 1e-1
    steps: int = _opt(100, "PGD iterations.", flag="--attack-steps", panel="Attack")  # paper: 100
    random_start: bool = True
    # The reference code's attack library (advertorch) starts an L2 PGD at a uniform random image
    # pulled to within eps of the image: a visible haze of noise on every copy, unlike a point in
    # the ball. Its methods' presets start there (RESULTS.md "The paper's methods beside the
    # official code").
    start: AttackStart = _opt("ball", "Where each PGD run starts: ball (a random point in the L2 ball) or noise (a "
                              "uniform random image pulled to within eps of the image, as the reference code's attack).",
                              flag="--attack-start", panel="Attack")
    per_copy_targets: bool = _opt(False, "Draw an attack target for every copy, or one per image (Algorithm 1).",
                                  flag="--per-copy-targets/--one-target-per-image", panel="Attack")
    batch_size: int = 0  # rows per attack chunk (0: chunk_rows picks); halves on CUDA out-of-memory
    cuda_graph: bool = False  # replay each chunk's PGD step as a CUDA graph (CUDA only)
    def radius(self, image_shape: tuple[int, ...]) -> float:
        """The L2 radius for images of ``image_shape`` (C, H, W)."""
        return resolve_eps(self.eps, image_shape, self.eps_at_28x28)

    def chunk_rows(self, image_shape: tuple[int, ...], device_type: str) -> int:
        """Rows per attack chunk: ``batch_size`` if set, else a budget of pixel values (a cap for
        speed: :func:`.anchors.attack_with_retry` lowers it to what the free memory holds).

        CUDA: 4,096 rows at 28x28x1 (the attack took 0.75 s instead of 2.2 s with 1,024 on an
        H100: fewer kernel launches), 256 at 224x224x3 (about 13 GB for a ResNet-50 in bf16).
        CPU: 1,024 rows at 28x28 (4,096 was slower there), 32 at 224x224x3 (about 1.6 GB of RAM;
        1,024 such rows would need about 50 GB).
        """
        if self.batch_size:
            return self.batch_size
        cap, at_224 = (4096, 256) if device_type == "cuda" else (1024, 32)
        return max(1, min(cap, at_224 * 224 * 224 * 3 // math.prod(int(d) for d in image_shape)))


def resolve_eps(eps: float | None, image_shape: tuple[int, ...], at_28x28: float = 1.0) -> float:
    """The attack radius for images of ``image_shape`` (C, H, W)."""
    if eps is not None:
        return float(eps)
    return at_28x28 * (math.prod(int(d) for d in image_shape) / 784) ** 0.5


@dataclass(frozen=True)
class UnlearnConfig:
    """The update loop: objective, regularisers, optimiser and stop rule. A field with CLI
    metadata is an option whose default is the method's preset (:data:`METHODS`)."""

    objective: Objective = _opt("ce", "Objective on the forget images: ce (the paper's), margin (bounded), or "
                                "indistinguishable (forget: losses like --holdout images', as if never trained).",
                                panel="Method")
    adv_loss: AdvLoss = _opt("ce", "Adversarial term: none, ce (the paper's: CE to the attack targets) or kd "
                             "(distil the original model).", panel="Method")
    importance: bool = True  # the MAS penalty of Eq. 7
    # per-sample: Eq. 2 as written (the absolute value of each image's gradient of the squared
    # output norm, in eval mode); batch: the reference code's estimate (the absolute value of
    # one batch's gradient of the mean output norm, BatchNorm in train mode).
    importance_estimate: ImportanceEstimate = _opt("per-sample", "How the importance is measured: per-sample (Eq. 2) "
                                                   "or batch (the reference code's).", panel="Advanced")
    # Measure the importance on the images of earlier requests too (--keep); RESULTS.md "The
    # continual stream": off kept 0.2-0.8 points more after every request from the third.
    keep_importance: bool = False
    lam: float = _opt(1.0, "λ of the importance penalty.", panel="Method")
    lr: float = _opt(1e-3, "SGD learning rate of the update steps, projected or not.", panel="Method")
    momentum: float = 0.9
    weight_decay: float = _opt(1e-5, "SGD weight decay of unprojected updates.", panel="Advanced")
    max_steps: int = _opt(500, "Step cap.", panel="Method")
    bn: BNMode = _opt("eval", "BatchNorm during updates: eval (frozen) or train (as the reference code).", panel="Advanced")
    margin: float = _opt(1.0, "Logit margin past its goal to which the bounded objective pushes each image "
                         "(RESULTS.md \"Where a CPU request's seconds go at k = 16\").", panel="Advanced")
    kd_temperature: float = 1.0
    adv_weight: float = _opt(1.0, "Weight of the adversarial term against the objective.", panel="Method")  # paper: 1
    # A heavier distillation for more forget images (adv_weight_for()): past adv_weight_images
    # images, this much per image, at least adv_weight, at most adv_weight_max.
    adv_weight_images: int = 0
    adv_weight_per_image: float = 0.0
    adv_weight_max: float = 0.0
    # On a non-finite loss, go back to weights from checkpoint_every to 2 x checkpoint_every steps
    # earlier, halve the adversarial term's weight and go on, at most this many times (0: stop
    # with an error, as the paper's methods do when −CE runs away).
    divergence_retries: int = 0
    checkpoint_every: int = 25
    shift_copies: int = _opt(0, "Copies of each image shifted by 1-2 pixels (at 28x28) kept at the original "
                             "model's outputs (with --adv-loss kd), so the change stays on the image.", panel="Retention")
    # Largest shift in pixels; None: 2 at 28x28, scaled with the shorter image side (16 at 224).
    shift_pixels: int | None = None
    mix_copies: int = _opt(0, "Blends of each image with another of its class kept at the original model's "
                           "outputs (with --adv-loss kd), so the class keeps its place.", panel="Retention")
    adv_batch_size: int = 256  # adversarial rows per update step
    # Anchor rows drawn in a fresh random order each pass (False: in order, the last batch of a
    # pass partial, as the reference code's unshuffled DataLoader).
    shuffle_anchors: bool = True
    forget_batch_size: int = _opt(0, "Forget images per update step, cycled in order; 0: all of them every step.",
                                  panel="Advanced")
    # sum: objective + adv_weight x adversarial term; share: each term weighted by its rows'
    # share of the step's rows, as the reference code does (then adv_weight scales the second).
    weighting: Weighting = _opt("sum", "How the two terms add up: sum (objective + weight x adversarial term) or "
                                "share (each by its share of the step's rows, as the reference code).", panel="Advanced")
    adapt_lambda: bool = True  # halve λ when progress stalls, so the goal is reached (relabel)
    stall_steps: int = 50
    # Projected updates (projection.py): from --retain images, else from synthetic_retain images
    # made from the model's BatchNorm statistics, or without them the request images' (synthesis.py;
    # 0: no projection).
    synthetic_retain: int = _opt(0, "Without --retain: stand-in images made from the model's BatchNorm "
                                 "statistics (without them, the request images') to keep updates orthogonal to; "
                                 "0: no projection.", panel="Retention")
    # More stand-ins for more forget images (stand_ins()): this many per image, up to
    # synthetic_retain_max. The deepest layers of a small image see one input column per image,
    # so 256 stand-ins span at most 256 of ResNet-18's 512 input directions there.
    synthetic_per_image: int = 0
    synthetic_retain_max: int = 0
    synthetic_steps: int = 200
    synthetic_lr: float = 0.1  # Adam's step on the stand-ins' pixel logits
    # auto: from BatchNorm statistics where the model has them, else forget-statistics (a note
    # says so); forget-statistics: images matched to the norm layers' input statistics on the
    # request's own images and their shifted copies (synthesis.input_statistics); dead-leaves:
    # class-like dead-leaves images, an experiment (RESULTS.md "Stand-ins for networks without
    # BatchNorm": forget-statistics kept 1 point more on a ViT).
    synthetic_source: StandInSource = "auto"
    # Share of the retained images' input energy per layer that updates must not touch
    # (RESULTS.md "Projected updates": 0.995 kept 0.4-1.2 more points than 0.97).
    gamma: float = _opt(0.95, "PGU: share of each layer's singular-value sum of the index that its updates "
                        "must not touch (1.0: the layer is held).", panel="Retention")
    pgu_stop: PGUStop = _opt("gap", "PGU: stop once forget accuracy falls below --holdout accuracy (gap, the "
                             "paper's code), or when every image is misclassified (goal).", panel="Method")
    retain_fraction: float = _opt(0.3, "LTU: the share of the --retain images its query sets and membership "
                                  "models draw from.", panel="Retention")
    retain_energy: float = _opt(0.995, "Share of the retained images' input energy per layer that updates "
                                "must not touch.", panel="Retention")
    projected_lr: float | None = None  # the learning rate of projected updates (None: lr)

    def stand_ins(self, k: int) -> int:
        """How many stand-in images to make for ``k`` forget images."""
        return max(self.synthetic_retain, min(self.synthetic_retain_max, self.synthetic_per_image * k))

    def adv_weight_for(self, k: int) -> float:
        """The weight of the adversarial term for ``k`` forget images."""
        if k <= self.adv_weight_images:
            return self.adv_weight
        return max(self.adv_weight, min(self.adv_weight_max, self.adv_weight_per_image * k))

    def shift(self, image_shape: tuple[int, ...]) -> int:
        """The largest shift of the shifted copies for images of ``image_shape`` (C, H, W)."""
        if self.shift_pixels is not None:
            return int(self.shift_pixels)
        return max(1, round(2 * min(int(image_shape[-2]), int(image_shape[-1])) / 28))


# The paper's methods, by the names used in its tables, and this tool's own ("l2ul": bounded
# objective, distillation on the adversarial copies and on shifted copies and blends, updates
# projected away from stand-ins). Each l2ul value's measurement is in benchmarks/RESULTS.md:
# "Projected updates", "Adversarial rows per step", "More stand-ins for more images", "A
# distillation weight that grows with the forget images", "The 20-epoch model on a CPU"
# (divergence retries), "Shifted copies", "Blends".
# The paper's methods run as its reference code runs them (github csm9493/L2UL, CIFAR-10 script):
# SGD lr 1e-3, momentum 0.9, weight decay 1e-4, forget batch 32, 256 adversarial rows per step in
# order, each term weighted by its share of the rows, BatchNorm in train mode, importance by its
# batch estimate, no λ adaptation, a stop when every forget image is misclassified (1000 passes
# at most). Its penalty is λ/2 Σ w (θ − θ̃)² at λ = 1: lam 0.5 here, where the penalty has no ½.
_REFERENCE: dict[str, Any] = {"objective": "ce", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4, "bn": "train",
                              "forget_batch_size": 32, "adv_batch_size": 256, "shuffle_anchors": False,
                              "weighting": "share", "adapt_lambda": False, "max_steps": 5000}
METHODS: dict[str, dict[str, Any]] = {
    "neggrad": {**_REFERENCE, "adv_loss": "none", "importance": False},
    "correct": {**_REFERENCE, "adv_loss": "none", "importance": False},
    "adv": {**_REFERENCE, "adv_loss": "ce", "importance": False},
    "adv+imp": {**_REFERENCE, "adv_loss": "ce", "importance": True, "importance_estimate": "batch", "lam": 0.5},
    "l2ul": {"objective": "margin", "margin": 0.0, "adv_loss": "kd", "adv_weight": 10.0, "importance": True, "lr": 1e-4,
             "projected_lr": 1e-2, "synthetic_retain": 256, "adv_batch_size": 64,
             "synthetic_per_image": 8, "synthetic_retain_max": 512,
             "adv_weight_images": 16, "adv_weight_per_image": 0.8, "adv_weight_max": 100.0,
             "divergence_retries": 3, "max_steps": 2000, "shift_copies": 8, "mix_copies": 8},
    # LTU (Huang et al., ECCV 2024) is an algorithm of its own (:mod:`.ltu`): of these settings it
    # takes the learning rate, the step cap and retain_fraction; the rest are its LTUConfig's.
    "ltu": {"objective": "ce", "adv_loss": "none", "importance": False, "lr": 1e-3, "max_steps": 1000},
    # PGU (Hoang et al., WACV 2024) likewise (:mod:`.pgu`): it takes gamma and pgu_stop; the rest
    # (lr 0.05 to 0.01 over 100 epochs, its loss) are its PGUConfig's, from its official code.
    "pgu": {"objective": "ce", "adv_loss": "none", "importance": False},
}
# Methods that are algorithms of their own rather than compositions of the core's parts, and the
# settings each takes (any other is refused, not ignored); settings only one method takes.
SEPARATE_METHODS = ("ltu", "pgu")
# The methods that serve each goal (goals.py's records take theirs from here), and other choices
# the CLI declares: kept here, with no torch import, so `l2ul --help` and shell completion start fast.
GOAL_METHODS: dict[str, tuple[str, ...]] = {"forget": ("neggrad", "adv", "adv+imp", "l2ul", "ltu", "pgu"),
                                            "relabel": ("correct", "adv", "adv+imp", "l2ul")}
# The names timm's transforms take (timm.data.transforms.str_to_interp_mode).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
Weights = Literal["auto", "model", "ema"]  # which of a checkpoint's weight sets (pickled.py)
WEIGHT_CHOICES: tuple[str, ...] = get_args(Weights)
# The index keeps vectors up to this share of each layer's trace: a request's projection (0.995 by
# default, PGU's γ) stays inside it, and subtracting forget images stays within 3e-5 of rebuilding
# without them (benchmarks/RESULTS.md, "The retained-space index").
INDEX_ENERGY = 0.9999
INDEX_STAND_INS = METHODS["l2ul"]["synthetic_retain_max"]  # the most stand-ins a request makes
METHOD_FIELDS: dict[str, set[str]] = {"ltu": {"lr", "max_steps", "retain_fraction"}, "pgu": {"gamma", "pgu_stop"}}
OWNED_FIELDS = {"retain_fraction": "ltu", "gamma": "pgu", "pgu_stop": "pgu"}


def uses(method: str, name: str) -> bool:
    """Whether ``method`` reads the setting ``name``."""
    if name in OWNED_FIELDS:
        return OWNED_FIELDS[name] == method
    return name in METHOD_FIELDS.get(method, {name})
DEFAULT_METHOD = "l2ul"
# The reference code's attack: ε 4 at any image size (its README: 1 to 5), a fresh random target
# for every copy, starts from noise images.
_REFERENCE_ATTACK: dict[str, Any] = {"eps": 4.0, "per_copy_targets": True, "start": "noise"}
ATTACKS: dict[str, dict[str, Any]] = {"adv": _REFERENCE_ATTACK, "adv+imp": _REFERENCE_ATTACK}


def attack_config(method: str = DEFAULT_METHOD, **overrides: Any) -> AttackConfig:
    """AttackConfig of a method, with explicit overrides (None values ignored)."""
    cfg = replace(AttackConfig(), **ATTACKS.get(method, {}))
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def preset(method: str, base: UnlearnConfig | None = None, **overrides: Any) -> UnlearnConfig:
    """UnlearnConfig for a method name, with explicit overrides (None values ignored).

    An explicit ``lr`` is the learning rate of every update step, projected or not: it clears the
    method's ``projected_lr`` unless that is overridden too; likewise an explicit stand-in count
    or distillation weight holds at every k."""
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")
    cfg = replace(base or UnlearnConfig(), **METHODS[method])
    given = {k: v for k, v in overrides.items() if v is not None}
    if "lr" in given:
        given.setdefault("projected_lr", None)
    if "synthetic_retain" in given:
        given.setdefault("synthetic_per_image", 0)
    if "adv_weight" in given:
        given.setdefault("adv_weight_per_image", 0.0)
    return replace(cfg, **given)


def resolve(method: str, goal: str, **overrides: Any) -> UnlearnConfig:
    """The method's preset with the user's overrides, refusing what would be silently ignored:
    a method of the other goal, negative settings, and settings of a term the method lacks."""
    from .goals import goal_named

    allowed = goal_named(goal).methods
    if method not in allowed:
        raise UsageError(f"--method must be one of {', '.join(allowed)} for {goal} (got '{method}')")
    given = {k: v for k, v in overrides.items() if v is not None}
    for key, value in given.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise UsageError(f"--{key.replace('_', '-')} must not be negative (got {value})")
    cfg = preset(method, **given)
    for key in given:
        if not uses(method, key) and not (key == "objective" and given[key] == "indistinguishable"):
            owner = f"--method {OWNED_FIELDS[key]}" if key in OWNED_FIELDS else "the core methods"
            raise UsageError(f"--{key.replace('_', '-')} is a setting of {owner}; {method} does not use it")
    if not 0.0 < cfg.gamma <= 1.0:
        raise UsageError(f"--gamma must be in (0, 1] (got {cfg.gamma})")
    if not 0.0 < cfg.retain_fraction <= 1.0:
        raise UsageError(f"--retain-fraction must be in (0, 1] (got {cfg.retain_fraction})")
    if cfg.objective == "indistinguishable" and (goal != "forget" or method == "pgu"):
        raise UsageError(f"--objective indistinguishable is a forget objective of the core methods and LTU, not of "
                         f"{goal} with {method}")
    if "margin" in given and cfg.objective != "margin":
        raise UsageError(f"--margin shapes the bounded objective only; {method} uses {cfg.objective} (add --objective margin)")
    for key in ("shift_copies", "mix_copies"):
        if given.get(key) and cfg.adv_loss != "kd":
            raise UsageError(f"--{key.replace('_', '-')} adds distillation anchors; {method} has adv-loss "
                             f"{cfg.adv_loss} (add --adv-loss kd)")
    return cfg


def cli_fields(cls: type) -> list[Any]:
    """The fields of a config dataclass that are command-line options, in declaration order."""
    return [f for f in fields(cls) if "cli" in f.metadata]


def default_text(name: str, methods: tuple[str, ...] = tuple(METHODS), *, attack: bool = False, none: str = "none") -> str:
    """The ``[default: …]`` of a config option, from the presets of ``methods``: the methods
    grouped by the value they use (``none`` names a None value)."""
    by_value: dict[str, list[str]] = {}
    for method in [m for m in methods if attack or uses(m, name)] or methods:
        value = _effective(attack_config(method) if attack else preset(method), name, none)
        by_value.setdefault(value, []).append(method)
    if len(by_value) == 1:
        return next(iter(by_value))
    return "; ".join(f"{v} for {', '.join(ms)}" for v, ms in by_value.items())


def _effective(cfg: UnlearnConfig | AttackConfig, name: str, none: str) -> str:
    if getattr(cfg, name) is None:
        return none
    if name == "lr" and cfg.projected_lr is not None:
        return f"{cfg.projected_lr:g} projected, {cfg.lr:g} not"
    if name == "adv_weight" and cfg.adv_weight_per_image:
        return (f"{cfg.adv_weight:g} up to {cfg.adv_weight_images} images, then {cfg.adv_weight_per_image:g} "
                f"per image up to {cfg.adv_weight_max:g}")
    if name == "synthetic_retain" and cfg.synthetic_per_image:
        return f"{cfg.synthetic_per_image} per image, {cfg.synthetic_retain}-{cfg.synthetic_retain_max}"
    value = getattr(cfg, name)
    return f"{value:g}" if isinstance(value, float) else str(value)
