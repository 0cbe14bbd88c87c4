"""The documentation site works with the network off: MathJax is served from the site itself, and no page loads a
script, stylesheet or font from another host (links to other sites are fine: they are only followed when clicked)."""

from __future__ import annotations

import ast
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SITE = DOCS / "_build" / "html"
sys.path.insert(0, str(DOCS))

import offline_math  # noqa: E402

# a resource the browser fetches by itself: <script src>, <link href> (stylesheets, fonts, preloads), CSS url()/@import
REMOTE = re.compile(r"<script[^>]+src=\"(?:https?:)?//|<link[^>]+href=\"(?:https?:)?//|url\(\s*['\"]?(?:https?:)?//")


def _conf_assignments():
    tree = ast.parse((DOCS / "conf.py").read_text())
    assigns = [node for node in tree.body if isinstance(node, ast.Assign)]
    return {t.id: node.value for node in assigns for t in node.targets if isinstance(t, ast.Name)}


def test_conf_serves_mathjax_from_the_site():
    conf = _conf_assignments()
    assert "mathjax_path" in conf, "docs/conf.py must set mathjax_path, or Sphinx loads MathJax from a CDN"
    assert ast.unparse(conf["mathjax_path"]) == "offline_math.MATHJAX_FILE"
    assert not re.match(r"(https?:)?//", offline_math.MATHJAX_FILE)
    assert "offline_math.static_folder" in ast.unparse(conf["html_static_path"])
    assert not re.search(r"https?://", (DOCS / "conf.py").read_text()), "docs/conf.py names a remote address"


def test_static_folder_copies_the_one_mathjax_file(tmp_path):
    pytest.importorskip("mathjax", reason="the docs extra (django-static-mathjax) is not installed")
    parent = offline_math.static_folder(str(tmp_path))
    copied = pathlib.Path(parent) / offline_math.MATHJAX_FILE
    assert copied.stat().st_size == pathlib.Path(offline_math.installed_file()).stat().st_size
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["tex-svg-full.js"]


def test_missing_mathjax_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mathjax", None)
    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[docs\]'"):
        offline_math.installed_file()


def test_built_site_fetches_nothing_from_another_host():
    pages = sorted(SITE.rglob("*.html")) if SITE.is_dir() else []
    if not pages:
        pytest.skip("the site is not built (make docs)")
    assert (SITE / "_static" / offline_math.MATHJAX_FILE).is_file()
    files = pages + [p for p in (SITE / "_static").rglob("*.css")]
    texts = {p.relative_to(SITE): p.read_text(errors="replace") for p in files}
    remote = [f"{name}: {m.group(0)}" for name, text in texts.items() for m in REMOTE.finditer(text)]
    assert not remote, f"pages load resources from other hosts: {remote[:5]}"
    page = (SITE / "reproduction.html").read_text()
    assert f'src="_static/{offline_math.MATHJAX_FILE}' in page
