"""Smoke runs of the benchmark scripts (tiny model, k, steps): they run end to end and print
their tables. The real figures come from running them in full (benchmarks/RESULTS.md)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

from l2ul_cli.datasets import fashion_mnist_root

ROOT = Path(__file__).parent.parent
BENCH = ROOT / "benchmarks"
needs_fmnist = pytest.mark.skipif(not (fashion_mnist_root() / "t10k-labels-idx1-ubyte.gz").exists(),
                                  reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
TINY = ["--device", "cpu", "--arch", "test_resnet", "--epochs", "1", "--train-subset", "1024", "--no-write"]


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory) -> Path:
    """One cache for the smokes: the tiny model is trained once (same recipe, same key), not per script."""
    return tmp_path_factory.mktemp("bench-cache")


def _forget_benchmark_modules() -> None:
    # common.py reads L2UL_BENCH_CACHE when imported: each run imports the scripts' modules afresh.
    for name, mod in list(sys.modules.items()):
        if str(getattr(mod, "__file__", None) or "").startswith(str(BENCH)):
            del sys.modules[name]


@pytest.fixture
def script(monkeypatch, capsys):
    """Runs ``python benchmarks/SCRIPT ARGS`` in this process and returns its stdout. In-process
    because a fresh interpreter spends 5-6 s importing torch, torchvision and timm per smoke."""
    def run(name: str, *args: str, cache: Path | None = None) -> str:
        if cache is not None:
            monkeypatch.setenv("L2UL_BENCH_CACHE", str(cache))
        monkeypatch.setenv("L2UL_BENCH_EVAL_IMAGES", "1500")
        monkeypatch.setattr(sys, "argv", [str(BENCH / name), *args])
        monkeypatch.setattr(sys, "path", list(sys.path))  # the scripts put benchmarks/ first
        _forget_benchmark_modules()
        try:
            runpy.run_path(str(BENCH / name), run_name="__main__")
        except SystemExit as exc:
            assert not exc.code, capsys.readouterr().err[-3000:]
        finally:
            _forget_benchmark_modules()
            torch.set_num_threads(1)  # as conftest.py set it; two scripts set their own
        return capsys.readouterr().out
    return run


def _run(script, name: str, *args: str, cache: Path) -> str:
    return script(name, *TINY, *args, cache=cache)


@needs_fmnist
def test_quality_benchmark_smoke(script, bench_cache):
    out = _run(script, "quality.py", "--ks", "2", "--seeds", "1", "--n-adv", "2", "--attack-steps", "3",
               "--forget-methods", "neggrad", "l2ul", "--relabel-methods", "l2ul", "--continual-total", "16",
               "--set", "synthetic_retain=16", "synthetic_steps=3", cache=bench_cache)
    assert "| BEFORE |" in out and "| l2ul | 2 |" in out and "oracle (uses D_r)" in out
    assert "continual" in out and "passed with --keep" in out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| l2ul | 8 |") or line.startswith("| l2ul | 16 |")]
    assert [r[1] for r in rows][-2:] == ["8", "16"]
    assert [r[-3].strip(" |") for r in rows][-2:] == ["1", "2"]  # one ledger entry per request
    # Wall seconds per phase (attack / importance / stand-ins / updates), in every row of l2ul.
    for r in rows[-2:] + [line.split(" | ") for line in out.splitlines() if line.startswith("| l2ul | 2 |")]:
        assert len([float(v) for v in r[-1].strip(" |").split(" / ")]) == 4


@needs_fmnist
def test_speed_benchmark_smoke(script, bench_cache):
    out = _run(script, "speed.py", "--ks", "2", "--n-adv", "2", "--attack-steps", "3", "--max-steps", "3", "--reference-copies", "3",
               "--set", "synthetic_retain=16", "synthetic_steps=3", "--attack-variants", "fp32", "bf16", cache=bench_cache)
    assert "image-passes/s" in out and "reference-style" in out and "stand-ins s" in out and "D_test after" in out
    assert "timed on its first 3 copies and scaled to all" in out
    assert "| eager fp32 |" in out and "| eager bf16 autocast |" in out


@needs_fmnist
def test_variants_script_smoke(script):
    out = script("variants.py", str(ROOT / "examples" / "fashion-mnist-lcnet_050.safetensors"),
                 "synthetic_steps=2", "method=adv,lr=1e-4", "eps_at_28x28=0.5,shift_copies=2,synthetic_retain=0",
                 "real_retain=1,synthetic_retain=0", "--k", "2", "--n-adv", "2", "--attack-steps", "2", "--retain", "50")
    rows = [line for line in out.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| synthetic_steps=2", "| method=adv,lr=1e-4",
                                                     "| eps_at_28x28=0.5,shift_copies=2,synthetic_retain=0",
                                                     "| real_retain=1,synthetic_retain=0"]
    assert all(" met " in row or "NOT met" in row or "diverged" in row for row in rows)


@needs_fmnist
def test_collateral_script_smoke(script):
    out = script("collateral.py", str(ROOT / "examples" / "fashion-mnist-lcnet_050.safetensors"),
                 "--k", "4", "--n-adv", "2", "--attack-steps", "2", "--synthetic-retain", "0", "--max-steps", "20",
                 "--test-subset", "300", "--threads", "1")
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    classes = rows[1:11]
    assert len(classes) == 10 and sum(int(row[1]) for row in classes) == 4  # every forget image in its class row
    assert rows[-2][0] == "| right -> wrong" and rows[-1][0] == "| all right before"


@needs_fmnist
def test_reference_benchmark_smoke(script, bench_cache):
    out = _run(script, "reference.py", "--ks", "2", "--seeds", "2", "--n-adv", "2", "--attack-steps", "3",
               "--methods", "neggrad", "adv+imp[bn=eval]", cache=bench_cache)
    assert "| BEFORE |" in out and "official D_test" in out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith(("| neggrad | 2 |", "| adv+imp[bn=eval] | 2 |"))]
    assert len(rows) == 2 and all(r[8].count("/") == 1 for r in rows)  # goal met n/2, with the spread over 2 seeds
    assert all("±" in r[3] for r in rows)


@needs_fmnist
def test_index_benchmark_smoke(script, bench_cache):
    out = _run(script, "index.py", "--ks", "2", "--seeds", "1", "--train-images", "64", "--stand-ins", "16", "--holdout", "50",
               "--quick", cache=bench_cache)
    assert "Index builds (one-off)" in out and "16 stand-in images from BatchNorm statistics" in out
    names = ["l2ul, stand-ins (no index)", "l2ul, index of 16 stand-ins", "l2ul, index of 64 training images",
             "pgu (its stop rule, --holdout)", "pgu, --pgu-stop goal"]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.splitlines() if line.startswith("| ")}
    assert all(n in rows for n in names) and rows[names[0]][9] == "1.00×"


@needs_fmnist
def test_gold_benchmark_smoke(script, bench_cache):
    ltu = "ltu:misclassify:retain_fraction=0.05"  # given the remaining training images as --retain
    out = _run(script, "gold.py", "--ks", "2", "--seeds", "2", "--quick", "--variants", "l2ul:misclassify",
               "l2ul:indistinguishable", ltu, cache=bench_cache)
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line.split("|") for line in out.splitlines()
            if line.startswith("| ") and "---" not in line and "variant" not in line}
    names = ["retrained", "original", "l2ul:misclassify", "l2ul:indistinguishable", ltu]
    assert all((n, "2") in rows for n in names)
    assert rows[("retrained", "2")][9].strip() == "0.00 ± 0.00"  # its own gap
    assert all(float(rows[(n, "2")][9].split("±")[0]) >= 0 for n in names)
    assert len(list(bench_cache.glob("fmnist-test_resnet-wo*.safetensors"))) == 2  # one retrained model per draw


def test_weight_space_leak_is_none_for_weights_on_the_inputs_and_large_for_random_ones(monkeypatch):
    """benchmarks/weight_space.py: weights whose rows span the inputs' subspace leave none of the
    inputs' energy outside their top directions; random weights leave about 1 - rank / dims."""
    monkeypatch.syspath_prepend(str(BENCH))
    from weight_space import leaks

    from l2ul_cli.index import build_index

    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 4, generator=g))[0]  # inputs in a 4-dimensional subspace
    x = torch.randn(256, 4, generator=g) @ basis.T
    aligned, scrambled = torch.nn.Linear(32, 8), torch.nn.Linear(32, 8)
    with torch.no_grad():
        aligned.weight.copy_(torch.randn(8, 4, generator=g) @ basis.T)
        scrambled.weight.copy_(torch.randn(8, 32, generator=g))
    for net, lo, hi in ((aligned, -1e-5, 1e-5), (scrambled, 0.5, 1.0)):  # the index stores fp16 vectors
        index = build_index(net, [x], energy=0.9999)
        (_, dims, rank, own, leak, random_leak), = leaks(net, index, 0.9999)
        assert (dims, rank) == (32, 4) and random_leak == 1 - 4 / 32 and abs(own) < 1e-5
        assert lo <= leak <= hi  # random: about 0.875


@needs_fmnist
def test_speed224_benchmark_smoke(script):
    out = script("speed224.py", "--device", "cpu", "--arch", "test_resnet", "--size", "32", "--k", "2", "--max-steps", "2",
                 "--update-steps", "10", "--no-write")
    rows = {line.split(" | ")[0].strip("| *"): line for line in out.splitlines() if line.startswith("| ")}
    assert {"attack", "importance", "synthesis", "updates", "total"} <= set(rows)
    assert "per step (2)" in rows["updates"] and "scaled to the default's" in out
