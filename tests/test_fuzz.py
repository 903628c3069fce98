"""Fuzzing the untrusted inputs (issue 30): checkpoint metadata and manifest contents.

Whatever they hold, every command ends with a known exit code, never an internal error, and no
input file changes. Bounded: a few dozen examples, each one CLI call on the tiny digits model.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from l2ul_cli.checkpoint import META_KEY
from l2ul_cli.cli import app

FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
KNOWN_EXITS = {0, 1, 2, 3, 4}  # 4: the health check refused a damaged model

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                          max_leaves=12)
number = st.one_of(st.integers(-5, 5000), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3), st.none())
preprocessing = st.fixed_dictionaries({}, optional={
    "input_size": st.one_of(st.lists(number, max_size=4), st.just([1, 16, 16]), json_value),
    "mean": st.one_of(st.lists(number, max_size=4), st.just([0.5]), json_value),
    "std": st.one_of(st.lists(number, max_size=4), st.just([0.5]), json_value),
    "crop_pct": st.one_of(number, st.just(1.0)),
    "interpolation": st.one_of(st.sampled_from(["bilinear", "bicubic", "box"]), json_value),
})
ledger_entry = st.fixed_dictionaries({}, optional={k: json_value for k in (
    "request_id", "command", "before", "after", "input_sha256", "output_weights_sha256", "new_segment", "n_images")})
metadata = st.one_of(
    st.fixed_dictionaries({}, optional={
        "arch": st.one_of(st.sampled_from(["test_resnet", "torchvision:nope", "no_such_net"]), json_value),
        "class_names": st.one_of(st.lists(st.text(max_size=6), max_size=12), json_value),
        "preprocessing": st.one_of(preprocessing, json_value),
        "ledger": st.one_of(st.lists(st.one_of(ledger_entry, json_value), max_size=3), json_value),
        "num_classes": json_value,
    }).map(json.dumps),
    json_value.map(json.dumps),
    st.text(max_size=40),  # not JSON at all
)
cell = st.one_of(st.sampled_from(["IMG", "IMG", "missing.png", "..", "/", "x" * 300, "a\x00b", "three", "3", "-1", "99", ""]),
                 st.text(max_size=10))
manifest = st.tuples(st.sampled_from(["path,label", "path", "path,new_label", "label,path", "", "path,label,extra"]),
                     st.lists(st.lists(cell, min_size=0, max_size=3), max_size=5))


def _fingerprint(paths) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def _check(result) -> None:
    assert result.exit_code in KNOWN_EXITS, (result.exit_code, result.output)
    assert "internal error" not in result.output, result.output
    assert "Traceback" not in result.output


def _tensors(ckpt: Path):
    with safe_open(str(ckpt), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@FUZZ
@given(meta=metadata)
def test_fuzzed_metadata_gives_known_exits(digits_checkpoint, forget_dir, meta):
    tensors = _tensors(digits_checkpoint)
    images = sorted(forget_dir.rglob("*.png"))
    with tempfile.TemporaryDirectory() as tmp:
        ck = Path(tmp) / "m.safetensors"
        save_file(tensors, str(ck), metadata={"format": "pt", META_KEY: meta})
        before = _fingerprint([ck, *images])
        for args in (["info", ck], ["history", ck], ["eval", ck, "--images", forget_dir, "--device", "cpu", "-q"]):
            _check(CliRunner().invoke(app, [str(a) for a in args]))
        assert _fingerprint([ck, *images]) == before
        assert sorted(Path(tmp).iterdir()) == [ck]  # nothing written beside it


@FUZZ
@given(content=manifest)
def test_fuzzed_manifest_gives_known_exits(digits_checkpoint, forget_dir, content):
    images = sorted(forget_dir.rglob("*.png"))
    header, rows = content
    with tempfile.TemporaryDirectory() as tmp:
        m = Path(tmp) / "m.csv"
        lines = [header] + [",".join(str(images[i % len(images)]) if c == "IMG" else c for c in row)
                            for i, row in enumerate(rows)]
        m.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
        before = _fingerprint([digits_checkpoint, m, *images])
        for cmd in ("eval", "relabel"):
            args = [cmd, digits_checkpoint, "--manifest", m, "--device", "cpu", "-q"]
            if cmd == "relabel":  # a quick request, when the manifest is valid at all
                args += ["--out", Path(tmp) / "o.safetensors", "--n-adv", "2", "--attack-steps", "2",
                         "--synthetic-retain", "0", "--max-steps", "2", "--shift-copies", "0", "--mix-copies", "0"]
            _check(CliRunner().invoke(app, [str(a) for a in args]))
        assert _fingerprint([digits_checkpoint, m, *images]) == before
