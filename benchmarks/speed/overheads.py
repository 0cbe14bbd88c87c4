"""Where a Pyro training step's time goes, and what each candidate change buys.

On the VLAE of ``--exp-preset`` (``mnist-cpu`` by default) at batch 100, timed alternately in one process (A B A B
..., median over repeats) against the Pyro SVI step that training takes (``Trace_ELBO`` + ``FusedAdam``):
Pyro's per-parameter Adam, torch Adam's default per-tensor loop, validation, ``pyro.module`` registration,
``channels_last``, one thread against two, ``JitTrace_ELBO`` and ``torch.compile`` of the networks (in a child process
with a time cap); then a cProfile of the Pyro step.

    python benchmarks/speed/overheads.py              # ~3 minutes on 2 CPU cores
    python benchmarks/speed/overheads.py --quick      # smoke check
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import json
import os
import pstats
import subprocess
import sys
import time

import pyro
import torch
from harness import KL_SCALE, alternate, hand_step_fn, load_line, machine_line, make_case, timing_parser
from pyro.infer import SVI, JitTrace_ELBO, Trace_ELBO

from pyro_vlae.training.optim import FusedAdam, fused_supported

# Validation is off in every variant unless named: training validates its first 10 steps only (see fit).
BASE = "Pyro SVI step (baseline: FusedAdam, validation off, as training)"

_REAL_MODULE = pyro.module


def set_state(threads, validation=False, skip_module_registration=False):
    torch.set_num_threads(threads)
    pyro.enable_validation(validation)
    # PyroModule.__getattr__ calls ``pyro.module`` (looked up on the package) for every plain nn.Module child each
    # time it is accessed; this turns that registration off.  Only valid with an optimiser that already holds the
    # parameters (the torch Adam below): Pyro's optimisers then see no parameters.
    pyro.module = (lambda name, module, *a, **k: module) if skip_module_registration else _REAL_MODULE


def elbo_torch_adam_step(model, guide, x, lr, elbo):
    params = list(model.parameters()) + list(guide.parameters())
    opt = torch.optim.Adam(params, lr=lr, **({"fused": True} if fused_supported(x.device) else {}))

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
    # channels_last only for the hand-written step: Pyro's param store keeps a .contiguous() copy of every parameter
    # it registers, so a channels_last conv weight would be stepped as a copy while the network trains on nothing.
    cl_hand = hand_step_fn(cl_model, cl_guide, x.contiguous(memory_format=torch.channels_last), lr)
    per_param_svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
    variants = {
        BASE: (base, pyro_step),
        "hand-written step (baseline: fused torch Adam)": (base, hand),
        "Pyro SVI step, pyro.optim.Adam (one torch Adam per parameter)": (
            base,
            lambda: per_param_svi.step(x, kl_scale=KL_SCALE),
        ),
        "hand-written step, torch Adam's default per-tensor loop": (
            base,
            hand_step_fn(model, guide, x, lr, fused=False),
        ),
        "Pyro SVI step, validation on (as the first 10 steps of training)": (
            lambda: set_state(T, validation=True),
            pyro_step,
        ),
        "Trace_ELBO.differentiable_loss + fused torch Adam, no pyro.module registration": (
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
    jit_svi = SVI(model, guide, FusedAdam({"lr": lr}), JitTrace_ELBO(ignore_jit_warnings=True))
    jit = {
        BASE: (base, pyro_step),
        "Pyro SVI with JitTrace_ELBO": (base, lambda: jit_svi.step(x, kl_scale=KL_SCALE)),
    }
    res_jit = alternate(jit, args.steps, args.repeats, device)
    ref = res[BASE]
    res["Pyro SVI with JitTrace_ELBO"] = res_jit["Pyro SVI with JitTrace_ELBO"]
    if not isinstance(res["Pyro SVI with JitTrace_ELBO"], str):
        res["Pyro SVI with JitTrace_ELBO"] *= ref / res_jit[BASE]  # rescaled to ref
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


def main(args):
    if args.compile_child:
        return compile_child(args)
    device = torch.device(args.device)
    if args.quick:
        args.steps, args.repeats = min(args.steps, 3), min(args.repeats, 3)
    set_state(args.threads)
    print(f"machine: {machine_line(device)}")
    print(f"before: {load_line()}", flush=True)
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
    p = timing_parser(__doc__, "smoke check: few steps, no torch.compile")
    p.add_argument("--exp-preset", default="mnist-cpu", help="preset of the VLAE under study")
    p.add_argument("--compile-timeout", type=int, default=150, help="seconds allowed for the torch.compile child")
    p.add_argument("--compile-child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
