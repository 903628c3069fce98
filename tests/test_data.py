"""Unit tests of l2ul_cli.data: folder scanning, CSV manifests and image decoding."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from l2ul_cli.data import IMG_EXTENSIONS, Sample, load_image, load_images, outside_note, read_manifest, scan_folder
from l2ul_cli.errors import InputError
from l2ul_cli.models import Preprocessing




NAMES = ["cat", "dog", "bird"]


def _png(path: Path, value: int = 128, size=(4, 4), mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


# --------------------------------------------------------------------------- folders


def test_imagefolder_layout_with_class_names(tmp_path):
    _png(tmp_path / "dog" / "d1.png")
    _png(tmp_path / "dog" / "nested" / "d2.jpg", mode="RGB", value=(1, 2, 3))
    _png(tmp_path / "cat" / "c1.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "cat" / ".hidden.png").write_bytes(b"resource fork")
    samples = scan_folder(tmp_path, NAMES, 3)
    got = [(s.path.relative_to(tmp_path).as_posix(), s.label, s.new_label) for s in samples]
    assert got == [("cat/c1.png", 0, None), ("dog/d1.png", 1, None), ("dog/nested/d2.jpg", 1, None)]
    assert all(s.source for s in samples)


def test_class_folders_by_index_when_model_has_no_names(tmp_path):
    _png(tmp_path / "4" / "a.png")
    samples = scan_folder(tmp_path, None, 10)
    assert [s.label for s in samples] == [4]  # not 0, as torchvision's ImageFolder would say


def test_index_folder_works_beside_names(tmp_path):
    _png(tmp_path / "2" / "a.png")
    _png(tmp_path / "cat" / "b.png")
    assert [s.label for s in scan_folder(tmp_path, NAMES, 3)] == [2, 0]


def test_unknown_class_folder_is_input_error_naming_it(tmp_path):
    _png(tmp_path / "cat" / "a.png")
    _png(tmp_path / "zebra" / "b.png")
    with pytest.raises(InputError, match="zebra"):
        scan_folder(tmp_path, NAMES, 3)


def test_out_of_range_index_folder_is_input_error(tmp_path):
    _png(tmp_path / "12" / "a.png")
    with pytest.raises(InputError, match="out of range"):
        scan_folder(tmp_path, None, 10)


def test_empty_class_folders_are_ignored(tmp_path):
    (tmp_path / "zebra").mkdir()  # no images: not a class, not an error
    _png(tmp_path / "cat" / "a.png")
    assert [s.label for s in scan_folder(tmp_path, NAMES, 3)] == [0]


def test_flat_folder_has_no_labels(tmp_path):
    for n in ("b.png", "a.jpg", "c.bmp"):
        _png(tmp_path / n, mode="RGB", value=(9, 9, 9))
    (tmp_path / "readme.txt").write_text("x")
    samples = scan_folder(tmp_path, NAMES, 3)
    assert [s.path.name for s in samples] == ["a.jpg", "b.png", "c.bmp"]
    assert all(s.label is None and s.new_label is None for s in samples)


def test_hidden_files_are_skipped_in_both_layouts(tmp_path):
    # macOS leaves "._name.png" AppleDouble files beside copies; they are not images
    flat = tmp_path / "flat"
    _png(flat / "a.png")
    (flat / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    assert [s.path.name for s in scan_folder(flat, None, 2)] == ["a.png"]
    nested = tmp_path / "nested"
    _png(nested / "1" / "a.png")
    (nested / "1" / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    _png(nested / ".thumbs" / "t.png")
    assert [(s.label, s.path.name) for s in scan_folder(nested, None, 2)] == [(1, "a.png")]


def test_extension_match_is_case_insensitive(tmp_path):
    _png(tmp_path / "A.PNG")
    _png(tmp_path / "b.JpEg", mode="RGB", value=(0, 0, 0))
    assert [s.path.name for s in scan_folder(tmp_path, None, 2)] == ["A.PNG", "b.JpEg"]


def test_mixed_layout_is_error(tmp_path):
    _png(tmp_path / "top.png")
    _png(tmp_path / "cat" / "a.png")
    with pytest.raises(InputError, match="mixes"):
        scan_folder(tmp_path, NAMES, 3)


@pytest.mark.parametrize("content", ["empty", "text-only"])
def test_folder_without_images_lists_supported_extensions(tmp_path, content):
    if content == "text-only":
        (tmp_path / "a.txt").write_text("a")
        (tmp_path / "sub").mkdir()
        (tmp_path / "sub" / "b.txt").write_text("b")
    with pytest.raises(InputError) as info:
        scan_folder(tmp_path, None, 10)
    msg = info.value.message
    assert "no images" in msg
    for ext in (".png", ".jpg", ".jpeg", ".webp"):
        assert ext in msg


def test_missing_folder_and_file_instead_of_folder(tmp_path):
    with pytest.raises(InputError, match="not found"):
        scan_folder(tmp_path / "nope", None, 10)
    f = _png(tmp_path / "x.png")
    with pytest.raises(InputError, match="not a folder"):
        scan_folder(f, None, 10)


def test_natural_sort_order(tmp_path):
    for n in ("img10.png", "img2.png", "img1.png", "IMG3.png", "img2b.png"):
        _png(tmp_path / n)
    assert [s.path.name for s in scan_folder(tmp_path, None, 2)] == [
        "img1.png", "img2.png", "img2b.png", "IMG3.png", "img10.png",
    ]
    sub = tmp_path.parent / (tmp_path.name + "-classes")
    for c in ("10", "2", "1"):
        for n in ("x10.png", "x9.png"):
            _png(sub / c / n)
    got = [(s.label, s.path.name) for s in scan_folder(sub, None, 11)]
    assert got == [(1, "x9.png"), (1, "x10.png"), (2, "x9.png"), (2, "x10.png"), (10, "x9.png"), (10, "x10.png")]


# --------------------------------------------------------------------------- manifests


@pytest.fixture()
def images(tmp_path) -> Path:
    root = tmp_path / "m"
    for n in ("a.png", "b.png", "c.png"):
        _png(root / "imgs" / n)
    return root


def _manifest(root: Path, text: str | bytes, name: str = "fixes.csv") -> Path:
    p = root / name
    if isinstance(text, str):
        p.write_text(text, encoding="utf-8", newline="")
    else:
        p.write_bytes(text)
    return p


def test_manifest_basic_with_names_and_indices(images):
    m = _manifest(images, "path,label,new_label\nimgs/a.png,cat,dog\nimgs/b.png,2,0\nimgs/c.png,,bird\n")
    samples = read_manifest(m, NAMES, 3, require_new_label=True)
    assert [(s.path, s.label, s.new_label) for s in samples] == [
        (images / "imgs" / "a.png", 0, 1),
        (images / "imgs" / "b.png", 2, 0),
        (images / "imgs" / "c.png", None, 2),
    ]
    assert samples[0].source == f"{m}:2"


def test_manifest_bom_blank_lines_and_crlf(images):
    text = "\ufeff\r\npath , new_label\r\n\r\nimgs/a.png,1\r\n  \r\nimgs/b.png,2\r\n\r\n"
    m = _manifest(images, text.encode("utf-8"))
    samples = read_manifest(m, None, 3, require_new_label=True)
    assert [(s.path.name, s.new_label) for s in samples] == [("a.png", 1), ("b.png", 2)]
    assert [s.source.rsplit(":", 1)[1] for s in samples] == ["4", "6"]  # physical line numbers


def test_manifest_relative_paths_resolve_against_its_folder(images, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    absolute = images / "imgs" / "c.png"
    m = _manifest(images, f"path,new_label\nimgs/a.png,1\n./imgs/b.png,1\n{absolute},1\n")
    samples = read_manifest(m, None, 3, require_new_label=True)
    assert [s.path for s in samples] == [images / "imgs" / "a.png", images / "imgs" / "b.png", absolute]
    assert all(s.path.is_file() for s in samples)


def test_manifest_paths_outside_its_folder_are_allowed_and_flagged(images, tmp_path):
    sub = images / "lists"
    sub.mkdir()
    (sub / "here.png").write_bytes((images / "imgs" / "a.png").read_bytes())
    absolute = images / "imgs" / "c.png"
    m = _manifest(sub, f"path,new_label\nhere.png,1\n../imgs/b.png,1\n{absolute},2\n")
    samples = read_manifest(m, None, 3, require_new_label=True)
    assert [s.outside for s in samples] == [False, True, True]
    note = outside_note(samples)
    assert note.startswith("2 manifest path(s) lead outside") and f"{m}:3" in note and f"{m}:4" in note
    assert outside_note(samples[:1]) is None


def test_manifest_label_column_is_optional(images):
    m = _manifest(images, "new_label,path\n1,imgs/a.png\n")
    (s,) = read_manifest(m, None, 3, require_new_label=True)
    assert s.label is None and s.new_label == 1 and s.path.name == "a.png"


def test_manifest_for_forget_needs_only_path(images):
    m = _manifest(images, "path,label\nimgs/a.png,dog\nimgs/b.png,\n")
    samples = read_manifest(m, NAMES, 3, require_new_label=False)
    assert [(s.label, s.new_label) for s in samples] == [(1, None), (None, None)]


def test_manifest_missing_column_names_file_and_line(images):
    m = _manifest(images, "\npath,label\nimgs/a.png,1\n")
    with pytest.raises(InputError) as info:
        read_manifest(m, None, 3, require_new_label=True)
    assert f"{m}:2:" in info.value.message and "new_label" in info.value.message
    m2 = _manifest(images, "file,new_label\nimgs/a.png,1\n", "nopath.csv")
    with pytest.raises(InputError, match=r"nopath\.csv:1: missing column 'path'"):
        read_manifest(m2, None, 3, require_new_label=True)


@pytest.mark.parametrize("second", ["imgs/a.png", "./imgs/a.png", "imgs//a.png"])
def test_manifest_duplicate_rows_are_error(images, second):
    m = _manifest(images, f"path,new_label\nimgs/a.png,1\n{second},2\n")
    with pytest.raises(InputError, match=r"fixes\.csv:3: duplicate of line 2"):
        read_manifest(m, None, 3, require_new_label=True)


@pytest.mark.parametrize("row", ["imgs/a.png,1,extra", "imgs/a.png"])
def test_manifest_wrong_field_count(images, row):
    m = _manifest(images, f"path,new_label\n{row}\n")
    with pytest.raises(InputError, match=r"fixes\.csv:2: expected 2 fields"):
        read_manifest(m, None, 3, require_new_label=True)


def test_manifest_non_utf8_is_input_error(images):
    m = _manifest(images, b"path,new_label\nimgs/\xe9t\xe9.png,1\n")
    with pytest.raises(InputError, match="UTF-8"):
        read_manifest(m, None, 3, require_new_label=True)


@pytest.mark.parametrize("value", ["3", "-1", "99"])
def test_manifest_label_out_of_range(images, value):
    m = _manifest(images, f"path,label,new_label\nimgs/a.png,{value},1\n")
    with pytest.raises(InputError, match=r"fixes\.csv:2: label index -?\d+ is out of range"):
        read_manifest(m, None, 3, require_new_label=True)
    m = _manifest(images, f"path,new_label\nimgs/a.png,{value}\n")
    with pytest.raises(InputError, match="out of range"):
        read_manifest(m, None, 3, require_new_label=True)


def test_manifest_unknown_class_name(images):
    m = _manifest(images, "path,new_label\nimgs/a.png,zebra\n")
    with pytest.raises(InputError, match="unknown class 'zebra'.*cat"):
        read_manifest(m, NAMES, 3, require_new_label=True)


@pytest.mark.parametrize("label,new", [("1", "1"), ("dog", "1"), ("1", "dog"), ("dog", "dog")])
def test_manifest_new_label_equal_to_label(images, label, new):
    m = _manifest(images, f"path,label,new_label\nimgs/a.png,{label},{new}\n")
    with pytest.raises(InputError, match=r"fixes\.csv:2: new_label equals the current label"):
        read_manifest(m, NAMES, 3, require_new_label=True)


def test_manifest_other_errors(images, tmp_path):
    with pytest.raises(InputError, match="manifest not found"):
        read_manifest(tmp_path / "nope.csv", None, 3, require_new_label=True)
    with pytest.raises(InputError, match="empty manifest"):
        read_manifest(_manifest(images, "\n\n", "blank.csv"), None, 3, require_new_label=True)
    with pytest.raises(InputError, match="lists no images"):
        read_manifest(_manifest(images, "path,new_label\n\n", "header.csv"), None, 3, require_new_label=True)
    with pytest.raises(InputError, match=r"image not found: imgs/zz\.png"):
        read_manifest(_manifest(images, "path,new_label\nimgs/zz.png,1\n", "gone.csv"), None, 3, require_new_label=True)
    with pytest.raises(InputError, match="empty new_label"):
        read_manifest(_manifest(images, "path,new_label\nimgs/a.png, \n", "nonew.csv"), None, 3, require_new_label=True)
    with pytest.raises(InputError, match="empty path"):
        read_manifest(_manifest(images, "path,new_label\n ,1\n", "nopath.csv"), None, 3, require_new_label=True)


# Awkward but legal file names: spaces, commas and quotes must survive CSV quoting.
POOL = ["plain.png", "with space.png", "comma,name.png", 'quo"te.png', "ünï.png", "x10.png", "x9.png", "deep/er.png"]
CLASSES = ["zero", "one", "two", "three", "four"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pool")
    for n in POOL:
        _png(root / n)
    return root


def _label_text(index: int, as_name: bool) -> str:
    return CLASSES[index] if as_name else str(index)


_row = st.tuples(
    st.integers(0, len(CLASSES) - 1),  # new label
    st.one_of(st.none(), st.integers(1, len(CLASSES) - 1)),  # label offset from new (never equal)
    st.booleans(),  # labels as names
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    picks=st.lists(st.sampled_from(POOL), min_size=1, max_size=len(POOL), unique=True),
    data=st.data(),
    with_label=st.booleans(),
    bom=st.booleans(),
)
def test_manifest_round_trip_property(pool, picks, data, with_label, bom):
    rows = [data.draw(_row) for _ in picks]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label", "new_label"] if with_label else ["path", "new_label"])
    expected = []
    for name, (new, offset, as_name) in zip(picks, rows):
        label = None if (offset is None or not with_label) else (new + offset) % len(CLASSES)
        cells = [name]
        if with_label:
            cells.append("" if label is None else _label_text(label, as_name))
        cells.append(_label_text(new, as_name))
        writer.writerow(cells)
        expected.append((pool / name, label, new))
    m = pool / "manifest.csv"
    m.write_bytes((("\ufeff" if bom else "") + buf.getvalue()).encode("utf-8"))
    samples = read_manifest(m, CLASSES, len(CLASSES), require_new_label=True)
    assert [(s.path, s.label, s.new_label) for s in samples] == expected


# --------------------------------------------------------------------------- decoding

RGB = Preprocessing((3, 8, 8), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1.0, "bilinear")
GREY = Preprocessing((1, 8, 8), (0.5,), (0.5,), 1.0, "bilinear")


def _check(t: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    assert t.dtype == torch.float32
    assert tuple(t.shape) == pre.input_size
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    return t


def test_16bit_png(tmp_path):
    a = np.zeros((8, 8), dtype=np.uint16)
    a[:, 4:] = 65535
    a[0, 0] = 32768
    p = tmp_path / "deep.png"
    Image.fromarray(a).save(p)
    with Image.open(p) as im:
        assert im.mode == "I;16"
    g = _check(load_image(p, GREY), GREY)
    assert torch.all(g[0, :, 4:] == 1.0) and g[0, 1, 1] == 0.0
    assert g[0, 0, 0].item() == pytest.approx(128 / 255)  # not saturated at 1 (a naive convert)
    c = _check(load_image(p, RGB), RGB)
    assert torch.equal(c[0], c[1]) and torch.equal(c[1], c[2]) and torch.equal(c[0], g[0])


def test_palette_png(tmp_path):
    rgb = Image.new("RGB", (8, 8), (255, 0, 0))
    rgb.paste((0, 0, 255), (0, 0, 4, 8))
    p = tmp_path / "pal.png"
    rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(p)
    with Image.open(p) as im:
        assert im.mode == "P"
    t = _check(load_image(p, RGB), RGB)
    assert torch.allclose(t[:, 0, 0], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(t[:, 0, 7], torch.tensor([1.0, 0.0, 0.0]))
    _check(load_image(p, GREY), GREY)


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (8, 8), 1)
    im.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    p = tmp_path / "trns.png"
    im.save(p, transparency=1)  # the only colour used is fully transparent
    t = _check(load_image(p, RGB), RGB)
    assert torch.all(t == 0.0)


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    im = Image.new("CMYK", (8, 8), (0, 0, 0, 0))  # white
    im.paste((255, 0, 0, 0), (0, 0, 4, 8))  # cyan on the left
    im.save(p, quality=100)
    with Image.open(p) as check:
        assert check.mode == "CMYK"
    t = _check(load_image(p, RGB), RGB)
    assert torch.allclose(t[:, :, 6:], torch.ones(3, 8, 2), atol=0.05)
    assert torch.allclose(t[:, :, :2], torch.tensor([0.0, 1.0, 1.0]).view(3, 1, 1).expand(3, 8, 2), atol=0.05)
    _check(load_image(p, GREY), GREY)


def test_rgba_transparent_becomes_black(tmp_path):
    im = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    im.paste((0, 255, 0, 0), (0, 0, 4, 8))  # transparent green
    p = tmp_path / "rgba.png"
    im.save(p)
    t = _check(load_image(p, RGB), RGB)
    assert torch.all(t[:, :, :4] == 0.0)
    assert torch.allclose(t[:, :, 6:], torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 8, 2))
    g = _check(load_image(p, GREY), GREY)
    assert torch.all(g[:, :, :4] == 0.0) and torch.all(g[:, :, 6:] > 0.2)


def test_la_grey_with_alpha(tmp_path):
    im = Image.new("LA", (8, 8), (200, 255))
    p = tmp_path / "la.png"
    im.save(p)
    t = _check(load_image(p, GREY), GREY)
    assert torch.allclose(t, torch.full((1, 8, 8), 200 / 255))


def test_grey_image_for_rgb_model(tmp_path):
    a = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    p = tmp_path / "g.png"
    Image.fromarray(a).save(p)
    t = _check(load_image(p, RGB), RGB)
    expected = torch.tensor(a, dtype=torch.float32) / 255
    for c in range(3):
        assert torch.allclose(t[c], expected)


def test_rgb_image_for_grey_model(tmp_path):
    p = tmp_path / "rgb.png"
    im = Image.new("RGB", (8, 8), (255, 255, 255))
    im.paste((0, 0, 0), (0, 0, 4, 8))
    im.save(p)
    t = _check(load_image(p, GREY), GREY)
    assert torch.all(t[:, :, :4] == 0.0) and torch.all(t[:, :, 4:] == 1.0)


def test_float_tiff(tmp_path):
    a = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    p = tmp_path / "f.tif"
    Image.fromarray(a).save(p)
    t = _check(load_image(p, GREY), GREY)
    assert t[0, 0, 0] == 0.0 and t[0, -1, -1] == pytest.approx(1.0, abs=1 / 255)


def test_truncated_png_is_input_error(tmp_path):
    p = tmp_path / "cut.png"
    a = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(a).save(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.png"):
        load_image(p, RGB)
    with pytest.raises(InputError):
        load_image(p, GREY)


def test_text_file_named_png_is_input_error(tmp_path):
    p = tmp_path / "fake.png"
    p.write_text("this is not a picture\n")
    with pytest.raises(InputError, match="not a readable image"):
        load_image(p, RGB)


def test_missing_image_is_input_error(tmp_path):
    with pytest.raises(InputError):
        load_image(tmp_path / "gone.png", RGB)


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_large_image_is_resized_with_crop_pct(tmp_path, fmt):
    w, h = 3000, 2000
    x = np.linspace(0, 255, w, dtype=np.float32)
    a = np.broadcast_to(x[None, :, None], (h, w, 3)).astype(np.uint8)
    p = tmp_path / f"big.{fmt}"
    Image.fromarray(a).save(p)
    pre = Preprocessing((3, 32, 32), (0.5,) * 3, (0.5,) * 3, 0.875, "bicubic")
    t = _check(load_image(p, pre), pre)
    # A horizontal ramp: centre crop of a 3:2 image keeps the middle, so the mean is ~ mid-grey
    # and the ramp still rises from left to right.
    assert 0.4 < float(t.mean()) < 0.6
    assert float(t[:, :, -1].mean()) > float(t[:, :, 0].mean()) + 0.2


def test_resize_and_centre_crop_geometry(tmp_path):
    # 32x16 image: left quarter black, rest white; short side 16 -> 8, then centre crop 8 of 16
    a = np.full((16, 32), 255, dtype=np.uint8)
    a[:, :8] = 0
    p = tmp_path / "wide.png"
    Image.fromarray(a).save(p)
    t = _check(load_image(p, GREY), GREY)
    assert torch.all(t[0, :, 1:] > 0.9)  # the black quarter is cropped away (but for an edge column)
    pre = Preprocessing((1, 8, 8), (0.5,), (0.5,), 0.5, "nearest")  # resize to 16 first: crop keeps 8 of 32
    t = _check(load_image(p, pre), pre)
    assert torch.all(t == 1.0)


def test_load_images_stacks_in_order(tmp_path):
    paths = [_png(tmp_path / f"{i}.png", value=v) for i, v in enumerate((0, 255, 51))]
    x = load_images([Sample(path=q) for q in paths], GREY)
    assert x.shape == (3, 1, 8, 8)
    assert [float(v) for v in x.mean((1, 2, 3))] == pytest.approx([0.0, 1.0, 0.2])


def test_supported_extensions_are_lower_case_with_dot():
    assert all(e.startswith(".") and e == e.lower() for e in IMG_EXTENSIONS)
    assert os.path.splitext("a.png")[1] in IMG_EXTENSIONS
