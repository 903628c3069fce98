"""Markdown and HTML say the same things; HTML escapes what it is given."""

from __future__ import annotations

from l2ul_cli.document import to_html, to_markdown

BLOCKS = [("title", "l2ul eval"), ("p", "**goal not met** · `a<b>.png`"), ("ul", ["x & y"]),
          ("table", ["class", "n"], [["<cat>", "3"]]), ("img", "fig \"1\"", "r-x.png", b"\x89PNG")]


def test_markdown_blocks():
    md = to_markdown(BLOCKS)
    assert md.splitlines()[:3] == ["# l2ul eval", "", "**goal not met** · `a<b>.png`"]
    assert "| class | n |\n|---|---|\n| <cat> | 3 |" in md
    assert "![fig \"1\"](r-x.png)" in md


def test_html_escapes_and_formats():
    page = to_html(BLOCKS)
    assert "<title>l2ul eval</title>" in page
    assert "<p><strong>goal not met</strong> · <code>a&lt;b&gt;.png</code></p>" in page
    assert "<li>x &amp; y</li>" in page and "<td>&lt;cat&gt;</td>" in page
    assert '<img src="data:image/png;base64,iVBORw==" alt="fig &quot;1&quot;">' in page
    assert "<cat>" not in page


def test_mia_reading_says_which_side_of_chance():
    from l2ul_cli.plots import read_mia

    def reading(before: float, after: float) -> str:
        mia = {w: {"mia": {"loss_auc": a, "loss_histogram": {}}} for w, a in (("before", before), ("after", after))}
        return read_mia({"command": "forget", "eval": mia})

    assert reading(0.93, 0.11).startswith("AUC 0.11: an attacker separates the forget images from unseen ones better "
                                          "than chance — their losses are now higher than unseen images'")
    assert reading(0.93, 0.11).endswith("(before the run: 0.93).")
    assert reading(0.93, 0.52).startswith("AUC 0.52: close to 0.5")
    assert "still tells the forget images from unseen ones" in reading(0.93, 0.88)
    assert read_mia({"command": "forget"}) is None  # no --eval: no figure, no sentence


def test_label_reading_warns_when_one_class_collects_the_forgotten_images():
    from l2ul_cli.plots import read_labels

    def rows(*after: str) -> dict:
        return {"command": "forget", "images": [{"label": "cat", "before": "cat", "after": a} for a in after]}

    assert "dog collects most of them" in read_labels(rows("dog", "dog", "dog", "cat"))
    assert read_labels(rows("dog", "fox", "owl", "cat")).startswith(
        "3 of 4 images now get a class other than their label, spread over 3 class(es) with at most 33% in one: no "
        "single class collects them")
    assert read_labels(rows("cat")).startswith("None of the 1 images left its label")
