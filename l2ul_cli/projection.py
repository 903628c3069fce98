"""Gradient projection away from what other images use (``--retain``).

The same idea as GPM (Saha et al., 2021) and PGU (see ../shared/papers): for every convolution
and linear layer, the inputs it sees on a set of retained images span, up to a share of their
energy, a subspace ``U``. An update ``ΔW`` with ``ΔW U = 0`` leaves that layer's output on those
inputs unchanged, so projecting each weight gradient onto the orthogonal complement changes the
model where the forget images differ from the retained ones and (to first order) nowhere else.
Biases and normalisation parameters act on every input alike and are held fixed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
from timm.layers.padding import pad_same
from torch import nn

from .evaluate import accuracy, predict


def _columns(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as a (features, samples) matrix: one column per position and image."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1]).T
    x, padding = _as_read(layer, x.float())
    cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=padding, stride=layer.stride)
    n, _, positions = cols.shape
    # Grouped (e.g. depthwise) convolutions: every group reads its own channels with the same
    # kind of patch, so the groups' patches share one input space.
    return cols.view(n, layer.groups, -1, positions).permute(2, 0, 1, 3).reshape(cols.shape[1] // layer.groups, -1)


def _as_read(conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...] | int]:
    """The input padded as the convolution itself pads it, and the zero padding left to unfold.

    A forward pre-hook sees the input before any padding the layer does in its own forward:
    timm's TF-style 'same' convolutions (Conv2dSame, and StdConv2dSame with ``same_pad``) pad
    by an amount that depends on the input size, and torch's string paddings and non-zero
    padding modes are not the ``padding`` tuple unfold understands.
    """
    if isinstance(conv, (Conv2dSame, Conv2dSameExport)) or getattr(conv, "same_pad", False):
        return pad_same(x, conv.kernel_size, conv.stride, conv.dilation), 0
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=mode), 0
    return x, conv.padding


SUPPORT_SHARE = 0.75  # work on the support only where it is at most this share of the dimensions


class GradientProjector:
    """Bases of the retained inputs of every conv/linear layer, and the projection of gradients."""

    def __init__(self, model: nn.Module, images: torch.Tensor, *, energy: float, batch_size: int = 32,
                 max_columns: int = 50_000, seed: int = 0):
        self.energy = energy
        self.source = f"{images.shape[0]} retained images"
        self.layers, self.frozen = _layers_and_frozen(model)
        gen = torch.Generator().manual_seed(seed)
        # Per layer: the columns themselves while there are fewer than features (deep layers of
        # small images: 1x1 maps), the covariance once there are more.
        seen: dict[nn.Module, list[torch.Tensor] | torch.Tensor] = {}

        def hook(layer, inputs):
            a = _columns(layer, inputs[0].detach())
            if a.shape[1] > max_columns:  # big feature maps: a random subset of positions
                a = a[:, torch.randperm(a.shape[1], generator=gen)[:max_columns].to(a.device)]
            # fp32 products, fp64 eigendecompositions (_principal): 0.4 s less to build for the
            # benchmark's ResNet-18, the same ranks and projected gradients within 5e-5 of an fp64
            # build (benchmarks/RESULTS.md); fp32 eigendecompositions moved them by up to 4 %.
            a = a.float()
            got = seen.setdefault(layer, [])
            if isinstance(got, list):
                got.append(a)
                if sum(c.shape[1] for c in got) > a.shape[0]:
                    cat = torch.cat(got, 1)
                    seen[layer] = cat @ cat.T
            else:
                got += a @ a.T

        handles = [m.register_forward_pre_hook(hook) for m in self.layers]
        was_training = model.training
        model.eval()
        predictions = []
        try:
            with torch.no_grad():
                for i in range(0, images.shape[0], batch_size):
                    predictions.append(model(images[i:i + batch_size]).argmax(1).cpu())
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        # The held images' classes before any update: how many keep them afterwards is the report's
        # check that the model did not break elsewhere.
        self.predictions = torch.cat(predictions)
        # Per layer an orthonormal matrix and whether it spans the retained directions U (the
        # gradient loses its part in them: g - g U Uᵀ) or their complement V (g keeps only its
        # part there: g V Vᵀ, the same when [U V] is a full basis). The narrower of the two is
        # kept: deep layers retain most of their directions, and V then halves the work or better.
        # Both live on the layer's support: the input dimensions the retained images ever make
        # non-zero. U has no part outside it, so gradients there pass unchanged, and the products
        # shrink to the support; e.g. a 3x3 convolution on a 1x1 map reads zero padding in 8 of
        # its 9 taps (ResNet-18's last stage at 28x28: its projection 4.4x cheaper, the whole
        # projection 1.5x).
        self.bases: dict[nn.Module, tuple[torch.Tensor | None, torch.Tensor, bool]] = {}
        self.kept: dict[nn.Module, tuple[int, int]] = {}
        for layer in self.layers:
            d = layer.weight[0].numel()
            support = _support(seen[layer])
            # Gathering the support's columns costs more than it saves unless it is much smaller.
            full = support.numel() > SUPPORT_SHARE * d
            vals, vecs = _principal(_restrict(seen[layer], None if full else support))
            if vals.numel() == 0:
                self.kept[layer] = (0, d)
                continue
            share = vals.cumsum(0) / vals.sum().clamp_min(1e-30)
            r = min(int((share < energy).sum()) + 1, vals.numel())
            self._keep(layer, None if full else support, vecs, r)

    @classmethod
    def from_eigenpairs(cls, model: nn.Module, spaces: dict[nn.Module, tuple[torch.Tensor | None, torch.Tensor, int]], *,
                        energy: float, source: str, predictions: torch.Tensor | None = None) -> GradientProjector:
        """A projector from precomputed bases (:mod:`.index`): per layer the support (None: all
        input dimensions), orthonormal directions on it, largest first, and how many to retain.
        Layers missing from ``spaces`` retain nothing: their gradients pass unchanged."""
        self = cls.__new__(cls)
        self.energy, self.source = energy, source
        self.predictions = predictions  # None: agreement() has no predictions to compare with
        self.layers, self.frozen = _layers_and_frozen(model)
        self.bases, self.kept = {}, {}
        for layer in self.layers:
            support, vecs, r = spaces.get(layer, (None, None, 0))
            if vecs is None or r <= 0:
                self.kept[layer] = (0, layer.weight[0].numel())
                continue
            d = layer.weight[0].numel()
            if support is not None and support.numel() > SUPPORT_SHARE * d:
                # As built from images: a support this wide is not worth gathering.
                full = torch.zeros(d, vecs.shape[1], dtype=vecs.dtype, device=vecs.device)
                full[support.to(vecs.device)] = vecs
                support, vecs = None, full
            self._keep(layer, support, vecs, min(r, vecs.shape[1]), complete=True)
        return self

    def _keep(self, layer: nn.Module, support: torch.Tensor | None, vecs: torch.Tensor, r: int,
              complete: bool = False) -> None:
        """Store the first ``r`` of ``vecs`` (or, narrower, their complement) as the layer's basis.
        ``complete``: where ``vecs`` is not a full basis, the complement comes from a QR."""
        n = vecs.shape[0]
        complement = (vecs.shape[1] == n or complete) and r > n // 2
        if complement and vecs.shape[1] < n:
            # The directions orthogonal to the kept ones: the last columns of a complete QR.
            vecs = torch.cat([vecs[:, :r], torch.linalg.qr(vecs[:, :r].double(), mode="complete")[0][:, r:].to(vecs.dtype)], 1)
        m = (vecs[:, r:] if complement else vecs[:, :r]).float()
        support = None if support is None else support.to(m.device)
        if _channels_last(layer.weight):
            support, m = _to_channels_last(layer.weight.shape, support, m)
        self.bases[layer] = (support, m.contiguous(), complement)
        self.kept[layer] = (r, layer.weight[0].numel())

    def agreement(self, model: nn.Module, images: torch.Tensor) -> float:
        """Share of ``images`` (the ones this projector was built from) that ``model`` still
        predicts as they were predicted then."""
        return accuracy(predict(model, images.split(256), images.device), self.predictions)

    def project(self) -> None:
        """In place on ``.grad``: remove each weight gradient's part in the retained subspace."""
        for p in self.frozen:
            p.grad = None
        for layer, (support, m, complement) in self.bases.items():
            g = layer.weight.grad
            if g is None:
                continue
            # A view of the gradient as (out, features) in its own memory order, so that nothing
            # is copied: 3x3 kernels in channels_last would otherwise be copied out and back.
            cl = _channels_last(layer.weight)
            g = g.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
            flat = (g.permute(0, 2, 3, 1) if cl else g).reshape(g.shape[0], -1)
            if support is None:
                flat = (flat @ m) @ m.T if complement else flat - (flat @ m) @ m.T
                g = flat.view(g.permute(0, 2, 3, 1).shape).permute(0, 3, 1, 2) if cl else flat.view(g.shape)
            else:
                sub = flat[:, support]
                flat[:, support] = (sub @ m) @ m.T if complement else sub - (sub @ m) @ m.T
            layer.weight.grad = g

    def summary(self) -> str:
        r = sum(k for k, _ in self.kept.values())
        n = sum(d for _, d in self.kept.values())
        return f"retained subspace: {r} of {n} input dimensions over {len(self.layers)} layers"


