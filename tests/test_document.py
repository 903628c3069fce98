"""Markdown and HTML say the same things; HTML escapes what it is given."""

from __future__ import annotations

from l2ul_cli.document import to_html, to_markdown

BLOCKS = [("title", "l2ul eval"), ("p", "**goal not met** · `a<b>.png`"), ("ul", ["x & y"]),
          ("table", ["class", "n"], [["<cat>", "3"]]), ("img", "fig \"1\"", "r-x.png")]


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
    assert '<img src="r-x.png" alt="fig &quot;1&quot;">' in page
    assert "<cat>" not in page
