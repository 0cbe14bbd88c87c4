"""Training, generation and IWAE throughput: a Pyro SVI step against a hand-written PyTorch step of the same networks.

For the VLAE and the Markov HVAE on the ``mnist`` (reference-sized) and ``mnist-cpu`` presets at batch 100, it times

* ``svi.step(x, kl_scale=0.5)``, exactly what training does (``Trace_ELBO``, ``FusedAdam``,
  Pyro's validation off as after training's first 10 steps), and
* a hand-written step on the *same* ``nn.Module`` weights (``harness.hand_loss``: reparameterised samples, the
  Laplace log-likelihood and each layer's ``log q - log p`` in closed form, ``backward`` and one fused
  ``torch.optim.Adam`` step).  Both losses are checked to agree on the same noise before timing.

The two run alternately (A B A B ...) in one process, so a background load hits both alike; the ratio of the medians
is the figure to quote.  FLOPs per step (forward + backward) come from ``FlopCounterMode``; the achieved FLOP/s is
compared with the ``torch.mm`` FLOP/s measured in the same run.  Then generation and IWAE (K = 1000) throughput.
Where the remaining time goes: ``benchmarks/overheads.py``.

    python benchmarks/speed.py                  # full run, ~2 minutes on 2 CPU cores
    python benchmarks/speed.py --quick          # smoke check
    python benchmarks/speed.py --device cuda --batch-sizes 100,1000 --json speed.json   # on a GPU, two batch sizes

``--presets`` and ``--batch-sizes`` choose the cases (the hand-written step needs a Laplace preset); ``--json`` also
writes every row as a record (``benchmarks/gpu_check.py`` reads it).
"""

from __future__ import annotations

import argparse
import json

import pyro
import torch
from harness import (
    BATCH,
    KL_SCALE,
    alternate,
    check_same_loss,
    count_flops,
    generation_rate,
    hand_step_fn,
    iwae_rate,
    load_line,
    machine_line,
    make_case,
    matmul_gflops,
    timing_parser,
)


def main(args):
    device = torch.device(args.device)
    if args.quick:
        args.steps, args.repeats = min(args.steps, 3), min(args.repeats, 3)
    torch.set_num_threads(args.threads)
    pyro.enable_validation(False)  # as training runs after its first 10 validated steps (pyro_vlae.training.loop.fit)
    torch.manual_seed(0)
    print(f"machine: {machine_line(device)}")
    print(f"before: {load_line()}", flush=True)

    mm = {
        "100x6272 @ 6272x1024": matmul_gflops(device, BATCH, 6272, 1024),
        "100x1024 @ 1024x1024": matmul_gflops(device, BATCH, 1024, 1024),
        "2048x2048 @ 2048x2048": matmul_gflops(device, 2048, 2048, 2048),
    }
    ceiling = max(mm.values())
    print("\nfloat32 torch.mm: " + ", ".join(f"{k}: {v:.1f} GFLOP/s" for k, v in mm.items()), flush=True)

    main_rows, side_rows, records = [], [], []
    presets = args.presets.split(",") if args.presets else ["mnist-cpu"] if args.quick else ["mnist", "mnist-cpu"]
    cases = [(kind, preset) for preset in presets for kind in ("vlae", "hvae")]
    for batch in args.batch_sizes:
        for kind, preset in cases:
            rec = measure_case(kind, preset, batch, device, args)
            records.append(rec)
            main_rows.append(
                f"| {kind} | {preset} | {batch} | {rec['pyro_img_s']:.0f} | {rec['hand_img_s']:.0f} | "
                f"{rec['pyro_over_hand']:.3f} | {rec['loss']:.1f} | "
                f"{rec['loss_diff']:.1e} / {rec['rel_grad_diff']:.1e} | "
                f"{rec['gflop_per_step']:.2f} | {rec['gflops_pyro']:.1f} / {rec['gflops_hand']:.1f} | "
                f"{rec['gflops_pyro'] / ceiling:.0%} / {rec['gflops_hand'] / ceiling:.0%} |"
            )
            side_rows.append(
                f"| {kind} | {preset} | {batch} | {rec['generation_img_s']:.0f} | {rec['iwae_img_s']:.2f} "
                f"(K={args.iwae_k}, {args.iwae_images} images) |"
            )
            print(f"done {kind} {preset} batch {batch} ({load_line()})", flush=True)

    print(f"\n### Training step, kl_scale {KL_SCALE} ({args.steps} steps x {args.repeats} repeats)\n")
    print(
        "| model | preset | batch | Pyro img/s | hand-written img/s | Pyro / hand | loss | "
        "loss diff / rel. grad diff | GFLOP/step | GFLOP/s Pyro / hand | of mm ceiling Pyro / hand |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(main_rows))
    print(f"\nmm ceiling used: {ceiling:.1f} GFLOP/s (the best of the three torch.mm shapes above)")
    print("\n### Generation and IWAE evaluation (eval mode, no grad)\n")
    print("| model | preset | training batch | generation img/s (`model(batch_size=1000)`) | IWAE img/s |")
    print("|---|---|---|---|---|")
    print("\n".join(side_rows), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_line(device), "mm_gflops": mm, "rows": records}, f, indent=2)

    print("\nOverhead experiments: python benchmarks/overheads.py")
    print(f"\nafter: {load_line()}")


