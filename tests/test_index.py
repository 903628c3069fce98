"""The retained-space index: built in batches, equal to the image-built projector, subtractable,
checked against the model it is used with, and read back from its file only when sound."""

from __future__ import annotations

import copy
import json
import struct

import pytest
import torch
from torch import nn

from l2ul_cli.errors import InputError, UsageError
from l2ul_cli.index import (INDEX_KEY, build_index, describe_index, load_index, save_index)
from l2ul_cli.pgu import EXCESS_NOTE
from l2ul_cli.projection import GradientProjector

SHA = "ab" * 32


def _net(width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, width, 3, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, 5)).eval()


def _family(n: int, seed: int) -> torch.Tensor:
    """Images mixed from three fixed patterns: their patches span few of the directions open
    to them, as natural images' do (less starkly)."""
    g = torch.Generator().manual_seed(100)
    patterns = torch.rand((3, 1, 12, 12), generator=g)
    w = torch.rand((n, 3, 1, 1, 1), generator=torch.Generator().manual_seed(seed))
    return (w * patterns).sum(1)


def _odd(n: int, seed: int = 7) -> torch.Tensor:
    return torch.rand((n, 1, 12, 12), generator=torch.Generator().manual_seed(seed))


def _projected_grads(net: nn.Module, projector: GradientProjector, x: torch.Tensor) -> dict[nn.Module, torch.Tensor]:
    net.zero_grad()
    net(x)[:, 0].sum().backward()
    projector.project()
    return {m: m.weight.grad.clone() for m in projector.layers}


def _max_rel_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) for k in a)


def test_index_projector_equals_the_image_built_one():
    net, images = _net(), _family(96, 1)
    index = build_index(net, images.split(10), energy=0.9999, sha256=SHA, source="96 test images")
    assert index.images == 96 and index.sha256 == SHA and list(index.layers) == ["0", "3", "7"]
    for energy in (0.9, 0.999):
        built = GradientProjector(net, images, energy=energy)
        from_index = index.projector(net, energy)
        assert [built.kept[m] for m in built.layers] == [from_index.kept[m] for m in from_index.layers]
        diff = _max_rel_diff(_projected_grads(net, from_index, _odd(3)), _projected_grads(net, built, _odd(3)))
        assert diff < 1e-4


def test_projected_update_changes_indexed_outputs_far_less():
    net, images = _net(), _family(96, 1)
    index = build_index(net, images.split(32), energy=0.9999)
    before = net(images).detach()
    moved = {}
    for projected in (False, True):
        m = copy.deepcopy(net)
        projector = index.projector(m, 0.999) if projected else None
        m.zero_grad()
        m(_odd(4))[:, 0].sum().backward()
        if projector is not None:
            projector.project()
        params = [p for p in m.parameters() if p.grad is not None]
        total = torch.cat([p.grad.flatten() for p in params]).norm()
        with torch.no_grad():
            for p in params:
                p -= 0.5 / total * p.grad  # the same step norm either way
            moved[projected] = float((m(images) - before).abs().mean())
    assert moved[False] > 1e-3
    assert moved[True] < 0.05 * moved[False]


def test_subtracting_images_equals_indexing_without_them():
    net, images = _net(), _family(80, 2)
    forget = torch.cat([images[:5], _odd(3)])  # some far from the family: their own directions go
    everything = torch.cat([images, _odd(3)])
    for energy, tol in ((1.0, 1e-5), (0.9999, 1e-2)):
        full = build_index(net, everything.split(16), energy=energy, sha256=SHA)
        less = full.subtract(net, forget)
        rebuilt = build_index(net, images[5:].split(16), energy=energy)
        assert less.images == 75 and less.forgotten == 8 and less.excess < 1e-6 and less.sha256 == SHA
        for name, space in less.layers.items():
            ref = rebuilt.layers[name]
            assert space.trace == pytest.approx(ref.trace, rel=1e-6)
            assert space.energy_rank(0.99) == ref.energy_rank(0.99)
        diff = _max_rel_diff(_projected_grads(net, less.projector(net, 0.99), _odd(2, 9)),
                             _projected_grads(net, rebuilt.projector(net, 0.99), _odd(2, 9)))
        assert diff < tol


def test_subtracting_images_the_index_never_held_is_flagged():
    net = _net()
    flat = torch.rand((64, 1, 1, 1), generator=torch.Generator().manual_seed(3)).expand(64, 1, 12, 12)
    index = build_index(net, flat.split(32), energy=0.9999)
    assert index.subtract(net, flat[:4]).excess < 1e-6
    assert index.subtract(net, _odd(4)).excess > EXCESS_NOTE  # random images reach directions flat ones do not (seen: 0.11)
    with pytest.raises(InputError, match="cannot subtract 65 images"):
        index.subtract(net, _family(65, 4))


def test_an_index_of_another_model_or_checkpoint_is_refused():
    net = _net()
    index = build_index(net, _family(16, 1).split(8), energy=0.99, sha256=SHA)
    index.check_matches(net, SHA, [])
    with pytest.raises(InputError, match="layer 3 is \\[8, 6, 3, 3\\] in the index, weight \\[10, 6, 3, 3\\]"):
        index.check_matches(_net(width=10), SHA, [])
    with pytest.raises(InputError, match="has no layer 8"):
        index.check_matches(nn.Sequential(*_net(), nn.Linear(5, 2)), SHA, [])
    other = "cd" * 32
    with pytest.raises(InputError, match="neither it nor, by its ledger, made from it"):
        index.check_matches(net, other, [{"input_sha256": "ef" * 32}])
    # Made from the indexed checkpoint by l2ul requests: accepted; changed outside l2ul since: not.
    index.check_matches(net, other, [{"input_sha256": SHA}, {"input_sha256": "12" * 32}])
    with pytest.raises(InputError, match="made from it"):
        index.check_matches(net, other, [{"input_sha256": SHA}, {"input_sha256": "12" * 32, "new_segment": "changed"}])
    with pytest.raises(UsageError, match="energy 0.99"):
        index.projector(net, 0.999)


