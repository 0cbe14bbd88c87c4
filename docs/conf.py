"""Sphinx configuration of the pyro_vlae documentation (``make docs``; CI builds it with ``-W --keep-going``).

The API pages are autodoc over the installed package; the tutorial is rendered by myst-nb with its outputs, executed
at build time and offline (or taken from the test suite's execution of the same tree: see ``notebook_cache.py``).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import notebook_cache  # noqa: E402
import offline_math  # noqa: E402

import pyro_vlae  # noqa: E402

project = "pyro_vlae"
author = "the pyro_vlae authors"
copyright = "2026, the pyro_vlae authors"
release = version = pyro_vlae.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.mathjax", "sphinx_copybutton", "myst_nb", "api.public_names"]
exclude_patterns = ["_build", "figures/README.md"]
root_doc = "index"

# --- theme: furo (light and dark), a text column wide enough for 120-column code, a copy button on code ----------
html_theme = "furo"
html_title = f"pyro_vlae {release}"
html_static_path = ["_static", offline_math.static_folder(os.path.join(notebook_cache.BUILD, ".mathjax"))]
html_css_files = ["wide.css"]
# the copy button leaves out prompts and the outputs that follow them
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True

# --- math offline: MathJax 3 from the docs extra's package (django-static-mathjax), served from _static -------------
# One self-contained file (tex-svg-full.js: every TeX extension, SVG output, so no font files); no CDN is named
# anywhere in the built site (tests/test_docs_offline.py checks the conf and, when built, the HTML).
mathjax_path = offline_math.MATHJAX_FILE

# --- autodoc: one page per subpackage, each module's own members (api/*.md) -------------------------------------
# ``ignore-module-all``: a package's ``__all__`` re-exports its submodules' names; documenting members where they
# are defined (and not again under every package that re-exports them) keeps one description per object, so that
# cross-references resolve to one target and Sphinx reports no duplicates.
autodoc_default_options = {"members": True, "ignore-module-all": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Methods that override torch's (``forward``, ``train``) would otherwise inherit torch's docstrings, which are not
# written for this site.
autodoc_inherit_docstrings = False
autodoc_class_signature = "separated"
# No network at build time, so no intersphinx: names from torch, pyro and numpy in signatures cannot be linked, and
# nitpicky mode (off) would report every one of them.
nitpicky = False
suppress_warnings = []

# --- myst and myst-nb ------------------------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 4  # GitHub-style anchors, so links such as reproduction.md#c1-... work here and on GitHub
nb_execution_mode = "cache"
nb_execution_cache_path = notebook_cache.cache_path()
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
# Execute with this interpreter's kernel, whatever ``python`` is first on PATH (as tests/test_tutorial.py does).
os.environ["JUPYTER_PATH"] = os.pathsep.join(
    [notebook_cache.write_kernelspec(os.path.join(notebook_cache.BUILD, ".kernel"))]
    + [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p]
)
os.environ["JUPYTER_PLATFORM_DIRS"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "2")
if notebook_cache.load_into_cache(nb_execution_cache_path):
    print("tutorial: using the outputs of tests/test_tutorial.py on this same tree (no second execution)")
