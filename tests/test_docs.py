"""The documentation site's sources: the API pages cover the package, the public-face table points at the objects
themselves, every figure a page shows exists within the size limit, the README's links into the reproduction page
land on a heading, and the tutorial's shared execution is used only for the tree that produced it."""

from __future__ import annotations

import pathlib
import re
import sys

import nbformat
import pytest

import pyro_vlae as pv

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS))

import notebook_cache  # noqa: E402

PAGES = sorted((DOCS / "api").glob("*.md"))
TEXTS = sorted(DOCS.glob("*.md")) + PAGES + [ROOT / "README.md"]


def _modules():
    """Dotted names of every module of the installed package (``models/`` and ``guides/`` under ``pyro_vlae``)."""
    for top, dotted in (("pyro_vlae", "pyro_vlae"), ("models", "pyro_vlae.models"), ("guides", "pyro_vlae.guides")):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT / top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join([dotted, *parts])


def _documented():
    return {m for page in PAGES for m in re.findall(r"^\.\. automodule:: (\S+)$", page.read_text(), re.M)}


def test_every_module_has_its_api_page_entry_once():
    pages = [m for page in PAGES for m in re.findall(r"^\.\. automodule:: (\S+)$", page.read_text(), re.M)]
    assert len(pages) == len(set(pages)), "a module is documented twice (duplicate object descriptions)"
    missing = sorted(set(_modules()) - _documented())
    assert not missing, f"modules missing from docs/api/*.md: {missing}"
    assert not _documented() - set(_modules()), "an API page names a module that does not exist"


@pytest.mark.parametrize("name", pv.__all__)
def test_public_face_table_links_each_name_to_its_definition(name):
    table = (DOCS / "api" / "pyro_vlae.md").read_text()
    obj = getattr(pv, name)
    if callable(obj) and hasattr(obj, "__qualname__"):
        target = f"pv.{name} <{obj.__module__}.{obj.__qualname__}>"
        assert target in table, f"docs/api/pyro_vlae.md should link pv.{name} as `{target}`"
        assert obj.__module__ in _documented()
    else:
        assert f"`pv.{name}`" in table


def _figures():
    for text in TEXTS:
        for link in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text.read_text()):
            yield text, (text.parent / link).resolve()


@pytest.mark.parametrize("page,figure", list(_figures()), ids=lambda p: p.name)
def test_every_shown_figure_is_committed_and_small(page, figure):
    assert figure.is_file(), f"{page.name} shows {figure}, which does not exist"
    assert figure.parent == DOCS / "figures"
    assert figure.stat().st_size <= 300 * 1024


def _slug(heading: str) -> str:
    """GitHub's (and myst's ``myst_heading_anchors``) anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_into_the_reproduction_page_land_on_a_heading():
    headings = re.findall(r"^#{1,3} (.+)$", (DOCS / "reproduction.md").read_text(), re.M)
    anchors = {_slug(h) for h in headings}
    links = re.findall(r"reproduction\.md#([^)\s]+)\)", "".join(t.read_text() for t in TEXTS))
    links += re.findall(r"\]\(#([^)\s]+)\)", (DOCS / "reproduction.md").read_text())
    assert len(links) >= 12  # the README's claims table, the page's own table, the guide
    assert not sorted(set(links) - anchors), f"links to missing headings; headings give {sorted(anchors)}"
    for claim in ("c1-", "c2-", "c3-", "c4-", "c5-", "speed"):
        assert any(a.startswith(claim) for a in anchors)


@pytest.fixture
def shared(tmp_path, monkeypatch):
    """The module's build folder moved to ``tmp_path``, and a fake execution of the tutorial (an output per cell)."""
    monkeypatch.setattr(notebook_cache, "BUILD", str(tmp_path))
    monkeypatch.setattr(notebook_cache, "EXECUTED", str(tmp_path / "tutorial.executed.ipynb"))
    run = nbformat.read(notebook_cache.NOTEBOOK, as_version=4)
    run.cells.insert(0, nbformat.v4.new_code_cell("print('a cell of the test itself')"))
    for k, cell in enumerate(c for c in run.cells if c.cell_type == "code"):
        cell.execution_count = k + 1
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"output {k}\n")]
    return run


