"""Training throughput in four modes, the GPU-busy fraction and the kernel-time limit, for the VLAE and the Markov HVAE.

For each case (preset and batch) it times, on the same networks:

* ``hand``: a hand-written eager PyTorch step (``harness.hand_loss``: reparameterised samples, the Laplace
  log-likelihood and each layer's ``log q - log p`` in closed form, ``backward``, one fused ``torch.optim.Adam``
  step; the loss is not read);
* ``svi``: ``pyro.infer.SVI.step`` with ``Trace_ELBO`` and ``FusedAdam``, validation off, as training ran before the
  graph-safe step (it reads the loss on the host every step);
* ``safe``: the graph-safe step of ``pyro_vlae.training.step`` eagerly (the same loss, no host read);
* ``graph``: the same step captured in a CUDA graph and replayed (CUDA only).

The modes run alternately (A B C D A B C D ...) in one process, so a background load hits them alike; each figure is
the median over the repeats.  The hand-written loss is checked against Pyro's on the same noise first.  On CUDA the
profiler gives each mode's kernel time per step (``harness.kernel_ms``; the graph's from its own replays when the
profiler sees its kernels, else the eager graph-safe step's); the GPU-busy fraction is kernel time x steps/s, and the
limit is 1 / the least kernel time per step, the rate with every host overhead removed.

    python benchmarks/speed/speed.py                         # CPU: mnist and mnist-cpu at batch 100, ~3 minutes
    python benchmarks/speed/speed.py --quick                 # smoke check
    python benchmarks/speed/speed.py --device cuda --json speed.json   # mnist-cpu:100, mnist:100, shapes3d-32:512,
                                                                 # shapes3d:256 (benchmarks/gpu/gpu_check.py runs this)

``--cases preset:batch,...`` chooses the cases (the hand-written step needs a Laplace preset).  ``--json`` writes every
row as a record, rewritten after each case (``benchmarks/gpu/gpu_check.py`` and ``paper_scale.py`` read it).
``--no-graph`` leaves the CUDA graph out.

Faults cost one row: each case (model, preset, batch) runs in its own ``try``, and a case that fails gives a row that
says what failed.  On CUDA a failed case or a failed graph capture or warm-up may leave the process's CUDA context or
generator unusable (a failed capture can), so the cases after it run in a fresh process (this script with ``--rows``
and ``--append``, which applies the same rule in turn).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import pyro
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gpu"))
from gpu_report import speed_table  # noqa: E402  (benchmarks/gpu/: the table the GPU check reports)
from harness import (  # noqa: E402
    BATCH,
    KL_SCALE,
    alternate,
    check_same_loss,
    count_flops,
    generation_rate,
    hand_step_fn,
    iwae_rate,
    kernel_ms,
    load_line,
    machine_line,
    make_case,
    matmul_gflops,
    timing_parser,
)

from pyro_vlae.training.optim import FusedAdam

KINDS = ("vlae", "hvae")
CPU_CASES = [("mnist", BATCH), ("mnist-cpu", BATCH)]
CUDA_CASES = [("mnist-cpu", 100), ("mnist", 100), ("shapes3d-32", 512), ("shapes3d", 256)]
GRAPH_WARMUP = 8  # steps before timing: the first (parameters), the validated ones are off, 3 warm-up, the capture


def step_module():
    """``pyro_vlae.training.step``, or the reason it cannot be used."""
    try:
        from pyro_vlae.training import step as S

        S.make_step  # noqa: B018 - the interface speed.py uses
        return S, None
    except (ImportError, AttributeError) as e:
        return None, f"pyro_vlae.training.step is not usable here ({type(e).__name__}: {e})"


def build_modes(model, guide, svi, x, lr, device, graph_on=True) -> tuple:
    """``(variants, why_not)``: name -> ``(prepare, step)`` for :func:`harness.alternate`, and name -> reason for the
    modes that cannot run here.

    Every mode trains the same networks (Pyro's param store holds one copy of each parameter name, so copies of the
    networks would not be trained by their own modes).  The hand-written step has its own torch Adam, the SVI and
    graph-safe eager steps share the run's ``FusedAdam``, and the graph gets one of its own (capture makes it
    capturable, which the eager steps must not inherit).
    """
    S, missing = step_module()
    variants = {
        "hand": (lambda: None, hand_step_fn(model, guide, x, lr, read=False)),
        "svi": (lambda: None, lambda: svi.step(x, kl_scale=KL_SCALE)),
    }
    why_not = {"safe": missing, "graph": missing} if missing else {}
    if not missing:
        safe = S.make_step(model, guide, svi.optim, "trace", device, graph=False)
        variants["safe"] = (lambda: None, lambda: safe.step(x, kl_scale=KL_SCALE))
    if not missing and device.type != "cuda":
        why_not["graph"] = "needs CUDA"
    elif not missing and not graph_on:
        why_not["graph"] = "left out (--no-graph)"
    elif not missing:
        variants.update(graph_mode(S, model, guide, x, lr, device, why_not))
    return variants, why_not


def graph_mode(S, model, guide, x, lr, device, why_not: dict) -> dict:
    """``{"graph": (prepare, step)}`` once :data:`GRAPH_WARMUP` steps have captured it; else ``{}`` and the reason in
    ``why_not`` (a capture the step swallowed, or any exception in the warm-up or the capture)."""
    warned = []
    try:
        graph = S.make_step(model, guide, FusedAdam({"lr": lr}), "trace", device, graph=True, warn=warned.append)
        fn = lambda: graph.step(x, kl_scale=KL_SCALE)  # noqa: E731
        for _ in range(GRAPH_WARMUP):
            fn()
    except Exception as e:  # noqa: BLE001 - a fault in the warm-up or capture costs the graph mode only
        why_not["graph"] = f"warm-up failed: {_err(e)}"
        return {}
    if getattr(graph, "graph", None) is None:
        why_not["graph"] = f"capture failed: {getattr(graph, 'failed', None) or warned or 'no graph after warm-up'}"
        return {}
    return {"graph": (lambda: None, fn)}


def profile_modes(variants, modes, device) -> dict:
    """Kernel ms per step of each mode that ran (``harness.kernel_ms``), written into ``modes`` with the GPU-busy
    fraction.  The graph's own figure is used only if the profiler saw at least half the eager graph-safe step's
    kernel time inside the replays; else the eager step's (the same kernels) stands in, and ``kernel_from`` says so."""
    kernel = {}
    for m, (_, fn) in variants.items():
        if "img_s" in modes[m]:
            try:
                kernel[m] = kernel_ms(fn, device)
            except Exception as e:  # noqa: BLE001 - a profiler fault costs the busy fraction only
                modes[m]["profile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    if "graph" in kernel and kernel.get("safe") and (kernel["graph"] or 0) < 0.5 * kernel["safe"]:
        kernel["graph"] = kernel["safe"]
        modes["graph"]["kernel_from"] = "safe"
    for m, ms in kernel.items():
        if ms:
            modes[m]["kernel_ms"], modes[m]["busy"] = ms, ms * modes[m]["steps_s"] / 1000
    return kernel


def measure_case(kind, preset, batch, device, args) -> dict:
    """One row: each mode's img/s and steps/s, kernel time per step, GPU-busy fraction and limit; loss check, FLOPs."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, guide, svi, x, lr = make_case(kind, preset, device, batch=batch)
    loss, dloss, dgrad = check_same_loss(model, guide, x)
    flops = count_flops(model, guide, x)
    variants, why_not = build_modes(model, guide, svi, x, lr, device, graph_on=not args.no_graph)
    rates = alternate(variants, args.steps, args.repeats, device, batch=batch)
    modes = {m: {"skipped": why_not[m]} for m in why_not}
    for m, r in rates.items():
        modes[m] = {"error": r} if isinstance(r, str) else {"img_s": r, "steps_s": r / batch}
    kernel = profile_modes(variants, modes, device) if device.type == "cuda" and not args.no_profile else {}
    least = min((kernel[m] for m in ("hand", "safe") if kernel.get(m)), default=None)  # eager: every kernel seen
    rec = {
        "model": kind, "preset": preset, "batch": batch, "modes": modes, "loss": loss, "loss_diff": dloss,
        "rel_grad_diff": dgrad, "gflop_per_step": flops / 1e9, "limit_steps_s": 1000 / least if least else None,
        "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }  # fmt: skip
    if args.side:
        rec["generation_img_s"] = generation_rate(model, device)
        ix = torch.rand(args.iwae_images, *model.config.image_shape, device=device)
        rec["iwae_img_s"], rec["iwae_k"] = iwae_rate(model, guide, ix, args.iwae_k), args.iwae_k
    return rec


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def failed_row(kind, preset, batch, why: str) -> dict:
    """The row of a case that produced no figures, saying why."""
    return {"model": kind, "preset": preset, "batch": batch, "modes": {}, "error": why}


def suspect(row: dict) -> bool:
    """Whether a row's faults may have left the CUDA context or generator unusable for the cases after it."""
    graph = (row.get("modes") or {}).get("graph") or {}
    why = str(graph.get("skipped") or graph.get("error") or "")
    return "error" in row or why.startswith(("capture failed", "warm-up failed")) or "error" in graph


def write_json(path, head: dict, rows: list) -> None:
    """``{**head, "rows": rows}`` to ``path`` atomically (rewritten after every case)."""
    if path:
        tmp = str(path) + ".tmp"
        with open(tmp, "w") as f:
            json.dump({**head, "rows": rows}, f, indent=2)
        os.replace(tmp, path)


def _drop(argv: list, flag: str, value=True) -> list:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag or a.startswith(flag + "="):
            skip = value and a == flag
        else:
            out.append(a)
    return out


def in_fresh_process(rest: list, args, head: dict, rows: list) -> list:
    """Run the cases ``rest`` in a fresh process (this script, ``--rows`` and ``--append``); returns every row,
    ``rows`` first.  A case that process did not finish gets a row saying so."""
    path = args.json or os.path.join(tempfile.mkdtemp(prefix="speed_"), "speed.json")
    write_json(path, head, rows)
    argv = _drop(_drop(_drop(_drop(args.argv, "--cases"), "--rows"), "--json"), "--append", value=False)
    argv += ["--rows", ",".join(f"{k}:{p}:{b}" for k, p, b in rest), "--json", path, "--append"]
    print(f"the cases after a fault run in a fresh process: {' '.join(argv)}", flush=True)
    rc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv]).returncode
    try:
        with open(path) as f:
            out = json.load(f)["rows"]
    except (OSError, ValueError, KeyError):
        out = list(rows)
    done = {(r["model"], r["preset"], r["batch"]) for r in out}
    why = f"no result: the fresh process for the later cases exited with code {rc} first"
    return out + [failed_row(*c, why) for c in rest if c not in done]


