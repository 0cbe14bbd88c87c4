"""MathJax for the documentation site without the network: the one file the pages load, taken from an installed package.

The docs extra installs ``django-static-mathjax`` (MathJax 3.2.2 as static files, no dependencies). Sphinx's
``sphinx.ext.mathjax`` would otherwise load MathJax from a CDN, and offline every formula would show as raw TeX.
:func:`static_folder` copies ``es5/tex-svg-full.js`` (every TeX extension, SVG output, so no web fonts to fetch) into a
folder that ``docs/conf.py`` adds to ``html_static_path``; ``mathjax_path`` then names it relative to ``_static``.
"""

from __future__ import annotations

import os
import shutil

MATHJAX_FILE = "mathjax/tex-svg-full.js"


def installed_file() -> str:
    """Path of ``tex-svg-full.js`` in the installed ``django-static-mathjax``; a clear error when it is missing."""
    try:
        import mathjax
    except ImportError:
        raise RuntimeError(
            "MathJax is not installed, so math would need the network: install the docs extra, "
            "pip install -e '.[docs]' (it brings django-static-mathjax)"
        ) from None
    path = os.path.join(os.path.dirname(mathjax.__file__), "static", "mathjax", "es5", "tex-svg-full.js")
    if not os.path.isfile(path):
        raise RuntimeError(f"{path} is missing: reinstall django-static-mathjax (pip install -e '.[docs]')")
    return path


def static_folder(parent: str) -> str:
    """Copy MathJax's one file to ``parent/mathjax/`` (atomically) and return ``parent`` for ``html_static_path``."""
    source = installed_file()
    target = os.path.join(parent, MATHJAX_FILE)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if not os.path.exists(target) or os.path.getsize(target) != os.path.getsize(source):
        tmp = f"{target}.{os.getpid()}.tmp"
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    return parent