def test_shared_execution_is_rendered_for_the_same_tree_only(shared, tmp_path, monkeypatch):
    jupyter_cache = pytest.importorskip("jupyter_cache")
    digest = notebook_cache.source_digest()  # "this tree", read once: an edit to the working copy by another process
    monkeypatch.setattr(notebook_cache, "source_digest", lambda: digest)  # between save and load must not change it
    notebook_cache.save_executed(shared, skip=1)
    cache = str(tmp_path / "cache")
    assert notebook_cache.load_into_cache(cache)
    _, merged = jupyter_cache.get_cache(cache).merge_match_into_notebook(
        nbformat.read(notebook_cache.NOTEBOOK, as_version=4)
    )
    code = [c for c in merged.cells if c.cell_type == "code"]
    assert [c.outputs[0]["text"] for c in code] == [f"output {k + 1}\n" for k in range(len(code))]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    # another tree (any package file or the notebook changed) gets nothing from the cache
    monkeypatch.setattr(notebook_cache, "source_digest", lambda: "0" * 64)
    assert not notebook_cache.load_into_cache(str(tmp_path / "other"))


def test_shared_execution_refuses_other_code(shared):
    next(c for c in shared.cells if c.cell_type == "code" and "pv." in c.source).source += "\nprint('edited')"
    with pytest.raises(ValueError, match="differ"):
        notebook_cache.save_executed(shared, skip=1)


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A small copy of the tree's layout (notebook, ``pyro_vlae/`` with a shipped file, ``models/``, ``guides/``) that
    ``notebook_cache`` reads instead of the shared working copy, so edits here change nothing but this copy."""
    for folder in ("pyro_vlae/pretrained", "models", "guides", "docs"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "pyro_vlae" / "__init__.py").write_text("x = 1\n")
    (tmp_path / "pyro_vlae" / "pretrained" / "vlae-mnist.pt").write_bytes(b"weights")
    (tmp_path / "models" / "vlae.py").write_text("y = 2\n")
    (tmp_path / "guides" / "vlae.py").write_text("z = 3\n")
    notebook = tmp_path / "docs" / "tutorial.ipynb"
    notebook.write_text(pathlib.Path(notebook_cache.NOTEBOOK).read_text())
    monkeypatch.setattr(notebook_cache, "ROOT", str(tmp_path))
    monkeypatch.setattr(notebook_cache, "NOTEBOOK", str(notebook))
    monkeypatch.setattr(notebook_cache, "BUILD", str(tmp_path / "docs" / "_build"))
    monkeypatch.setattr(notebook_cache, "EXECUTED", str(tmp_path / "docs" / "_build" / "tutorial.executed.ipynb"))
    return tmp_path


@pytest.mark.parametrize(
    "edit",
    ["pyro_vlae/__init__.py", "pyro_vlae/pretrained/vlae-mnist.pt", "models/vlae.py", "guides/vlae.py"]
    + ["docs/tutorial.ipynb"],
    ids=["package", "shipped-weights", "models", "guides", "notebook"],
)
def test_source_digest_changes_with_every_file_the_outputs_depend_on(tree, edit):
    before = notebook_cache.source_digest()
    with open(tree / edit, "ab") as f:
        f.write(b"\n")
    assert notebook_cache.source_digest() != before, f"editing {edit} must change the digest"


def test_source_digest_ignores_bytecode(tree):
    before = notebook_cache.source_digest()
    (tree / "pyro_vlae" / "__pycache__").mkdir()
    (tree / "pyro_vlae" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    assert notebook_cache.source_digest() == before


def test_stored_execution_is_refused_after_a_package_file_changes(tree, shared):
    """The real digest, no stub: an execution saved before an edit to the package is not this tree's any more."""
    notebook_cache.save_executed(shared, skip=1)
    assert notebook_cache.stored_execution() is not None
    (tree / "pyro_vlae" / "__init__.py").write_text("x = 2\n")
    assert notebook_cache.stored_execution() is None
