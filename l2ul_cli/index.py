"""A retained-space index per checkpoint: what PGU (../shared/papers/pgu-summary.md) caches.

For every convolution and linear layer, the uncentred covariance ``C = Σ a aᵀ`` of the inputs it
sees on a set of images (conv: unfolded patches, :func:`.projection._columns`; linear: input
features), accumulated batch by batch, and kept as its eigenpairs. A request then needs only the
forget images: their covariance is subtracted (:meth:`RetainedIndex.subtract`, PGU's
``compute_retain_svd``) and the retained space of what is left comes out of one
re-decomposition, without the retained images themselves.

Truncation trade-off: vectors are kept up to the index's ``energy`` share of each layer's trace,
all eigenvalues and the exact trace always. A subtraction is exact where every vector is kept
(energy 1.0) and otherwise misses the forget images' part in the dropped tail, at most
``1 - energy`` of the trace; the projection a request asks for must not reach past the index's
energy (it is refused). At 0.9999 a subtraction's projections matched an index built without
the forget images within 3e-5 of the gradient's norm (digits net; 3e-7 at energy 1.0, 1e-3 at
0.999), and PGU's γ = 0.95 on singular values reached 0.990-0.998 of each layer's energy there.

The file is a safetensors file: per layer ``layers.<i>.values`` (fp64), ``.vectors`` and, where
the indexed images leave input dimensions at zero (a 3x3 kernel on a 1x1 map reads padding in 8
of 9 taps), ``.support``; names, shapes, traces, image count, source, energy and the
checkpoint's SHA-256 are JSON under the metadata key ``l2ul_index``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .anchors import NullProgress, Progress
from .errors import CheckpointError, InputError, UsageError
from .errors import first_line as _first_line
from .files import atomic_write, sha256_file, usable_path
from .projection import GradientProjector, _columns, _eigh

INDEX_KEY = "l2ul_index"
INDEX_VERSION = 1
# Columns unfolded at once, in elements: 64 MiB of fp32 whatever the batch or image size.
CHUNK_ELEMENTS = 1 << 24
# Products in fp32, sums in fp64: the covariance stays within 1e-7 (relative) of all-fp64
# products and builds 1.2x faster on a CPU (1,500 16x16 digits through timm's test_resnet, one
# thread: 1.34 s against 1.64 s).
PRODUCT_DTYPE = torch.float32
# Vectors are written in fp16: projected gradients moved by at most 3e-4 of their norm against
# fp32 vectors, and a projected step changed the indexed images' logits by the same amount to
# 0.3 % (same net, γ-style energies 0.95 and 0.995); the file is half the size.
FILE_VECTORS = torch.float16
MAX_LAYERS = 10_000
MAX_TEXT = 1000  # characters of the index's source description


@dataclass
class LayerSpace:
    """One layer's retained inputs: eigenpairs of their covariance on the support."""

    shape: tuple[int, ...]  # the layer's weight shape
    support: torch.Tensor | None  # input dimensions (unfold order) any indexed image reaches; None: all
    values: torch.Tensor  # fp64, every eigenvalue on the support, descending (the tail estimated after subtractions)
    vectors: torch.Tensor  # fp32 (n, r): the first r eigenvectors, r set by the index's energy
    trace: float  # Σ of the eigenvalues: exact, also after subtractions

    @property
    def dim(self) -> int:
        return math.prod(self.shape[1:])

    def covariance(self) -> torch.Tensor:
        """The covariance on the support from the kept eigenpairs (fp64)."""
        v = self.vectors.double()
        return (v * self.values[:v.shape[1]].to(v.device)) @ v.T

    def energy_rank(self, energy: float) -> int:
        """Directions GradientProjector keeps at ``energy``: the fewest whose share reaches it."""
        if self.values.numel() == 0 or self.trace <= 0:
            return 0
        share = self.values.cumsum(0) / self.trace
        return min(int((share < energy).sum()) + 1, self.values.numel())

    def singular_rank(self, gamma: float) -> int:
        """Directions PGU keeps at γ (its unlearn.py): those whose running share of the singular
        values, √eigenvalues, is at most γ."""
        s = self.values.clamp_min(0).sqrt()
        if s.numel() == 0 or float(s.sum()) <= 0:
            return 0
        return int((s.cumsum(0) / s.sum() <= gamma).sum())


