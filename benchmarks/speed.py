"""Training, generation and IWAE throughput: a Pyro SVI step against a hand-written PyTorch step of the same networks.

For the VLAE and the Markov HVAE on the ``mnist`` (reference-sized) and ``mnist-cpu`` presets at batch 100, it times

* ``svi.step(x, kl_scale=0.5)``, exactly what training does (``Trace_ELBO``, Pyro's Adam), and
* a hand-written step on the *same* ``nn.Module`` weights: reparameterised samples, the Laplace log-likelihood and
  each layer's ``log q - log p`` in closed form, summed as ``Trace_ELBO`` sums them, ``backward`` and one
  ``torch.optim.Adam`` step.  Both losses are checked to agree on the same noise before timing.

The variants run alternately (A B A B ...) in one process, so a background load hits both alike; the ratio of the
medians is the figure to quote.  FLOPs per step (forward + backward) come from ``FlopCounterMode``; the achieved
FLOP/s is compared with the ``torch.mm`` FLOP/s measured in the same run.  Then overhead experiments (threads,
``channels_last``, validation, Pyro's per-parameter Adam, ``pyro.module`` registration, ``JitTrace_ELBO``,
``torch.compile``), generation throughput and IWAE (K = 1000) throughput.

    python benchmarks/speed.py                  # full run, ~10-15 minutes on 2 CPU cores
    python benchmarks/speed.py --quick          # smoke check, under ~2 minutes
    python benchmarks/speed.py --device cuda    # same tables on a GPU (untested)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import json
import math
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time

import pyro
import torch
from pyro.infer import SVI, JitTrace_ELBO, Trace_ELBO

from pyro_vlae.metrics import importance_log_likelihood
from pyro_vlae.nets import squash
from pyro_vlae.presets import get_preset
from pyro_vlae.train import RunConfig, build

KL_SCALE = 0.5
BATCH = 100
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
CASES = [("vlae", "mnist"), ("hvae", "mnist"), ("vlae", "mnist-cpu"), ("hvae", "mnist-cpu")]


# ---------------------------------------------------------------------------------------------------------------------
# Machine and timing helpers.


def machine_line(device) -> str:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    gpu = f", GPU {torch.cuda.get_device_name()}" if device.type == "cuda" else ""
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, pyro {pyro.__version__}, "
        f"{torch.get_num_threads()} torch threads{gpu}"
    )


def load_line() -> str:
    with contextlib.suppress(OSError), open("/proc/loadavg") as f:
        return "load average " + " ".join(f.read().split()[:3])
    return "load average unknown"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def alternate(variants: dict, steps: int, repeats: int, device, batch: int = BATCH) -> dict:
    """Median images/s of each variant, timed in turn (A B A B ...).

    :param variants: name -> ``(prepare, step)``; ``prepare()`` sets global state before a block, ``step()`` is one
        training step on ``batch`` images.  A variant whose step raises is reported as the error text.
    """
    rates, errors = {k: [] for k in variants}, {}
    for _ in range(2):  # warm-up (allocator, lazy init)
        for name, (prepare, step) in variants.items():
            try:
                prepare()
                step()
            except Exception as e:  # noqa: BLE001 - record and move on
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    for _ in range(repeats):
        for name, (prepare, step) in variants.items():
            if name in errors:
                continue
            prepare()
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            sync(device)
            rates[name].append(steps * batch / (time.perf_counter() - t0))
    return {k: errors.get(k) or statistics.median(v) for k, v in rates.items()}


def matmul_gflops(device, m, k, n, repeats=5) -> float:
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    reps = max(1, int(2e9 / (2 * m * k * n)))  # ~2 GFLOP per timing
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * m * k * n * reps / statistics.median(times) / 1e9


# ---------------------------------------------------------------------------------------------------------------------
# The hand-written step: same modules, same loss, no Pyro.


def normal_logpdf(z, loc, scale):
    return -0.5 * ((z - loc) / scale) ** 2 - torch.log(scale) - HALF_LOG_2PI


def recon_logpdf(model, raw, x):
    like = model.likelihood
    assert like.kind == "laplace", "the hand-written step implements the Laplace likelihood of the mnist presets"
    b = like.obs_scale
    return (-(x - squash(raw, like.value_range)).abs() / b - math.log(2 * b)).sum()


def hand_loss(model, guide, x, kl_scale):
    """``-ELBO`` with latent terms scaled by ``kl_scale``, summed over the batch, as ``Trace_ELBO`` computes it.

    Draws the noise in the guide's site order (z1, z2, ...) so a fixed seed gives Pyro's samples.
    """
    kl = x.new_zeros(())
    if hasattr(model, "decode"):  # VLAE: q(z_l | x) for every layer, prior N(0, I)
        zs = []
        for loc, scale in guide.posterior(x):
            z = loc + scale * torch.randn_like(loc)
            kl = kl + (normal_logpdf(z, loc, scale) + 0.5 * z**2 + HALF_LOG_2PI).sum()
            zs.append(z)
        raw = model.decode(zs)
    else:  # Markov / autoregressive HVAE: q(z_1|x) q(z_l|z_{l-1}), p(z_L) p(z_l|z_{l+1})
        zs, h = [], x
        for net in guide.conditionals:
            loc, scale = net(h)
            h = loc + scale * torch.randn_like(loc)
            kl = kl + normal_logpdf(h, loc, scale).sum()
            zs.append(h)
        kl = kl + (0.5 * zs[-1] ** 2 + HALF_LOG_2PI).sum()
        for l in range(len(zs) - 1, 0, -1):
            parent = torch.cat(zs[l:], dim=-1) if model.autoregressive else zs[l]
            loc, scale = model.conditionals[l - 1](parent)
            kl = kl - normal_logpdf(zs[l - 1], loc, scale).sum()
        raw = model.decoder(zs[0])
    return -(recon_logpdf(model, raw, x) - kl_scale * kl)


def hand_step_fn(model, guide, x, lr, loss_fn=hand_loss):
    params = list(model.parameters()) + list(guide.parameters())
    opt = torch.optim.Adam(params, lr=lr)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, guide, x, KL_SCALE)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def check_same_loss(model, guide, x, seed=1) -> tuple:
    """Pyro's and the hand-written loss (and gradients) on the same noise: returns (loss, |dloss|, max |dgrad|)."""
    params = list(model.parameters()) + list(guide.parameters())
    pyro.set_rng_seed(seed)
    lp = Trace_ELBO().differentiable_loss(model, guide, x, kl_scale=KL_SCALE)
    gp = torch.autograd.grad(lp, params, allow_unused=True)
    pyro.set_rng_seed(seed)
    lh = hand_loss(model, guide, x, KL_SCALE)
    gh = torch.autograd.grad(lh, params, allow_unused=True)
    pairs = [(a, b) for a, b in zip(gp, gh) if a is not None and b is not None]
    dg = max(float((a - b).abs().max()) for a, b in pairs) / max(float(a.abs().max()) for a, _ in pairs)
    return lp.item(), abs(lp.item() - lh.item()), dg


