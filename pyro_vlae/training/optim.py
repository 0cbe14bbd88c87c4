"""Adam for SVI with one fused kernel for every parameter, behind Pyro's optimiser interface.

``pyro.optim.Adam`` wraps one ``torch.optim.Adam`` per parameter and steps them one by one in a Python loop: 64
optimisers and several hundred small tensor operations per step for the VLAE, about a sixth of a CPU training step
(``benchmarks/RESULTS.md``).  :class:`FusedAdam` is a :class:`pyro.optim.PyroOptim`, so ``pyro.infer.SVI`` drives it
exactly as it drives Pyro's own (``optim(params)`` with the parameters the step's trace captured), but it steps all of
them with one ``torch.optim.Adam(fused=True)`` (``foreach`` where fused is not supported).

The update is Adam's, parameter by parameter: each parameter keeps its own moments and step count, parameters that
first appear in a later step (a model composed with new ``pyro.param`` sites) start from zero state then, and a
parameter missing from a step is not moved.  :meth:`FusedAdam.get_state` writes the per-parameter format of
``pyro.optim.Adam`` (``{param name: torch optimiser state dict}``), and :meth:`FusedAdam.set_state` reads it, so
checkpoints written by either optimiser resume with the other.  Hyperparameters (``lr``, ``betas``...) always come
from the constructor, not from the saved state, so a run resumed with another ``--lr`` uses it (``pyro.optim.Adam``
restores the saved ones).

:meth:`FusedAdam.capturable` makes the optimiser safe to capture in a CUDA graph (torch's ``capturable`` flag).  The
fused kernel keeps its step counters on the device and computes the same update either way, so a run may switch to
capture mid-way; the saved state does not record the flag (``capturable`` is written ``False``), so a graph run's
checkpoint resumes in any mode and on any device.
"""

from __future__ import annotations

import pyro
import torch
from pyro.optim import PyroOptim


def fused_supported(device: torch.device) -> bool:
    # torch >= 2.4 has fused Adam on CPU; CUDA has had it longer.
    if device.type == "cuda":
        return True
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return device.type == "cpu" and (major, minor) >= (2, 4)


