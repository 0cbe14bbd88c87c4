"""KL-scale schedules.  The value is passed as ``kl_scale`` to both model and guide, which apply it with
``poutine.scale`` on the latent sites only (Pyro's ``examples/dmm.py`` pattern)."""

from __future__ import annotations

import math

#: Schedules never return less than this: ``poutine.scale(0)`` would drop the latent sites altogether.
MIN_KL_SCALE = 1e-4

SCHEDULE_HELP = (
    "exp:T (1 - exp(-t/T), the reference code's default exp:2000), linear:N (ramp from 0 to 1 over N steps), "
    "const:S (a fixed S > 0) or none (always 1)"
)


class KLSchedule:
    """A callable ``step -> kl_scale`` parsed from a string such as ``"exp:2000"``.

    :param spec: ``exp:T``, ``linear:N``, ``const:S`` or ``none``.
    """

    def __init__(self, spec: str):
        self.spec = str(spec)
        kind, _, arg = self.spec.partition(":")
        self.kind = kind
        if kind == "none" and not arg:
            self.value = 1.0
            return
        if kind not in ("exp", "linear", "const") or not arg:
            raise ValueError(f"invalid --anneal {spec!r}: expected {SCHEDULE_HELP}")
        try:
            self.value = float(arg)
        except ValueError:
            raise ValueError(f"invalid --anneal {spec!r}: {arg!r} is not a number; expected {SCHEDULE_HELP}") from None
        if not (self.value > 0 and math.isfinite(self.value)):
            what = "the KL scale" if kind == "const" else "the time constant"
            raise ValueError(f"invalid --anneal {spec!r}: {what} must be a finite number > 0")

    def __call__(self, step: int) -> float:
        t = float(step)
        if self.kind == "none":
            return 1.0
        if self.kind == "const":
            return self.value
        if self.kind == "exp":
            return max(1.0 - math.exp(-t / self.value), MIN_KL_SCALE)
        return min(1.0, max(t / self.value, MIN_KL_SCALE))

    def __repr__(self):
        return f"KLSchedule({self.spec!r})"


def ladder_gains(step: int, num_layers: int, fade_in: int):
    """Progressive fade-in of the VLAE's lower layers (an option; 0 turns it off).

    The top code ``z_L`` is used from the start; the ladder input of ``z_{L-1}`` ramps linearly from 0 to 1 over
    steps ``[fade_in, 2 fade_in]``, that of ``z_{L-2}`` over ``[2 fade_in, 3 fade_in]``, and so on down to ``z_1``.
    While a layer's gain is 0 its code cannot affect ``x``, so the layers above must explain the data first: the
    most important factors settle at the top before the lower layers join (the idea of progressive VLAE training).
    The model is the same VLAE afterwards; every gain is 1 once ``step >= L * fade_in``.

    :returns: a list of gains for ``z_1 .. z_{L-1}``.
    """
    if fade_in <= 0:
        return [1.0] * (num_layers - 1)
    gains = []
    for l in range(1, num_layers):
        start = (num_layers - l) * fade_in
        gains.append(min(1.0, max(0.0, (step - start) / fade_in)))
    return gains
