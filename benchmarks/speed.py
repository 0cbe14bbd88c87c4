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
    python benchmarks/speed.py --device cuda    # the same tables on a GPU
"""

from __future__ import annotations

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

CASES = [("vlae", "mnist"), ("hvae", "mnist"), ("vlae", "mnist-cpu"), ("hvae", "mnist-cpu")]


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

    main_rows, side_rows = [], []
    cases = CASES if not args.quick else [c for c in CASES if c[1] == "mnist-cpu"]
    for kind, preset in cases:
        model, guide, svi, x, lr = make_case(kind, preset, device)
        loss, dloss, dgrad = check_same_loss(model, guide, x)
        flops = count_flops(model, guide, x)
        variants = {
            "pyro": (lambda: None, lambda svi=svi, x=x: svi.step(x, kl_scale=KL_SCALE)),
            "hand": (lambda: None, hand_step_fn(model, guide, x, lr)),
        }
        r = alternate(variants, args.steps, args.repeats, device)
        achieved = flops * r["hand"] / BATCH / 1e9
        achieved_pyro = flops * r["pyro"] / BATCH / 1e9
        main_rows.append(
            f"| {kind} | {preset} | {r['pyro']:.0f} | {r['hand']:.0f} | {r['pyro'] / r['hand']:.3f} | "
            f"{loss:.1f} | {dloss:.1e} / {dgrad:.1e} | {flops / 1e9:.2f} | {achieved_pyro:.1f} / {achieved:.1f} | "
            f"{achieved_pyro / ceiling:.0%} / {achieved / ceiling:.0%} |"
        )
        gen = generation_rate(model, device)
        ix = torch.rand(args.iwae_images, *model.config.image_shape, device=device)
        iw = iwae_rate(model, guide, ix, args.iwae_k)
        side_rows.append(f"| {kind} | {preset} | {gen:.0f} | {iw:.2f} (K={args.iwae_k}, {args.iwae_images} images) |")
        print(f"done {kind} {preset} ({load_line()})", flush=True)

    print(f"\n### Training step, batch {BATCH}, kl_scale {KL_SCALE} ({args.steps} steps x {args.repeats} repeats)\n")
    print(
        "| model | preset | Pyro img/s | hand-written img/s | Pyro / hand | loss | loss diff / rel. grad diff | "
        "GFLOP/step | GFLOP/s Pyro / hand | of mm ceiling Pyro / hand |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(main_rows))
    print(f"\nmm ceiling used: {ceiling:.1f} GFLOP/s (the best of the three torch.mm shapes above)")
    print("\n### Generation and IWAE evaluation (eval mode, no grad)\n")
    print("| model | preset | generation img/s (`model(batch_size=1000)`) | IWAE img/s |")
    print("|---|---|---|---|")
    print("\n".join(side_rows), flush=True)

    print("\nOverhead experiments: python benchmarks/overheads.py")
    print(f"\nafter: {load_line()}")


def parse_args(argv=None):
    p = timing_parser(__doc__, "smoke check: mnist-cpu only, few steps")
    p.add_argument("--iwae-k", type=int, default=1000)
    p.add_argument("--iwae-images", type=int, default=10)
    args = p.parse_args(argv)
    if args.quick:
        args.iwae_k, args.iwae_images = min(args.iwae_k, 100), min(args.iwae_images, 4)
    return args


if __name__ == "__main__":
    main(parse_args())