class FusedAdam(PyroOptim):
    """``pyro.optim.Adam`` with one fused ``torch.optim.Adam`` for all parameters.

    :param optim_args: Adam's keyword arguments as a dict (``lr``, ``betas``, ``eps``, ``weight_decay``...).
        Per-parameter arguments (a callable) and gradient clipping need ``pyro.optim.Adam``.
    :param fused: ``True`` / ``False`` to force the kernel; ``None`` picks fused where supported, else ``foreach``.

    It stands wherever a Pyro optimiser does:

    >>> import math
    >>> import pyro
    >>> import pyro_vlae as pv
    >>> config = pv.get_preset("tiny").model
    >>> model, guide = pv.get_model("vlae", config), pv.get_guide("vlae", config)
    >>> x, _ = pv.load_data("synthetic", batch_size=16).tensors("train")
    >>> svi = pyro.infer.SVI(model, guide, pv.FusedAdam({"lr": 1e-3}), pyro.infer.Trace_ELBO())
    >>> math.isfinite(svi.step(x[:16]))
    True
    >>> type(svi.optim.optimizer).__name__  # one torch optimiser for every parameter
    'Adam'
    """

    def __init__(self, optim_args: dict, fused: bool | None = None):
        if not isinstance(optim_args, dict):
            raise TypeError(
                "FusedAdam takes one dict of Adam arguments for every parameter; for per-parameter arguments use "
                "pyro.optim.Adam(callable)"
            )
        bad = {"params", "fused", "foreach"} & set(optim_args)
        if bad:
            raise ValueError(f"FusedAdam sets {sorted(bad)} itself; remove them from optim_args")
        super().__init__(torch.optim.Adam, optim_args)
        self.fused = fused
        self.optimizer: torch.optim.Adam | None = None
        self._names: dict = {}  # parameter -> param-store name

    def _name(self, p) -> str:
        name = pyro.get_param_store().param_name(p)
        if name is None:
            raise ValueError(
                "FusedAdam was handed a tensor that is not in Pyro's param store; pass the parameters SVI captures "
                "(pyro.param / pyro.module sites)"
            )
        return name

    def _add(self, new: list) -> None:
        new.sort(key=lambda p: self._names[p])
        if self.optimizer is None:
            fused = fused_supported(new[0].device) if self.fused is None else self.fused
            kernel = {"fused": True} if fused else {"foreach": True}
            self.optimizer = torch.optim.Adam(new, **self.pt_optim_args, **kernel)
        else:
            self.optimizer.add_param_group({"params": new})
        waiting = {p: self._state_waiting_to_be_consumed.pop(self._names[p], None) for p in new}
        waiting = {p: s for p, s in waiting.items() if s is not None}
        if waiting:
            # Load through torch so that step counters get the dtype and device the kernel wants.
            order = [q for g in self.optimizer.param_groups for q in g["params"]]
            sd = self.optimizer.state_dict()
            for i, q in enumerate(order):
                if q in waiting:
                    per_param = waiting[q].get("state", {})
                    if per_param:
                        sd["state"][i] = next(iter(per_param.values()))
            self.optimizer.load_state_dict(sd)

    def __call__(self, params, *args, **kwargs) -> None:
        """Take one Adam step on ``params``, the parameters ``SVI`` captured in this step's trace, then clear their
        gradients (``None``, so ``pyro.infer.util.zero_grads`` that follows in ``SVI.step`` has nothing to zero and
        the next ``backward`` writes fresh gradients instead of adding to a zeroed copy of every parameter).

        The update is ``pyro.optim.Adam``'s: a parameter in ``params`` that this step gave no gradient still moves on
        its moments once it has any (Pyro's optimiser sees the zeros left by ``zero_grads``), and a known parameter
        missing from ``params`` is not moved.
        """
        params = list(params)
        if not params:
            return
        new = [p for p in params if p not in self._names]
        for p in new:
            self._names[p] = self._name(p)
        if new:
            self._add(new)
        state = self.optimizer.state
        for p in params:
            if p.grad is None and state.get(p):  # traced without a gradient this step
                p.grad = torch.zeros_like(p)
        # Adam steps every parameter holding a gradient; hide those of parameters this step did not use.  The usual
        # case, every known parameter in this step, needs no search.
        hidden = {}
        if len(params) != len(self._names):
            stepped = set(params)
            for p in self._names:
                if p.grad is not None and p not in stepped:
                    hidden[p], p.grad = p.grad, None
        try:
            self.optimizer.step(*args, **kwargs)
        finally:
            for p, g in hidden.items():
                p.grad = g
        for p in params:
            p.grad = None

    def capturable(self, on: bool = True) -> None:
        """Mark every parameter group capturable (``on``) or not, as CUDA-graph capture of ``step`` requires.

        Only the fused kernel may switch at any time (its step counters already live on the device and its update does
        not depend on the flag); call after the first step, once the optimiser holds its parameters.

        :raises RuntimeError: before the first step, or when the optimiser is not fused.
        """
        if self.optimizer is None:
            raise RuntimeError("FusedAdam.capturable: take one step first, so that the optimiser holds its parameters")
        if on and not all(g.get("fused") for g in self.optimizer.param_groups):
            raise RuntimeError("FusedAdam.capturable needs the fused kernel (fused=True or None on CUDA)")
        for group in self.optimizer.param_groups:
            group["capturable"] = bool(on)
        # Replays do not call step(); an eager step of a capturable optimiser would only warn that it is slower.
        self.optimizer._warned_capturable_if_run_uncaptured = True

    def untrained(self, modules) -> list:
        """Names of the parameters of ``modules`` that this optimiser does not hold (call after a step).

        Such a parameter never moves: it was not registered with Pyro, or the param store holds a copy of it (Pyro
        stores ``.contiguous()`` tensors, so a ``channels_last`` convolution weight is copied, and the copy is what
        SVI captures and steps).
        """
        held = set(self._names)
        return [
            f"{type(m).__name__}.{n}"
            for m in modules
            for n, p in m.named_parameters()
            if p.requires_grad and p not in held
        ]

    def get_state(self) -> dict:
        """``{param name: {"state": {0: ...}, "param_groups": [...]}}``, the format of ``pyro.optim.Adam``."""
        out = dict(self._state_waiting_to_be_consumed)  # state loaded for parameters not seen yet is kept
        if self.optimizer is None:
            return out
        sd = self.optimizer.state_dict()
        i = 0
        for group, sd_group in zip(self.optimizer.param_groups, sd["param_groups"]):
            # The kernel choice stays with the optimiser that loads the state.
            hyper = {k: v for k, v in sd_group.items() if k not in ("params", "fused", "foreach")}
            hyper["capturable"] = False  # a property of this process (CUDA-graph capture), not of the state
            for p in group["params"]:
                state = {0: sd["state"][i]} if i in sd["state"] else {}
                out[self._names[p]] = {"state": state, "param_groups": [{**hyper, "params": [0]}]}
                i += 1
        return out
