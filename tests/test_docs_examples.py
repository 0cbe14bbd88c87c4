"""The usage examples in the docstrings of the public ``pv.*`` names run and print what they show.

Each example is a doctest on the tiny preset, the generated ``synthetic`` data or the shipped ``vlae-mnist`` model,
so the whole file takes seconds and needs no network.  The API pages show these same docstrings.
"""

from __future__ import annotations

import doctest

import pytest

import pyro_vlae as pv

#: Public names whose docstrings hold an example: add a name here when its docstring gains one.
WITH_EXAMPLES = """
DataBundle DatasetError FusedAdam ModelConfig ancestral_means fix_layers get_guide get_model gibbs_chain intervene_layer
kl_per_dim latent_shapes latent_sites load_data load_pretrained traverse_layer variance_share
""".split()

#: Public functions and classes still without an example (their docstrings are in modules being edited elsewhere);
#: move a name to ``WITH_EXAMPLES`` when its example lands.
AWAITING_EXAMPLES = """
RunConfig TrainConfig bits_per_dim build dci evaluate_all evaluate_run fit frechet_distance get_classifier get_preset
importance_log_likelihood load_run mig resolve_device sap
""".split()

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


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