def run_cases(cases: list, device, args, head: dict, rows=(), measure=None) -> list:
    """Each case ``(kind, preset, batch)`` in its own ``try``; on CUDA, after a fault, the rest in a fresh process."""
    measure = measure or measure_case
    rows = list(rows)
    for i, (kind, preset, batch) in enumerate(cases):
        try:
            row = measure(kind, preset, batch, device, args)
        except Exception as e:  # noqa: BLE001 - one failed case costs its row
            row = failed_row(kind, preset, batch, _err(e))
        rows.append(row)
        write_json(args.json, head, rows)  # a run stopped midway keeps its finished rows
        print(f"done {kind} {preset} batch {batch}{' (failed)' if 'error' in row else ''} ({load_line()})", flush=True)
        rest = cases[i + 1 :]
        if rest and device.type == "cuda" and suspect(row):
            return in_fresh_process(rest, args, head, rows)
    return rows


def main(args):
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    pyro.enable_validation(False)  # as training runs after its first 10 validated steps (pyro_vlae.training.loop.fit)
    if device.type == "cuda":  # as training runs on CUDA unless --tf32 off
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    torch.manual_seed(0)
    print(f"machine: {machine_line(device)}, TF32 {'on' if args.tf32 and device.type == 'cuda' else 'off'}")
    print(f"before: {load_line()}", flush=True)
    prior = {}
    if args.append and args.json and os.path.exists(args.json):
        with open(args.json) as f:
            prior = json.load(f)
    head = {"machine": machine_line(device), "mm_gflops": prior.get("mm_gflops")}
    if not args.append:
        try:
            head["mm_gflops"] = {
                "100x6272 @ 6272x1024": matmul_gflops(device, BATCH, 6272, 1024),
                "2048x2048 @ 2048x2048": matmul_gflops(device, 2048, 2048, 2048),
            }
        except Exception as e:  # noqa: BLE001 - the ceiling is context, not a row
            head["mm_gflops"] = {"error": _err(e)}
        mm = head["mm_gflops"]
        print("\nfloat32 torch.mm: " + ", ".join(f"{k}: {v if isinstance(v, str) else f'{v:.1f} GFLOP/s'}"
                                              for k, v in mm.items()), flush=True)  # fmt: skip
    cases = args.rows or [(kind, preset, batch) for preset, batch in args.cases for kind in KINDS]
    rows = run_cases(cases, device, args, head, prior.get("rows") or [])
    if args.append:  # the process that started this one prints the tables
        return
    print(f"\n### Training step, kl_scale {KL_SCALE} ({args.steps} steps x {args.repeats} repeats, alternating)\n")
    print("\n".join(speed_table(rows)))
    good = [r for r in rows if "error" not in r]
    print("\n| model | preset | batch | loss | loss diff / rel. grad diff (hand vs Pyro) | GFLOP/step | SVI GFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for r in good:
        svi = r["modes"].get("svi", {}).get("img_s")
        gfs = "-" if not svi else f"{r['gflop_per_step'] * svi / r['batch']:.1f}"
        print(f"| {r['model']} | {r['preset']} | {r['batch']} | {r['loss']:.1f} | {r['loss_diff']:.1e} / "
              f"{r['rel_grad_diff']:.1e} | {r['gflop_per_step']:.2f} | {gfs} |")  # fmt: skip
    if args.side:
        print("\n| model | preset | generation img/s (`model(batch_size=1000)`) | IWAE img/s |\n|---|---|---|---|")
        for r in good:
            print(f"| {r['model']} | {r['preset']} | {r['generation_img_s']:.0f} | {r['iwae_img_s']:.2f} "
                  f"(K={r['iwae_k']}, {args.iwae_images} images) |")  # fmt: skip
    print(f"\nafter: {load_line()}")


def _cases(text):
    try:
        cases = [(p, int(b)) for p, b in (c.split(":") for c in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of preset:batch, e.g. mnist:100,shapes3d:256"
        ) from None
    if min(b for _, b in cases) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text}")
    return cases


def _rows(text):
    try:
        rows = [(k, p, int(b)) for k, p, b in (c.split(":") for c in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of model:preset:batch") from None
    return rows


def parse_args(argv=None):
    p = timing_parser(__doc__, "smoke check: mnist-cpu only, few steps")
    p.add_argument("--cases", type=_cases, help="preset:batch,... (default: by device, see above)")
    p.add_argument("--rows", type=_rows, help=argparse.SUPPRESS)  # model:preset:batch,... (a fresh process's cases)
    p.add_argument("--append", action="store_true", help=argparse.SUPPRESS)  # keep --json's rows, add these
    p.add_argument("--no-graph", action="store_true", help="leave the CUDA graph mode out")
    p.add_argument("--side", action=argparse.BooleanOptionalAction, default=None,
                   help="also generation and IWAE throughput (default: on the CPU only)")  # fmt: skip
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 on CUDA, as training's default (--no-tf32: full float32)")  # fmt: skip
    p.add_argument("--no-profile", action="store_true", help="no profiler pass (no GPU-busy fraction or limit)")
    p.add_argument("--iwae-k", type=int, default=1000)
    p.add_argument("--iwae-images", type=int, default=10)
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON records to PATH")
    args = p.parse_args(argv)
    args.argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    cuda = torch.device(args.device).type == "cuda"
    if args.cases is None:
        args.cases = CUDA_CASES if cuda else [("mnist-cpu", BATCH)] if args.quick else CPU_CASES
    args.side = (not cuda) if args.side is None else args.side
    if args.quick:
        args.steps, args.repeats = min(args.steps, 3), min(args.repeats, 3)
        args.iwae_k, args.iwae_images = min(args.iwae_k, 100), min(args.iwae_images, 4)
    return args


if __name__ == "__main__":
    main(parse_args())