@dataclass
class RetainedIndex:
    layers: dict[str, LayerSpace]  # by module name, in model order
    images: int  # images whose inputs it holds
    source: str  # e.g. "5000 --retain images"
    energy: float  # share of each layer's trace its vectors reach
    sha256: str  # of the checkpoint it was built on ("" when unknown)
    forgotten: int = 0  # images subtracted since
    seconds: float = 0.0  # to build it
    # Of the last subtraction: the share of the forget images' covariance the index did not
    # hold (beyond its truncated tail). Near 0 when they were among the indexed images.
    excess: float = 0.0
    # A few of the indexed images (fp16, pixels in [0, 1]): the health check's probe set for the
    # requests that use the index instead of the images themselves.
    probes: torch.Tensor | None = None

    def check_matches(self, model: nn.Module, sha256: str, ledger: list[dict[str, Any]] | None = None) -> None:
        """Raise InputError unless the model has the index's layers and shapes and the checkpoint
        is the indexed one or descends from it by its ledger (no change outside l2ul since)."""
        have = _layer_shapes(model)
        for name, space in self.layers.items():
            if have.get(name) != space.shape:
                got = "no such layer" if name not in have else f"weight {list(have[name])}"
                raise InputError(f"the index does not fit this model: layer {name} is {list(space.shape)} in the "
                                 f"index, {got} in the model")
        extra = [n for n in have if n not in self.layers]
        if extra:
            raise InputError(f"the index does not fit this model: it has no layer {extra[0]}")
        if not _descends(self.sha256, sha256, ledger or []):
            raise InputError(f"the index was built on checkpoint {self.sha256[:12] or '(unknown)'}…, and this one "
                             f"({sha256[:12]}…) is neither it nor, by its ledger, made from it by l2ul")

    def subtract(self, model: nn.Module, forget_images: torch.Tensor, *, batch_size: int = 64) -> RetainedIndex:
        """The index without ``forget_images``: their covariance, on ``model``, removed from every
        layer's and the result re-decomposed (PGU's compute_retain_svd)."""
        n = forget_images.shape[0]
        if n > self.images:
            raise InputError(f"cannot subtract {n} images from an index of {self.images}")
        covs, _ = _covariances(model, list(self.layers), forget_images.split(batch_size))
        layers, unheld, total = {}, 0.0, 0.0
        for name, space in self.layers.items():
            layers[name], off, forget_trace = _subtract_layer(space, covs.pop(name), self.energy)
            unheld += off
            total += forget_trace
        return replace(self, layers=layers, images=self.images - n, forgotten=self.forgotten + n,
                       excess=unheld / total if total > 0 else 0.0)

    def projector(self, model: nn.Module, energy: float | None = None, *,
                  ranks: dict[str, int] | None = None) -> GradientProjector:
        """The projector GradientProjector would build from the indexed images at ``energy``
        (default: the index's), or keeping ``ranks`` directions per layer name."""
        energy = self.energy if energy is None else energy
        if ranks is None and energy > self.energy + 1e-12:
            raise UsageError(f"the index holds directions up to energy {self.energy}; projecting at {energy} "
                             "needs an index built at that energy or more")
        modules = _modules(model, list(self.layers))
        spaces = {}
        for name, space in self.layers.items():
            r = space.energy_rank(energy) if ranks is None else ranks.get(name, 0)
            device = modules[name].weight.device
            support = None if space.support is None else space.support.to(device)
            spaces[modules[name]] = (support, space.vectors.to(device), min(r, space.vectors.shape[1]))
        return GradientProjector.from_eigenpairs(model, spaces, energy=energy, source=self.describe_source())

    def describe_source(self) -> str:
        less = f", less {self.forgotten} forgotten" if self.forgotten else ""
        return f"an index of {self.source}{less}"


def _layer_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Weight shape of every projected (conv/linear) layer, by module name."""
    return {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _modules(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """The model's modules by name; InputError when one of ``names`` is missing."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise InputError(f"the index does not fit this model: it has no layer {missing[0]}")
    return modules


def _descends(indexed: str, sha256: str, ledger: list[dict[str, Any]]) -> bool:
    """Whether the checkpoint ``sha256`` is the indexed one, or its ledger has a request applied to
    the indexed one and no later request that found its weights changed outside l2ul."""
    if indexed and sha256 == indexed:
        return True
    entries = [e for e in ledger if isinstance(e, dict)]
    starts = [i for i, e in enumerate(entries) if e.get("input_sha256") == indexed and indexed]
    if not starts:
        return False
    return not any(e.get("new_segment") for e in entries[starts[-1] + 1:])