def measure_case(kind, preset, batch, device, args) -> dict:
    """One row: Pyro and hand-written img/s at ``batch`` (alternating), FLOPs, generation and IWAE rates."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, guide, svi, x, lr = make_case(kind, preset, device, batch=batch)
    loss, dloss, dgrad = check_same_loss(model, guide, x)
    flops = count_flops(model, guide, x)
    variants = {
        "pyro": (lambda: None, lambda svi=svi, x=x: svi.step(x, kl_scale=KL_SCALE)),
        "hand": (lambda: None, hand_step_fn(model, guide, x, lr)),
    }
    r = alternate(variants, args.steps, args.repeats, device, batch=batch)
    for name, rate in r.items():
        if isinstance(rate, str):
            raise RuntimeError(f"{kind} {preset} batch {batch}: the {name} step failed: {rate}")
    gen = generation_rate(model, device)
    ix = torch.rand(args.iwae_images, *model.config.image_shape, device=device)
    iw = iwae_rate(model, guide, ix, args.iwae_k)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "model": kind, "preset": preset, "batch": batch, "pyro_img_s": r["pyro"], "hand_img_s": r["hand"],
        "pyro_over_hand": r["pyro"] / r["hand"], "loss": loss, "loss_diff": dloss, "rel_grad_diff": dgrad,
        "gflop_per_step": flops / 1e9, "gflops_pyro": flops * r["pyro"] / batch / 1e9,
        "gflops_hand": flops * r["hand"] / batch / 1e9, "generation_img_s": gen, "iwae_img_s": iw,
        "iwae_k": args.iwae_k, "peak_gpu_mib": peak,
    }  # fmt: skip


def _sizes(text):
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of sizes, e.g. 100,1000") from None
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text}")
    return sizes


def parse_args(argv=None):
    p = timing_parser(__doc__, "smoke check: mnist-cpu only, few steps")
    p.add_argument("--iwae-k", type=int, default=1000)
    p.add_argument("--iwae-images", type=int, default=10)
    p.add_argument("--batch-sizes", type=_sizes, default=[BATCH], help="comma-separated training batch sizes (100)")
    p.add_argument("--presets", help="comma-separated Laplace presets (default: mnist,mnist-cpu; --quick: mnist-cpu)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON records to PATH")
    args = p.parse_args(argv)
    if args.quick:
        args.iwae_k, args.iwae_images = min(args.iwae_k, 100), min(args.iwae_images, 4)
    return args


if __name__ == "__main__":
    main(parse_args())