def count_flops(model, guide, x) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        hand_loss(model, guide, x, KL_SCALE).backward()
    model.zero_grad(set_to_none=True), guide.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def make_case(kind, preset_name, device, seed=0):
    preset = get_preset(preset_name)
    config = RunConfig(model_kind=kind, dataset="mnist", preset=preset_name, model=preset.model, train=preset.train)
    pyro.set_rng_seed(seed)
    model, guide, _, svi = build(config, device)
    x = torch.rand(BATCH, *preset.model.image_shape, device=device)  # timing does not depend on pixel values
    return model, guide, svi, x, preset.train.lr


# ---------------------------------------------------------------------------------------------------------------------
# Global switches the overhead experiments toggle; every variant's prepare() sets all of them.

_REAL_MODULE = pyro.module


def set_state(threads, validation=True, skip_module_registration=False):
    torch.set_num_threads(threads)
    pyro.enable_validation(validation)
    # PyroModule.__getattr__ calls ``pyro.module`` (looked up on the package) for every plain nn.Module child each
    # time it is accessed; this turns that registration off.  Only valid with an optimiser that already holds the
    # parameters (torch.optim.Adam below): Pyro's own optimiser then sees no parameters.
    pyro.module = (lambda name, module, *a, **k: module) if skip_module_registration else _REAL_MODULE