def test_index_file_round_trips_with_fp16_vectors(tmp_path):
    from safetensors import safe_open

    net, images = _net(), _family(48, 5)
    index = build_index(net, images.split(16), energy=0.9999, sha256=SHA, source="48 --retain images")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    sha = save_index(a, index)
    assert save_index(b, index) == sha  # the same index, the same bytes
    with safe_open(str(a), framework="pt") as f:
        assert f.get_tensor("layers.0.vectors").dtype == torch.float16
        meta = json.loads(f.metadata()[INDEX_KEY])
    assert meta["images"] == 48 and meta["source"] == "48 --retain images" and meta["energy"] == 0.9999
    assert [e["name"] for e in meta["layers"]] == ["0", "3", "7"] and meta["sha256"] == SHA
    back = load_index(a)
    assert (back.images, back.source, back.energy, back.sha256) == (48, "48 --retain images", 0.9999, SHA)
    for name, space in back.layers.items():
        assert torch.equal(space.values, index.layers[name].values)
        assert space.vectors.shape == index.layers[name].vectors.shape
    diff = _max_rel_diff(_projected_grads(net, back.projector(net, 0.99), _odd(2)),
                         _projected_grads(net, index.projector(net, 0.99), _odd(2)))
    assert diff < 1e-2  # fp16 rounding of the directions (seen: 3e-3)
    info = describe_index(a)
    assert info["images"] == 48 and info["layers"] == 3 and info["sha256"] == sha and info["checkpoint_sha256"] == SHA
    assert 0 < info["directions"] <= info["dimensions"]


def _rewrite(path, tensors=None, meta=None, raw=None):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={INDEX_KEY: raw if raw is not None else json.dumps(meta)})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from safetensors.torch import load_file
    from safetensors import safe_open

    path = tmp_path_factory.mktemp("index") / "good.safetensors"
    save_index(path, build_index(_net(), _family(24, 6).split(8), energy=0.999, sha256=SHA))
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[INDEX_KEY])
    return load_file(str(path)), meta


@pytest.mark.parametrize("change, message", [
    (lambda t, m: ("{not json", t), "not valid JSON"),
    (lambda t, m: ([1, 2], t), "must be an object"),
    (lambda t, m: ({**m, "version": 99}, t), "'version' is 99"),
    (lambda t, m: ({**m, "images": -1}, t), "'images' must be a whole number"),
    (lambda t, m: ({**m, "energy": 1.5}, t), "'energy' must be a number in"),
    (lambda t, m: ({**m, "sha256": "../../etc"}, t), "'sha256' must be a SHA-256"),
    (lambda t, m: ({**m, "source": "x" * 2000}, t), "'source' must be a string"),
    (lambda t, m: ({**m, "layers": "all"}, t), "'layers' must be a list"),
    (lambda t, m: ({**m, "layers": [{**m["layers"][0], "shape": [0, 1]}, *m["layers"][1:]]}, t), "layers\\[0\\]"),
    (lambda t, m: ({**m, "layers": [m["layers"][0], m["layers"][0]]}, t), "repeats layer 0"),
    (lambda t, m: (m, {k: v for k, v in t.items() if k != "layers.1.values"}), "values or vectors missing"),
    (lambda t, m: (m, {**t, "layers.0.values": torch.full_like(t["layers.0.values"], float("nan"))}), "finite fp64"),
    (lambda t, m: (m, {**t, "layers.0.values": t["layers.0.values"].float()}), "finite fp64"),
    (lambda t, m: (m, {**t, "layers.0.vectors": torch.ones(9, 12, dtype=torch.float16)}), "at most 9 columns"),
    (lambda t, m: (m, {**t, "layers.0.vectors": 3 * t["layers.0.vectors"]}), "not unit directions"),
    (lambda t, m: (m, {**t, "layers.0.support": torch.tensor([5, 2, 40])}), "increasing int64 indices below 9"),
])
def test_untrusted_index_metadata_gives_a_clean_error(tmp_path, saved, change, message):
    tensors, meta = saved
    new_meta, new_tensors = change(dict(tensors), json.loads(json.dumps(meta)))
    path = tmp_path / "bad.safetensors"
    _rewrite(path, new_tensors, raw=new_meta if isinstance(new_meta, str) else json.dumps(new_meta))
    with pytest.raises(InputError, match=message):
        load_index(path)


def test_unreadable_index_files_give_a_clean_error(tmp_path, saved):
    tensors, _ = saved
    with pytest.raises(InputError, match="not found"):
        load_index(tmp_path / "missing.safetensors")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(InputError, match="not a readable index file"):
        load_index(truncated)
    plain = tmp_path / "checkpoint.safetensors"
    from safetensors.torch import save_file
    save_file(tensors, str(plain))
    with pytest.raises(InputError, match="not an l2ul index"):
        load_index(plain)
    deep = tmp_path / "deep.safetensors"
    _rewrite(deep, tensors, raw="[" * 100 + "]" * 100)
    with pytest.raises(InputError, match="nested"):
        load_index(deep)


def test_using_an_index_on_a_model_without_its_layers_is_a_clean_error():
    index = build_index(_net(), _family(8, 1).split(8), energy=0.99)
    other = nn.Sequential(nn.Conv2d(1, 6, 3), nn.Flatten())
    for use in (lambda: index.projector(other), lambda: index.subtract(other, _family(2, 2))):
        with pytest.raises(InputError, match="has no layer 3"):
            use()
