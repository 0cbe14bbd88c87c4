"""Rendering speed of the procedural datasets on the CPU: numpy against the torch renderers, side by side.

    OMP_NUM_THREADS=1 python benchmarks/speed/render_speed.py [PAIRS]

For shapes3d and sprites at 32 and 64 px: 512 random items per batch, numpy (``dataset.images``) and the torch
renderer on the CPU (``dataset.renderer("cpu")``) on the same items in interleaved pairs (order alternating), after
one warm-up pair; the images are asserted equal on every batch.  Prints ms per batch (median and min) and the median
of the per-pair ratio torch / numpy with its quartiles: the ratio within a pair is what survives a loaded machine.
"""

from __future__ import annotations

import sys
import time
from functools import partial

import numpy as np
import torch

from pyro_vlae.data import load_data


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(pairs: int = 30) -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, numpy {np.__version__}, one thread, batch 512, {pairs} pairs")
    for name in ("shapes3d", "sprites"):
        for size in (32, 64):
            ds = load_data(name, "unused", 8, **{f"{name}_size": size}).train
            renderer = ds.renderer("cpu")
            rng = np.random.default_rng(size)
            tn, tt = [], []
            for rep in range(pairs + 1):
                items = rng.integers(0, len(ds), 512)
                ti = torch.from_numpy(items)
                runs = [("numpy", partial(ds.images, items)), ("torch", partial(renderer, ti))]
                out = {key: _timed(fn) for key, fn in (runs if rep % 2 else runs[::-1])}
                assert torch.equal(out["numpy"][0], out["torch"][0]), f"{name} {size} px: the renderers differ"
                if rep:  # the first pair fills caches
                    tn.append(out["numpy"][1])
                    tt.append(out["torch"][1])
            tn, tt = np.array(tn) * 1e3, np.array(tt) * 1e3
            q = np.percentile(tt / tn, [25, 50, 75])
            print(
                f"{name:8s} {size} px  numpy median {np.median(tn):6.1f} min {tn.min():6.1f} ms | torch median "
                f"{np.median(tt):6.1f} min {tt.min():6.1f} ms | torch/numpy per pair: median {q[1]:.2f} "
                f"(quartiles {q[0]:.2f}-{q[2]:.2f}) | equal on every batch",
                flush=True,
            )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