def elbo_torch_adam_step(model, guide, x, lr, elbo):
    opt = torch.optim.Adam(list(model.parameters()) + list(guide.parameters()), lr=lr)

    def step():
        opt.zero_grad(set_to_none=True)
        # differentiable_loss + backward, not loss_and_grads: the latter skips backward when the trace holds no
        # param sites, which is the case once registration is switched off.
        loss = elbo.differentiable_loss(model, guide, x, kl_scale=KL_SCALE)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def experiments(args, device) -> list:
    """Overhead experiments on the VLAE of ``--exp-preset``; returns Markdown table rows."""
    T = args.threads
    model, guide, svi, x, lr = make_case("vlae", args.exp_preset, device)
    base = lambda: set_state(T)  # noqa: E731
    pyro_step = lambda: svi.step(x, kl_scale=KL_SCALE)  # noqa: E731
    hand = hand_step_fn(model, guide, x, lr)
    cl_model, cl_guide = (copy.deepcopy(m).to(memory_format=torch.channels_last) for m in (model, guide))
    cl_hand = hand_step_fn(cl_model, cl_guide, x.contiguous(memory_format=torch.channels_last), lr)
    variants = {
        "Pyro SVI step (baseline)": (base, pyro_step),
        "hand-written step (baseline)": (base, hand),
        "Pyro, validation off": (lambda: set_state(T, validation=False), pyro_step),
        "Trace_ELBO.differentiable_loss + one torch Adam": (
            base,
            elbo_torch_adam_step(model, guide, x, lr, Trace_ELBO()),
        ),
        "same, no pyro.module registration, validation off": (
            lambda: set_state(T, validation=False, skip_module_registration=True),
            elbo_torch_adam_step(model, guide, x, lr, Trace_ELBO()),
        ),
        "hand-written, channels_last": (base, cl_hand),
    }
    if device.type == "cpu" and T != 1:
        variants["Pyro SVI step, 1 thread"] = (lambda: set_state(1), pyro_step)
        variants["hand-written step, 1 thread"] = (lambda: set_state(1), hand)
    res = alternate(variants, args.steps, args.repeats, device)
    set_state(T)
    # JitTrace_ELBO runs last and apart: its traced step holds on to the parameters it saw, so it is not
    # interleaved with the other variants.  Its first steps (tracing) are the warm-up.
    jit_svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), JitTrace_ELBO(ignore_jit_warnings=True))
    jit = {
        "Pyro SVI step (baseline)": (base, pyro_step),
        "Pyro SVI with JitTrace_ELBO": (base, lambda: jit_svi.step(x, kl_scale=KL_SCALE)),
    }
    res_jit = alternate(jit, args.steps, args.repeats, device)
    ref = res["Pyro SVI step (baseline)"]
    res["Pyro SVI with JitTrace_ELBO"] = res_jit["Pyro SVI with JitTrace_ELBO"]
    if not isinstance(res["Pyro SVI with JitTrace_ELBO"], str):
        res["Pyro SVI with JitTrace_ELBO"] *= ref / res_jit["Pyro SVI step (baseline)"]  # rescaled to ref
    rows = []
    for name, r in res.items():
        if isinstance(r, str):
            rows.append(f"| {name} | failed: {r} | |")
        else:
            rows.append(f"| {name} | {r:.0f} | {r / ref:.3f} |")
    return rows


def profile_pyro_step(args, device, top=12) -> str:
    """cProfile of Pyro SVI steps on the ``--exp-preset`` VLAE: the functions with the most own time."""
    set_state(args.threads)
    _, _, svi, x, _ = make_case("vlae", args.exp_preset, device)
    svi.step(x, kl_scale=KL_SCALE)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(5):
        svi.step(x, kl_scale=KL_SCALE)
    prof.disable()
    stats = pstats.Stats(prof)
    total = stats.total_tt
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]
    lines = [f"cProfile of 5 Pyro SVI steps ({total:.2f} s, own time per function):"]
    for (file, line, fn), (_, ncalls, tottime, _, _) in rows:
        where = f"{os.path.basename(os.path.dirname(file))}/{os.path.basename(file)}:{line}" if line else "builtin"
        lines.append(f"  {tottime / total:6.1%}  {ncalls / 5:8.0f} calls/step  {fn}  ({where})")
    return "\n".join(lines)