def _layers_and_frozen(model: nn.Module) -> tuple[list[nn.Module], list[nn.Parameter]]:
    """The conv/linear layers whose weights are projected, and the parameters held fixed."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    frozen = [p for m in model.modules() if not isinstance(m, (nn.Conv2d, nn.Linear))
              for p in m.parameters(recurse=False)] + [m.bias for m in layers if m.bias is not None]
    return layers, frozen


def _support(seen: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Indices of the input dimensions with any energy in the columns seen."""
    energy = seen.diagonal() if isinstance(seen, torch.Tensor) else sum((c * c).sum(1) for c in seen)
    return (energy > 0).nonzero().flatten()


def _restrict(seen: list[torch.Tensor] | torch.Tensor, support: torch.Tensor | None) -> list[torch.Tensor] | torch.Tensor:
    """The columns or covariance on ``support`` only (None: all dimensions)."""
    if support is None:
        return seen
    if isinstance(seen, torch.Tensor):
        return seen[support][:, support]
    return [c[support] for c in seen]


def _principal(seen: list[torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Energies (descending) and directions of the columns seen: from the covariance, or, for
    fewer columns than features, from their small Gram matrix (``A = U S Vᵀ``: ``U = A V / S``)."""
    if isinstance(seen, torch.Tensor):
        return _eigh(seen.double())
    a = torch.cat(seen, 1).double()
    vals, v = _eigh(a.T @ a)
    keep = vals > vals[0] * 1e-12
    vals, v = vals[keep], v[:, keep]
    return vals, (a @ v) / vals.sqrt()


def _eigh(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric eigendecomposition, largest first. LAPACK can fail to converge on matrices
    with many equal eigenvalues; a jitter far below any energy that matters lets it finish."""
    for jitter in (0.0, 1e-12, 1e-9):
        try:
            vals, vecs = torch.linalg.eigh(m + torch.eye(m.shape[0], dtype=m.dtype, device=m.device) * jitter * m.diagonal().mean())
            return vals.flip(0).clamp_min(0), vecs.flip(1)
        except torch.linalg.LinAlgError:
            continue
    raise torch.linalg.LinAlgError("no eigendecomposition of the retained inputs' covariance")


def _channels_last(w: torch.Tensor) -> bool:
    """A convolution weight stored channels_last with a kernel wider than 1x1, where the
    (out, in·kh·kw) flattening of the features is not a view of memory but (out, kh·kw·in) is."""
    return w.dim() == 4 and w.shape[2] * w.shape[3] > 1 and w.is_contiguous(memory_format=torch.channels_last) \
        and not w.is_contiguous()


def _to_channels_last(shape: torch.Size, support: torch.Tensor | None, m: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The basis (and support) re-indexed from unfold's (in, kh, kw) feature order to the
    (kh, kw, in) order of a channels_last weight's memory."""
    _, cin, kh, kw = shape
    # position in the channels_last order of each feature in unfold's order
    where = torch.arange(cin * kh * kw, device=m.device).view(kh, kw, cin).permute(2, 0, 1).reshape(-1)
    if support is None:
        return None, m[where.argsort()]
    support = where[support]
    order = support.argsort()  # gathers read memory in order
    return support[order], m[order]
