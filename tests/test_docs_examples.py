"""The usage examples in the docstrings of the public ``pv.*`` names run and print what they show.

Each example is a doctest on the tiny preset, the generated ``synthetic`` data or the shipped ``vlae-mnist`` model,
so the whole file takes seconds and needs no network.  The API pages show these same docstrings.
"""

from __future__ import annotations

import ast
import doctest
import pathlib
import re
import sys

import pytest

import pyro_vlae as pv

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "docs"))

from api import public_names  # noqa: E402  (docs/api/public_names.py, the Sphinx extension)

#: Public names whose docstrings hold an example: add a name here when its docstring gains one.
WITH_EXAMPLES = """
DataBundle DatasetError FusedAdam ModelConfig RunConfig TrainConfig ancestral_means bits_per_dim build dci evaluate_all
evaluate_run fit fix_layers frechet_distance get_classifier get_guide get_model get_preset gibbs_chain
importance_log_likelihood intervene_layer kl_per_dim latent_shapes latent_sites load_data load_pretrained load_run mig
resolve_device sap traverse_layer variance_share
""".split()

#: Public functions and classes still without an example: move a name to ``WITH_EXAMPLES`` when its example lands.
AWAITING_EXAMPLES: list[str] = []

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
ROOT = pathlib.Path(__file__).resolve().parents[1]
LITERAL = re.compile(r"``(.+?)``", re.S)


def _docstring_tests(name: str) -> list:
    """The doctests of ``pv.<name>``'s own docstring (not its methods'), each run in a fresh namespace."""
    finder = doctest.DocTestFinder(recurse=False)
    return [t for t in finder.find(getattr(pv, name), f"pv.{name}", globs={}) if t.examples]


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_docstring_example_runs(name):
    tests = _docstring_tests(name)
    assert tests, f"pv.{name}'s docstring has no example (a '>>> ' block)"
    report = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in tests:
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


def test_every_public_function_and_class_has_an_example_or_is_awaited():
    callables = {n for n in pv.__all__ if callable(getattr(pv, n)) and hasattr(getattr(pv, n), "__qualname__")}
    assert not set(WITH_EXAMPLES) & set(AWAITING_EXAMPLES)
    missing = sorted(callables - set(WITH_EXAMPLES) - set(AWAITING_EXAMPLES))
    assert not missing, f"public names with no docstring example: {missing}"
    stale = sorted(n for n in AWAITING_EXAMPLES if _docstring_tests(n))
    assert not stale, f"these names have an example now: move them to WITH_EXAMPLES: {stale}"


def _docstrings(package_dir: pathlib.Path):
    """``(where, docstring)`` of every module, class and function in the ``.py`` files of ``package_dir``."""
    for path in sorted(package_dir.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                if doc:
                    yield f"{path.relative_to(ROOT)}:{getattr(node, 'name', '<module>')}", doc


@pytest.mark.parametrize("package", ["models", "guides"])
def test_paper_equations_are_math_roles_not_raw_tex_in_code(package):
    """A TeX command inside a double-backtick literal shows as raw TeX on the API pages; ``:math:`` renders it."""
    raw = [f"{where}: ``{span}``" for where, doc in _docstrings(ROOT / package) for span in LITERAL.findall(doc)]
    raw = [r for r in raw if "\\" in r.split(": ", 1)[1]]
    assert not raw, "write these as :math:`...`:\n" + "\n".join(raw)


@pytest.mark.parametrize(
    "target, module, relative, expected",
    [
        ("pyro_vlae.experiments.interventions.fix_layers", None, False, "pyro_vlae.fix_layers"),
        ("pyro_vlae.experiments.variance_share", None, False, "pyro_vlae.variance_share"),  # a re-export
        ("kl_per_dim", "pyro_vlae.experiments.interventions", False, "pyro_vlae.kl_per_dim"),
        ("disentangle.evaluate_all", "pyro_vlae.evaluation.assignment", True, "pyro_vlae.evaluate_all"),
        ("FusedAdam.get_state", "pyro_vlae.training.optim", False, "pyro_vlae.FusedAdam.get_state"),
        ("pyro_vlae.training.optim.FusedAdam.untrained", None, False, "pyro_vlae.FusedAdam.untrained"),
        ("kl_per_dim", "pyro_vlae.experiments.gibbs", False, None),  # not defined there: left to Sphinx
        ("top_kl_dims", "pyro_vlae.experiments.interventions", False, None),  # not a public name
        ("pyro_vlae.data.loaders.DATASETS", None, False, None),  # data has no entry of its own
    ],
    ids=[
        "defining-module",
        "re-export",
        "module-relative",
        "dotted-relative",
        "method",
        "method-full-path",
        "elsewhere",
        "internal",
        "data",
    ],
)
def test_references_through_the_defining_module_resolve_to_the_public_name(target, module, relative, expected):
    assert public_names.public_target(target, module, relative) == expected


def test_each_public_name_is_described_once_at_its_public_path():
    """docs/api/pyro_vlae.md describes every public function and class as ``pyro_vlae.<name>``; the automodule of the
    module that defines it leaves it out, so the site has one description of each, under the name users write."""
    pages = {p.name: p.read_text() for p in (ROOT / "docs" / "api").glob("*.md")}
    public = [n for n in pv.__all__ if callable(getattr(pv, n)) and hasattr(getattr(pv, n), "__qualname__")]
    for name in public:
        kind = "class" if isinstance(getattr(pv, name), type) else "function"
        entries = [
            p for p, text in pages.items() for _ in re.finditer(rf"^\.\. auto{kind}:: pyro_vlae\.{name}$", text, re.M)
        ]
        assert entries == ["pyro_vlae.md"], f"pv.{name}: want one '.. auto{kind}:: pyro_vlae.{name}' in pyro_vlae.md"
        module = getattr(pv, name).__module__
        options = re.search(
            rf"^\.\. automodule:: {re.escape(module)}\n((?:   :.*\n)*)", "\n".join(pages.values()), re.M
        )
        excluded = re.search(r":exclude-members: (.*)", options.group(1)) if options else None
        assert excluded and name in excluded.group(1).split(", "), f"{module}'s automodule should exclude {name}"