def compile_child(args) -> None:
    """Run in a subprocess with a time cap: eager vs ``torch.compile``d networks, Pyro and hand-written steps."""
    device = torch.device(args.device)
    set_state(args.threads)
    model, guide, svi, x, lr = make_case("vlae", args.exp_preset, device)
    hand = hand_step_fn(model, guide, x, lr)
    variants = {"pyro": (lambda: None, lambda: svi.step(x, kl_scale=KL_SCALE)), "hand": (lambda: None, hand)}
    eager = alternate(variants, args.steps, args.repeats, device)
    for module in (model, guide):
        for child in module.children():
            child.compile()
    t0 = time.perf_counter()
    svi.step(x, kl_scale=KL_SCALE), hand()
    svi.step(x, kl_scale=KL_SCALE), hand()
    compile_s = time.perf_counter() - t0
    compiled = alternate(variants, args.steps, args.repeats, device)
    print(json.dumps({"eager": eager, "compiled": compiled, "compile_s": compile_s}))


def compile_experiment(args) -> list:
    cmd = [sys.executable, __file__, "--compile-child", "--device", args.device, "--threads", str(args.threads)]
    cmd += ["--exp-preset", args.exp_preset, "--steps", str(args.steps), "--repeats", str(args.repeats)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.compile_timeout)
    except subprocess.TimeoutExpired:
        return [f"| torch.compile of the networks | not finished within {args.compile_timeout} s | |"]
    if out.returncode != 0:
        err = (out.stderr.strip().splitlines() or ["?"])[-1][:150]
        return [f"| torch.compile of the networks | failed: {err} | |"]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    rows = []
    for k, label in (("pyro", "Pyro SVI step"), ("hand", "hand-written step")):
        e, c = r["eager"][k], r["compiled"][k]
        rows.append(
            f"| {label}, torch.compile'd networks (child process, vs its own eager {e:.0f}) | {c:.0f} | "
            f"{c / e:.3f} vs eager |"
        )
    rows.append(f"| (compile time of the first two steps: {r['compile_s']:.0f} s) | | |")
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Generation and IWAE throughput.


def generation_rate(model, device, n=1000, repeats=3) -> float:
    was = model.training
    model.eval()
    times = []
    with torch.no_grad():
        model(batch_size=n)
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            model(batch_size=n)
            sync(device)
            times.append(time.perf_counter() - t0)
    model.train(was)
    return n / statistics.median(times)


def iwae_rate(model, guide, x, k) -> float:
    importance_log_likelihood(model, guide, x[:2], num_samples=min(k, 20))  # warm-up
    sync(x.device)
    t0 = time.perf_counter()
    importance_log_likelihood(model, guide, x, num_samples=k)
    sync(x.device)
    return x.shape[0] / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------------------------


def main(args):
    if args.compile_child:
        return compile_child(args)
    device = torch.device(args.device)
    if args.quick:
        args.steps, args.repeats = min(args.steps, 3), min(args.repeats, 3)
    set_state(args.threads)
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

    if not args.skip_experiments:
        print(f"\n### Overhead experiments (VLAE, {args.exp_preset}, alternating, {args.threads} threads)\n")
        print("| variant | img/s | vs Pyro baseline |")
        print("|---|---|---|")
        print("\n".join(experiments(args, device)), flush=True)
        if not args.quick:
            print("\n".join(compile_experiment(args)))
        print()
        print(profile_pyro_step(args, device))
    print(f"\nafter: {load_line()}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke check: mnist-cpu only, few steps, no torch.compile")
    p.add_argument("--repeats", type=int, default=4, help="alternating timing blocks per variant")
    p.add_argument("--steps", type=int, default=5, help="training steps per timing block")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for the main tables")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda untested)")
    p.add_argument("--exp-preset", default="mnist-cpu", help="preset of the overhead experiments")
    p.add_argument("--iwae-k", type=int, default=1000)
    p.add_argument("--iwae-images", type=int, default=10)
    p.add_argument("--compile-timeout", type=int, default=150, help="seconds allowed for the torch.compile child")
    p.add_argument("--skip-experiments", action="store_true")
    p.add_argument("--compile-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.iwae_k, args.iwae_images = min(args.iwae_k, 100), min(args.iwae_images, 4)
    return args


if __name__ == "__main__":
    main(parse_args())