def build_index(model: nn.Module, batches: Iterable[torch.Tensor], *, energy: float, progress: Progress | None = None,
                source: str | None = None, sha256: str = "", total: int = 0) -> RetainedIndex:
    """Index the inputs every conv/linear layer of ``model`` sees on ``batches`` (on the model's
    device, eval mode). ``total``: images expected, for the progress bar."""
    if not 0 < energy <= 1:
        raise UsageError(f"index energy must be in (0, 1], not {energy}")
    progress = progress or NullProgress()
    t0 = time.perf_counter()
    progress.start("index", total, unit="images")
    try:
        covs, images = _covariances(model, list(_layer_shapes(model)), batches, progress)
    finally:
        progress.finish()
    if images == 0:
        raise InputError("no images to index")
    shapes = _layer_shapes(model)
    layers = {name: _decompose(shapes[name], covs.pop(name), energy) for name in shapes}
    return RetainedIndex(layers, images, source or f"{images} images", energy, sha256,
                         seconds=time.perf_counter() - t0)


def _covariances(model: nn.Module, names: list[str], batches: Iterable[torch.Tensor],
                 progress: Progress | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Σ a aᵀ (fp64, on the model's device) of the named layers' inputs over ``batches``, and
    the number of images; never more than one chunk of columns in memory."""
    modules = _modules(model, names)
    device = next(model.parameters()).device
    covs: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(layer, inputs):
            _accumulate(covs, name, layer, inputs[0].detach())
        return hook

    handles = [modules[n].register_forward_pre_hook(hook_for(n)) for n in names]
    was_training = model.training
    model.eval()
    images = 0
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch.to(device))
                images += batch.shape[0]
                if progress is not None:
                    progress.advance(batch.shape[0])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for n in names:  # a layer no batch reached (none given): nothing retained
        if n not in covs:
            d = modules[n].weight[0].numel()
            covs[n] = torch.zeros(d, d, dtype=torch.float64, device=device)
    return covs, images


def _accumulate(covs: dict[str, torch.Tensor], name: str, layer: nn.Module, x: torch.Tensor) -> None:
    """Add the layer's input columns' products, a chunk of images at a time."""
    d = layer.weight[0].numel()
    acc = covs.get(name)
    if acc is None:
        acc = covs[name] = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    per_image = max(1, _columns(layer, x[:1]).shape[1])
    for part in x.split(max(1, CHUNK_ELEMENTS // (d * per_image))):
        a = _columns(layer, part).to(PRODUCT_DTYPE)
        acc += (a @ a.T).double()


def _decompose(shape: tuple[int, ...], cov: torch.Tensor, energy: float) -> LayerSpace:
    """Eigenpairs of one layer's covariance on its support, vectors up to ``energy``."""
    diag = cov.diagonal()
    support = (diag > 0).nonzero().flatten()
    vals, vecs = _eigh(cov[support][:, support]) if support.numel() else (diag[:0], cov[:0, :0])
    space = LayerSpace(shape, None if support.numel() == diag.numel() else support.cpu(), vals.cpu(),
                       vecs.cpu().float(), float(diag.sum()))
    space.vectors = space.vectors[:, :space.energy_rank(energy)].contiguous()
    return space


def _subtract_layer(space: LayerSpace, cov: torch.Tensor, energy: float) -> tuple[LayerSpace, float, float]:
    """One layer's space less ``cov`` (the forget images' covariance); also the part of that
    covariance the space did not hold beyond its dropped tail, and its trace."""
    cov = cov.cpu()
    diag = cov.diagonal()
    forget_trace = float(diag.sum())
    if space.values.numel() == 0:
        return space, forget_trace, forget_trace
    sub = cov if space.support is None else cov[space.support][:, space.support]
    m = space.covariance() - sub
    vals, vecs = _eigh(m)  # eigenvalues clamped at 0
    negative = float(vals.sum() - m.trace())  # Σ |negative eigenvalues|: what was not there to remove
    r = space.vectors.shape[1]
    tail = space.values[r:]
    values = torch.cat([vals, tail]).sort(descending=True).values[:space.values.numel()]
    new = LayerSpace(space.shape, space.support, values, vecs.float(), max(space.trace - forget_trace, 0.0))
    # Never more directions than the index held: the dropped tail's vectors are not known.
    new.vectors = new.vectors[:, :min(new.energy_rank(energy), r)].contiguous()
    outside = forget_trace - float(sub.diagonal().sum())  # where no indexed image had any energy
    return new, outside + max(negative - float(tail.sum()), 0.0), forget_trace


def save_index(path: str | os.PathLike, index: RetainedIndex) -> str:
    """Write the index as a safetensors file, atomically; returns its SHA-256."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for i, (name, space) in enumerate(index.layers.items()):
        tensors[f"layers.{i}.values"] = space.values.double().contiguous()
        tensors[f"layers.{i}.vectors"] = space.vectors.to(FILE_VECTORS).contiguous()
        if space.support is not None:
            tensors[f"layers.{i}.support"] = space.support.long().contiguous()
        layers.append({"name": name, "shape": list(space.shape), "trace": space.trace})
    if index.probes is not None:
        tensors["probes"] = index.probes.half().contiguous()
    meta = {"version": INDEX_VERSION, "images": index.images, "source": index.source, "energy": index.energy,
            "sha256": index.sha256, "forgotten": index.forgotten, "seconds": round(index.seconds, 3),
            "vectors": str(FILE_VECTORS).removeprefix("torch."), "layers": layers}
    # One metadata key: safetensors orders several differently from run to run (checkpoint.py).
    header = {INDEX_KEY: json.dumps(meta, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    return sha256_file(path)


def load_index(path: str | os.PathLike) -> RetainedIndex:
    """Read an index written by :func:`save_index`; anything malformed is an InputError."""
    from safetensors import safe_open

    p = Path(path)
    if not usable_path(p, "index").is_file():
        raise InputError(f"{p}: index file not found")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get(INDEX_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types and OSError
        raise InputError(f"{p}: not a readable index file ({_first_line(exc)})") from exc
    if raw is None:
        raise InputError(f"{p}: not an l2ul index (no '{INDEX_KEY}' metadata)")
    meta = _index_meta(raw, p)
    layers = {}
    for i, entry in enumerate(meta["layers"]):
        layers[entry["name"]] = _layer_from_file(entry, i, tensors, p)
    return RetainedIndex(layers, meta["images"], meta["source"], meta["energy"], meta["sha256"],
                         forgotten=meta["forgotten"], seconds=meta["seconds"], probes=_probes(tensors.get("probes"), p))


def _probes(t: torch.Tensor | None, p: Path) -> torch.Tensor | None:
    if t is None:
        return None
    if t.dtype != torch.float16 or t.dim() != 4 or not 0 < t.shape[0] <= MAX_PROBES or t.shape[1] > 16 \
            or not bool(torch.isfinite(t).all()):
        raise InputError(f"{p}: index probes must be 1 to {MAX_PROBES} finite fp16 images (N, C, H, W)")
    return t.float().clamp_(0, 1)


def _index_meta(raw: str, p: Path) -> dict[str, Any]:
    """The index's metadata, its types and ranges checked (it is untrusted input)."""
    from .checkpoint import _parse_json

    try:
        meta = _parse_json(raw, f"{p}: metadata '{INDEX_KEY}'")
    except CheckpointError as exc:
        raise InputError(exc.message) from None
    except ValueError as exc:
        raise InputError(f"{p}: metadata '{INDEX_KEY}' is not valid JSON ({_first_line(exc)})") from None

    def bad(key: str, what: str) -> InputError:
        return InputError(f"{p}: index metadata '{key}' {what}")

    if not isinstance(meta, dict):
        raise bad(INDEX_KEY, "must be an object")
    if meta.get("version") != INDEX_VERSION:
        raise bad("version", f"is {meta.get('version')!r}; this l2ul reads version {INDEX_VERSION}")
    for key in ("images", "forgotten"):
        if not _is_int(meta.get(key)) or meta[key] < 0:
            raise bad(key, "must be a whole number, 0 or more")
    energy = meta.get("energy")
    if not _is_number(energy) or not 0 < energy <= 1:
        raise bad("energy", "must be a number in (0, 1]")
    seconds = meta.setdefault("seconds", 0.0)
    if not _is_number(seconds) or seconds < 0:
        raise bad("seconds", "must be a number, 0 or more")
    if not isinstance(meta.get("source"), str) or len(meta["source"]) > MAX_TEXT:
        raise bad("source", f"must be a string of at most {MAX_TEXT} characters")
    sha = meta.get("sha256")
    if not (isinstance(sha, str) and (sha == "" or (len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)))):
        raise bad("sha256", "must be a SHA-256 in hex (64 characters) or empty")
    layers = meta.get("layers")
    if not isinstance(layers, list) or not 0 < len(layers) <= MAX_LAYERS:
        raise bad("layers", f"must be a list of 1 to {MAX_LAYERS:,} layers")
    names = set()
    for i, e in enumerate(layers):
        if not (isinstance(e, dict) and isinstance(e.get("name"), str) and 0 < len(e["name"]) <= MAX_TEXT
                and isinstance(e.get("shape"), list) and 2 <= len(e["shape"]) <= 5
                and all(_is_int(d) and 0 < d <= 1 << 31 for d in e["shape"])
                and _is_number(e.get("trace")) and e["trace"] >= 0):
            raise bad(f"layers[{i}]", "must be an object with a name, a weight shape (2 to 5 positive whole "
                      "numbers) and a trace (a number, 0 or more)")
        if e["name"] in names:
            raise bad(f"layers[{i}]", f"repeats layer {e['name']}")
        names.add(e["name"])
    return meta


MAX_PROBES = 1024


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _layer_from_file(entry: dict[str, Any], i: int, tensors: dict[str, torch.Tensor], p: Path) -> LayerSpace:
    """One layer's tensors, checked against its metadata: shapes, dtypes, ranges, finiteness."""
    name, shape = entry["name"], tuple(entry["shape"])
    d = math.prod(shape[1:])

    def bad(what: str) -> InputError:
        return InputError(f"{p}: index layer {name}: {what}")

    values, vectors = tensors.get(f"layers.{i}.values"), tensors.get(f"layers.{i}.vectors")
    support = tensors.get(f"layers.{i}.support")
    if values is None or vectors is None:
        raise bad("values or vectors missing")
    if support is not None:
        if support.dtype != torch.int64 or support.dim() != 1 or support.numel() > d or (
                support.numel() and (int(support[0]) < 0 or int(support[-1]) >= d or
                                     bool((support[1:] <= support[:-1]).any()))):
            raise bad(f"support must be increasing int64 indices below {d}")
    n = d if support is None else support.numel()
    if values.dtype != torch.float64 or values.shape != (n,) or not bool(torch.isfinite(values).all()) \
            or bool((values < 0).any()):
        raise bad(f"values must be {n} finite fp64 numbers, 0 or more")
    if vectors.dtype not in (torch.float16, torch.float32) or vectors.dim() != 2 or vectors.shape[0] != n \
            or vectors.shape[1] > n or not bool(torch.isfinite(vectors).all()):
        raise bad(f"vectors must be a finite fp16/fp32 matrix of {n} rows and at most {n} columns")
    vectors = vectors.float()
    # Cheap sanity of the directions: unit columns (fp16 rounding moves a norm by ~1e-3).
    if vectors.numel() and float((vectors.norm(dim=0) - 1).abs().max()) > 1e-2:
        raise bad("vectors are not unit directions")
    return LayerSpace(shape, support, values, vectors, float(entry["trace"]))


def is_index(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file with an l2ul index's metadata key."""
    from safetensors import safe_open

    p = Path(path)
    if p.suffix != ".safetensors" or not p.is_file():
        return False
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            return INDEX_KEY in (f.metadata() or {})
    except Exception:  # not readable as safetensors: let the checkpoint reader say why
        return False


def describe_index(path: str | os.PathLike) -> dict[str, Any]:
    """What ``l2ul info INDEX`` shows: provenance, size and the directions kept per layer."""
    index = load_index(path)
    kept = sum(s.vectors.shape[1] for s in index.layers.values())
    dims = sum(s.dim for s in index.layers.values())
    return {"index": str(path), "sha256": sha256_file(path), "checkpoint_sha256": index.sha256,
            "images": index.images, "source": index.source, "forgotten": index.forgotten, "energy": index.energy,
            "layers": len(index.layers), "directions": kept, "dimensions": dims,
            "images_per_second": round(index.images / index.seconds, 1) if index.seconds > 0 else None,
            "bytes": os.path.getsize(path), "probes": 0 if index.probes is None else int(index.probes.shape[0]),
            "per_layer": {n: {"kept": s.vectors.shape[1], "dimensions": s.dim} for n, s in index.layers.items()}}
