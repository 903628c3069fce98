"""Can a layer's own weights stand in for its retained inputs? (issue 26: data-free retention
for networks without BatchNorm)

For every layer of an index built from real images (``l2ul index --retain``), the share of the
real inputs' energy that falls outside a subspace of the rank the index keeps at ``--energy``
(capped at the weight matrix's rank): the index's own directions (1 − energy uncapped), the top
right-singular directions of the layer's weight matrix, and a random subspace (1 − rank /
dimensions in expectation). A projection onto the weights' complement leaks that share of every
update into the retained images' outputs.

    python benchmarks/weight_space.py MODEL.safetensors MODEL.train-index.safetensors
"""

from __future__ import annotations

import argparse

import torch

from l2ul_cli.index import load_index
from l2ul_cli.models import load_model


def leaks(model: torch.nn.Module, index, energy: float) -> list[tuple[str, int, int, float, float, float]]:
    """(layer, dimensions, rank, leak of the index's own top directions, of the weights' top
    directions, and of a random subspace); the rank is the index's at ``energy``, capped at the
    weight matrix's own."""
    modules = dict(model.named_modules())
    rows = []
    for name, space in index.layers.items():
        w = modules[name].weight.detach().double().reshape(modules[name].weight.shape[0], -1)
        if space.support is not None:
            w = w[:, space.support]
        cov = space.covariance()
        # No more directions than the weights span: past their rank the singular vectors are arbitrary.
        r = min(space.energy_rank(energy), int(torch.linalg.matrix_rank(w)))
        q = torch.linalg.svd(w, full_matrices=False)[2].T[:, :r]
        kept = float((q.T @ cov @ q).diagonal().sum()) / space.trace
        own = float(space.values[:r].sum()) / space.trace  # the index's own best r directions
        rows.append((name, cov.shape[0], r, 1 - own, 1 - kept, 1 - r / cov.shape[0]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("index")
    ap.add_argument("--energy", type=float, default=0.995, help="the default method's retain energy")
    args = ap.parse_args()
    rows = leaks(load_model(args.model).model, load_index(args.index), args.energy)
    print("| layer | dims | rank | leak: index | weights | random |\n|---|---|---|---|---|---|")
    for name, n, r, li, lw, lr in rows:
        print(f"| {name} | {n} | {r} | {li:.3f} | {lw:.3f} | {lr:.3f} |")
    mean = lambda i: sum(row[i] for row in rows) / len(rows)  # noqa: E731
    print(f"| mean of {len(rows)} layers | | | {mean(3):.3f} | {mean(4):.3f} | {mean(5):.3f} |")


if __name__ == "__main__":
    main()
