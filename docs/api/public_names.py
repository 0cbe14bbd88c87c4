"""Sphinx extension: Python references that name a public ``pv.*`` object by the module that defines it link to its
entry at the public path.

The API pages describe each public name once, where users meet it: ``pyro_vlae.fix_layers`` on the public-face page
(``docs/api/pyro_vlae.md``); the page of its defining module leaves it out.  Classes get Sphinx's own ``:canonical:``
alias, so ``pyro_vlae.nets.ModelConfig`` already resolves; functions get none.  This resolver links what would
otherwise stay unlinked:

* a reference through the defining module, ``pyro_vlae.experiments.interventions.fix_layers``, or relative to it
  (``:func:`kl_per_dim``` inside that module, ``.disentangle.evaluate_all`` beside it), to ``pyro_vlae.fix_layers``;
* a module-relative reference in a docstring shown at the public path (``:class:`GibbsResult``` in
  ``pyro_vlae.gibbs_chain``, read as ``pyro_vlae.GibbsResult``), to the one documented object whose full name ends
  with it.

It answers only references Sphinx left unresolved, and links nothing when more than one object could be meant.
Loaded by ``docs/conf.py`` as the extension ``api.public_names`` (``docs/`` is on ``sys.path`` there).
"""

from __future__ import annotations

import sys

import pyro_vlae


def _public_object(target: str, module: str | None, relative: bool) -> str | None:
    """``pyro_vlae.<name>`` when ``target`` names the public object ``pv.<name>`` from ``module``, else ``None``."""
    name = target.rsplit(".", 1)[-1]
    obj = getattr(pyro_vlae, name, None) if name in pyro_vlae.__all__ else None
    if obj is None or not hasattr(obj, "__qualname__"):  # data (pv.DATASETS ...) has no entry of its own
        return None
    if relative:
        defined = f"{obj.__module__}.{obj.__qualname__}"
        return f"pyro_vlae.{name}" if (defined == target or defined.endswith("." + target)) else None
    for full in (target, f"{module}.{target}" if module else target):
        where, _, attr = full.rpartition(".")
        if where in sys.modules and getattr(sys.modules[where], attr, None) is obj:  # the module that defines or
            return f"pyro_vlae.{name}"  # re-exports it, e.g. pyro_vlae.experiments.variance_share
    return None


def public_target(target: str, module: str | None, relative: bool = False) -> str | None:
    """The public path that a reference to ``target`` from ``module`` means, or ``None``: ``pyro_vlae.<name>`` for
    a public object, ``pyro_vlae.<Class>.<member>`` for a member of a public class.

    :param target: the reference's target, e.g. ``pyro_vlae.experiments.interventions.fix_layers``, ``kl_per_dim``
        or ``FusedAdam.get_state``.
    :param module: the module whose docstring holds the reference (Sphinx's ``py:module``), if any.
    :param relative: Sphinx's ``.name`` form: any module path ending with ``target`` will do.
    """
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):  # the longest prefix that names a public object; the rest are members
        head = _public_object(".".join(parts[:cut]), module, relative)
        if head is not None:
            return ".".join([head, *parts[cut:]])
    return None


def _resolve(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    domain = env.get_domain("py")
    target, module = node.get("reftarget", ""), node.get("py:module")
    full = public_target(target, module, relative=node.hasattr("refspecific"))
    if full is None and module == "pyro_vlae":  # a module-relative name in a docstring shown at the public path
        matches = [n for n in domain.objects if n == target or n.endswith("." + target)]
        full = matches[0] if len(matches) == 1 else None
    if full is None or full == target:
        return None
    return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], full, node, contnode)


def setup(app):
    app.connect("missing-reference", _resolve)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
