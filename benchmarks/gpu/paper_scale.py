"""The paper at the paper's scale on one GPU, within a wall-clock budget: four runs side by side, returned in float16.

It trains, at the same time, with ``python -m pyro_vlae.run``:

* the VLAE, the Markov HVAE (``reproduce.SHAPES3D_LAYOUT``, four 3-d layers each, as the C5 pilot chose) and the
  beta-VAE (one code of the same total size, beta 4) on shapes3d, at equal images seen
  (``benchmarks/claims/reproduce.py``'s shapes3d settings), at 64x64 if at least 30 epochs each fit at the
  measured rate and their weights fit in what the machine returns, else at 32x32 (the summary says which and why);
* the plain VLAE under ``--preset mnist-paper`` (the reference schedule, no fade-in) to its 30,000 steps or as many
  as fit.

Equal images: the three shapes3d runs take the same batch; once half the training window has passed, the step that the
slowest of them will reach by the deadline (from its logged rate) becomes the target, and each run is stopped by SIGTERM
when its log reaches it (the run then writes its checkpoint and exits with 143); every run still going at the deadline
is stopped then. A SIGTERM to the driver stops every run the same way and still exports and packs what they saved
(within ``procs.GRACE_S``, the time the GPU check gives it before SIGKILL); SIGINT does the same. The step counts come
from the checkpoints and are reported. Then each run is exported with float16 weights and packed
(``benchmarks/gpu/model_pack.py``) into parts of 15.5 MiB, at most ``--max-bytes`` in all, beside
``models.manifest.json`` in ``--out``. ``<work>/paper_scale.json`` holds the plan and the results.

Faults: every run gets ``--cuda-graph`` (``auto`` unless told) and ``--checkpoint-seconds`` :data:`CHECKPOINT_S` (when
the training command has that flag), so a crash at any minute leaves weights. A run that exits with anything but 0 or
143 (and was not stopped by the driver) is restarted once with ``--cuda-graph off``, by a forced resume of the same
folder from its latest checkpoint (``--resume DIR --force-config``). Why resume and not a fresh folder: the window is
minutes long, so a fresh start would throw away every step already taken, and the equal-images stop reads the step
count of the folder, which a resume keeps. A run that died before its first checkpoint (a capture fault comes at the
first captured step, seconds in) has nothing to resume: its folder is moved aside as ``<run>.failed`` (its log and
metrics stay in the results) and it starts afresh in its own name. No restart once the driver is being stopped or
less than :data:`RESTART_MIN_S` of the window is left. A restart and a CUDA graph capture that fell back to eager steps
(the run log's warning, ``procs.CAPTURE_FAILED``) are recorded per run and shown in the GPU check's ``summary.md``.

    python benchmarks/gpu/paper_scale.py --out $OUT --budget-s 480 --speed-json speed.json   # on the GPU machine
    python benchmarks/gpu/paper_scale.py --out ps_out --dry-run                               # every step on a CPU
    python benchmarks/gpu/model_pack.py unpack ps_out --dest runs/paper_scale                 # back here
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import model_pack as MP
from gpu_report import last_record, metrics_steps
from procs import Part, atomic, capture_fallback, read_json, restart_argv

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "claims"))  # reproduce.py: the shapes3d settings
from reproduce import EXPERIMENTS  # noqa: E402

SHAPES3D_TRAIN = 470_000  # 480,000 scenes less the 10,000 test items
MNIST_TRAIN, MNIST_STEPS = 60_000, 30_000
MIN_EPOCHS_64 = 30  # the rule for 64x64
PUBLISHED_EPOCHS = (40, 45)  # disentanglement_lib: 300k steps at batch 64; pro-VLAE: 3 x 15 epochs
PRESET, BATCH = {32: "shapes3d-32", 64: "shapes3d"}, {32: 512, 64: 256}  # speed.py's rows at these batches
EPOCH_CAP = 60  # --num-steps of each shapes3d run, in epochs: more than the published budgets
STARTUP_S, STOP_S, PACK_S = 30, 30, 45  # process start and data; SIGTERM to checkpoint; export and packing
MNIST_SHARE = 0.25  # share of the GPU assumed taken by the MNIST run when the shapes3d epochs are estimated
# Used when speed.py measured nothing: the target (shapes3d-32 VLAE >= 100k img/s), 64x64 at a quarter.
ASSUMED_RATES = {32: 100_000.0, 64: 25_000.0}
LOG_EVERY = 50  # metrics lines: the granularity of the equal-images stop (a log line costs about one forward pass)
AT_DEADLINE = "stopped by SIGTERM at the deadline"
DRY = {"batch": 8, "log_every": 2, "budget_s": 150}
#: The shapes3d layout trained here, as ``benchmarks/claims/reproduce.py`` trains it: ``(tag, model, flags)`` per run.
SHAPES3D_RUNS = EXPERIMENTS["shapes3d"]
TRAIN = "pyro_vlae.run"  # the training command (the tests put a small script in its place)
CUDA_GRAPH_MODES = ("auto", "on", "off")
CHECKPOINT_S = 60  # every run also checkpoints by wall time (the training command's --checkpoint-seconds)
RESTART_MIN_S = 60  # a failed run is restarted only if this much of the training window is left


def shapes3d_runs() -> list:
    """``(name, model, flags)`` of the three shapes3d runs, as ``benchmarks/claims/reproduce.py`` trains them."""
    return [(f"shapes3d_{tag}", model, flags) for tag, model, flags in SHAPES3D_RUNS]


def read_rates(speed_json) -> dict:
    """``{(model, size): img/s}``: the fastest mode that ran in each of speed.py's shapes3d rows at :data:`BATCH`."""
    rates = {}
    for row in read_json(Path(speed_json)).get("rows", []) if speed_json else []:
        size = next((s for s, p in PRESET.items() if p == row.get("preset") and BATCH[s] == row.get("batch")), None)
        ok = [v["img_s"] for v in (row.get("modes") or {}).values() if isinstance(v, dict) and v.get("img_s")]
        if size and ok:
            rates[(row["model"], size)] = max(ok)
    return rates


def plan(budget_s: float, rates: dict, model_bytes: dict, max_bytes: int, dry_run: bool = False) -> dict:
    """The image size and the time split, from the budget, the measured rates and the returned weights' size.

    :param rates: ``{(model, size): img/s}`` alone on the GPU (:func:`read_rates`); a missing VLAE rate is taken from
        :data:`ASSUMED_RATES`, a missing HVAE or VAE rate equals the VLAE's.
    :param model_bytes: ``{size: bytes}`` of the three shapes3d runs' float16 weights, and ``{"mnist": bytes}``.
    :returns: ``size``, ``why``, ``train_s`` and, per size, the estimated epochs of each shapes3d model and bytes.
    """
    train_s = max(0.0, budget_s - STARTUP_S - STOP_S - PACK_S)
    est, assumed = {}, []
    for size in (32, 64):
        vlae = rates.get(("vlae", size))
        if vlae is None:
            vlae = ASSUMED_RATES[size]
            assumed.append(size)
        r = {m: rates.get((m, size), vlae) for m in ("vlae", "hvae", "vae")}
        # the three share the GPU (and MNIST takes its share): images per model if the GPU's time is what limits
        images = train_s * (1 - MNIST_SHARE) / sum(1 / v for v in r.values())
        est[size] = {
            "img_s_alone": r,
            "epochs": images / SHAPES3D_TRAIN,
            "bytes": model_bytes[size] + model_bytes["mnist"],
        }
    fits = {s: est[s]["bytes"] <= max_bytes for s in (32, 64)}
    if dry_run:
        size, why = 32, "dry run: 32x32 with tiny batches"
    elif est[64]["epochs"] >= MIN_EPOCHS_64 and fits[64]:
        size, why = 64, f"64x64: about {est[64]['epochs']:.0f} epochs each fit (at least {MIN_EPOCHS_64})"
    else:
        reasons = []
        if est[64]["epochs"] < MIN_EPOCHS_64:
            reasons.append(f"about {est[64]['epochs']:.1f} epochs each would fit at 64x64, under {MIN_EPOCHS_64}")
        if not fits[64]:
            reasons.append(
                f"the 64x64 weights and the MNIST VLAE's ({est[64]['bytes'] / 2**20:.0f} MiB in float16) exceed the "
                f"{max_bytes / 2**20:.0f} MiB the machine returns"
            )
        size, why = 32, "32x32, not 64x64: " + "; ".join(reasons)
    return {"size": size, "why": why, "train_s": train_s, "estimates": est, "rates_assumed_for": assumed}


def model_bytes(dry_run: bool) -> dict:
    """Float16 bytes of the weights (model and guide) of the runs at each size, built on the CPU."""
    import dataclasses

    from pyro_vlae.presets import get_preset
    from pyro_vlae.training.runs import RunConfig, build_networks

    def count(kind, preset, dims=None) -> int:
        p = get_preset(preset)
        m = dataclasses.replace(p.model, latent_dims=dims) if dims else p.model
        nets = build_networks(RunConfig(kind, "shapes3d", preset, m, p.train), "cpu")
        return 2 * sum(t.numel() for net in nets for t in net.state_dict().values())

    out = {"mnist": count("vlae", "tiny" if dry_run else "mnist-paper")}
    for size, preset in PRESET.items():
        out[size] = 0
        for _, kind, flags in shapes3d_runs():
            dims = tuple(int(d) for d in flags[flags.index("--latent-dims") + 1].split(","))
            out[size] += count(kind, preset, dims)
    return out


def train_flags_known() -> set:
    """The flags the training command accepts (``pyro_vlae.cli_config.build_parser``)."""
    from pyro_vlae.cli_config import build_parser

    return set(build_parser()._option_string_actions)


def checkpoint_seconds_flags(known=None) -> list:
    """``--checkpoint-seconds CHECKPOINT_S`` if the training command has that flag, else nothing (an unknown flag would
    make every run exit with 2)."""
    known = train_flags_known() if known is None else known
    return ["--checkpoint-seconds", CHECKPOINT_S] if "--checkpoint-seconds" in known else []


class Driver:
    """Starts the four runs, stops them (equal images for shapes3d, the deadline for all), exports and packs."""

    def __init__(self, args):
        self.args, self.dry_run, self.sampler = args, args.dry_run, None
        self.out = Path(args.out).resolve()
        self.work = Path(args.work_dir or tempfile.mkdtemp(prefix="paper_scale_")).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self.summary: dict = {"command": " ".join(sys.argv), "dry_run": self.dry_run, "budget_s": args.budget_s}
        self.target: int | None = None  # the shapes3d runs' common last step, once fixed
        self.lock = threading.Lock()  # the runs' watcher threads all call update_target
        self.stopping = ""  # set by SIGTERM to the driver: every run is stopped, then exported and packed
        self.shapes3d: dict = {}  # name -> the Part now training it (a restart replaces it)

    def say(self, msg):
        print(f"[paper_scale {time.time() - self.t0:6.1f}s] {msg}", flush=True)

    def write(self):
        self.summary["elapsed_s"] = round(time.time() - self.t0, 1)
        atomic(self.work / "paper_scale.json", json.dumps(self.summary, indent=2).encode())

    def common(self) -> list:
        data = ["--data-dir", self.args.data_dir] if self.args.data_dir else []
        every = self.summary["plan"]["log_every"]
        ckpt = ["--checkpoint-every", 5000, *self.summary["plan"]["checkpoint_seconds"]]
        return ["--log-every", every, *ckpt, "--no-figures", "--no-eval", "--no-progress", *data]

    def shapes3d_stop(self, name, deadline, window_s):
        """Stop callback of one shapes3d run: at the deadline, or at the common target (:meth:`update_target`)."""

        def stop():
            if self.stopping or time.time() >= deadline:
                return self.stopping or AT_DEADLINE
            self.update_target(deadline, window_s)
            if self.target is not None and metrics_steps(self.work / name) >= self.target:
                return f"stopped by SIGTERM at the common target, step {self.target}"
            return False

        return stop

    def update_target(self, deadline, window_s):
        """Past half the window, fix the target at the lowest step a running shapes3d run will reach by the deadline."""
        now = time.time()
        with self.lock:
            if self.target is None and deadline - now <= window_s / 2:
                self._fix_target(deadline, now)

    def _fix_target(self, deadline, now):
        reach = []
        for name, part in self.shapes3d.items():
            rec = last_record(self.work / name)
            if part is not None and part.running() and rec:
                reach.append(rec["step"] + rec["img_per_s"] / self.batch * max(0.0, deadline - now))
        if reach:
            self.target = int(min(reach))
            self.summary["target_step"] = self.target
            self.say(f"shapes3d runs stop at step {self.target} (the slowest run's projected step at the deadline)")

    def _on_sigterm(self, signum, frame):
        name = signal.Signals(signum).name
        self.stopping = f"stopped by {name}: the driver itself was stopped"
        self.say(f"{name}: stopping every run, then exporting and packing what they saved")

    def launch(self, name, argv, stop, deadline, log_name=None) -> Part:
        """Start one training run, stopped by its callback, or at the latest 10 s after the deadline."""
        part = Part(self, log_name or name, TRAIN, argv, max(0.0, deadline - time.time()) + 10, stop=stop)
        if name in self.shapes3d:
            self.shapes3d[name] = part
        return part

    def restart_refusal(self, res, deadline) -> str | None:
        """``None`` when a finished run is to be restarted; else why not (``""`` when it ended as planned)."""
        if res["rc"] in (0, 143) or res.get("signal"):
            return ""
        if self.stopping:
            return "the driver was being stopped"
        if deadline - time.time() < RESTART_MIN_S:
            return f"less than {RESTART_MIN_S} s of the training window was left"
        return None

    def supervise(self, specs: dict, deadline) -> None:
        """Wait for every run (``specs``: name -> ``(argv, stop)``), restarting each failed one once with
        ``--cuda-graph off`` (:func:`restart_argv`); their results go into ``summary["runs"]`` as they finish."""
        live = {name: self.launch(name, argv, stop, deadline) for name, (argv, stop) in specs.items()}
        self.say(f"started {', '.join(live)}; training window {deadline - time.time():.0f} s")
        first: dict = {}  # name -> the failed attempt of a restarted run
        self.summary["runs"] = {}
        while live:
            for name in [n for n, p in live.items() if not p.running()]:
                part = live.pop(name)
                res = part.wait()
                res["tail"] = part.tail(5)
                res["capture_fallback"] = capture_fallback(part.log) or (first.get(name) or {}).get("capture_fallback")
                if name in first:
                    res["restart"] = first[name].pop("restart")
                    res["restart"]["first"] = first[name]
                elif (why := self.restart_refusal(res, deadline)) is None:
                    res["step"] = metrics_steps(self.work / name)
                    argv, how = restart_argv(specs[name][0], self.work / name)
                    first[name] = {**res, "restart": {"how": how}}
                    self.say(f"{name} exited with code {res['rc']}; restarting it with --cuda-graph off: {how}")
                    live[name] = self.launch(name, argv, specs[name][1], deadline, log_name=f"{name}.restart")
                    continue
                elif why:
                    res["not_restarted"] = why
                self.summary["runs"][name] = res
                self.write()
            time.sleep(0.5)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_sigterm)
        a, dry = self.args, self.dry_run
        sizes = model_bytes(dry)
        p = plan(a.budget_s, read_rates(a.speed_json), sizes, a.max_bytes, dry)
        size = a.size or p["size"]
        self.batch = DRY["batch"] if dry else BATCH[size]
        every = DRY["log_every"] if dry else LOG_EVERY
        self.summary["plan"] = {**p, "size": size, "batch": self.batch, "log_every": every}
        self.summary["plan"]["checkpoint_seconds"] = checkpoint_seconds_flags()
        self.summary["plan"]["cuda_graph"] = a.cuda_graph
        self.say(p["why"] + (f"; overridden: --size {a.size}" if a.size else ""))
        deadline = self.t0 + a.budget_s - STOP_S - PACK_S
        window = deadline - time.time()
        cap = math.ceil(EPOCH_CAP * SHAPES3D_TRAIN / self.batch)
        graph = ["--cuda-graph", a.cuda_graph]
        specs = {}
        for name, kind, flags in shapes3d_runs():
            argv = ["--model", kind, "--dataset", "shapes3d", "--preset", PRESET[size], "--batch-size", self.batch]
            argv += ["--num-steps", cap, "--run-dir", self.work / name, *flags, *graph, *self.common()]
            specs[name] = (argv, self.shapes3d_stop(name, deadline, window))
            self.shapes3d[name] = None
        mnist = ["--dataset", "synthetic", "--preset", "tiny", "--fade-in", 0] if dry else ["--preset", "mnist-paper"]
        argv = ["--model", "vlae", *mnist, "--num-steps", MNIST_STEPS, "--run-dir", self.work / "mnist-paper_vlae"]
        stop = lambda: self.stopping or (AT_DEADLINE if time.time() >= deadline else False)  # noqa: E731
        specs["mnist-paper_vlae"] = ([*argv, *graph, *self.common()], stop)
        self.supervise(specs, deadline)
        self.export_and_pack()
        self.write()
        ok = all(r.get("status") == "ok" for r in self.summary["runs"].values())
        return 0 if ok and not self.summary["pack"].get("left_out") else 1

    def export_and_pack(self):
        exported = []
        for name in ["mnist-paper_vlae", *self.shapes3d]:  # packing order: what is left out first goes last
            res, run = self.summary["runs"][name], self.work / name
            try:
                info = MP.export_half(run, self.work / "export" / name)
            except Exception as e:  # noqa: BLE001 - a run without a readable checkpoint is reported, not fatal
                res["status"] = f"failed: no checkpoint to export ({type(e).__name__}: {str(e)[:200]})"
                continue
            batch, train = info["batch_size"], MNIST_TRAIN if name.startswith("mnist") else SHAPES3D_TRAIN
            res.update(info, images=info["step"] * batch, epochs=round(info["step"] * batch / train, 4))
            res["last_metrics"] = last_record(run)
            res["status"] = "ok" if res["rc"] in (0, 143) else f"failed: exit code {res['rc']}"
            exported.append(self.work / "export" / name)
        t = time.time()
        manifest = MP.pack(exported, self.out, self.args.max_bytes, tmp_dir=self.work)
        self.summary["pack"] = {**manifest, "seconds": round(time.time() - t, 1)}
        steps = [self.summary["runs"][n].get("step") or 0 for n in self.shapes3d]
        spread = (max(steps) - min(steps)) / max(min(steps), 1)
        self.summary["equal_images"] = {"steps": steps, "spread": round(spread, 4), "within_1pct": spread <= 0.01}
        self.say(f"packed {manifest['runs']} into {len(manifest['parts'])} parts; shapes3d steps {steps}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for the packed weights (models.manifest.json and parts)")
    p.add_argument("--work-dir", help="folder for the runs and logs (default: a new temporary folder)")
    p.add_argument("--budget-s", type=float, help="wall-clock budget of the whole driver (default 480; dry run 150)")
    p.add_argument("--speed-json", help="speed.py's --json output, for the measured shapes3d rates")
    p.add_argument("--size", type=int, choices=(32, 64), help="shapes3d image size (default: from the plan)")
    p.add_argument("--max-bytes", type=int, default=4 * MP.PART_BYTES, help="largest packed size (default 62 MiB)")
    p.add_argument("--data-dir", help="dataset folder (default: the run command's)")
    p.add_argument("--dry-run", action="store_true", help="every step on the CPU with tiny batches")
    p.add_argument("--cuda-graph", choices=CUDA_GRAPH_MODES, default="auto",
                   help="every run's --cuda-graph (a run that fails is restarted once with off)")  # fmt: skip
    args = p.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = DRY["budget_s"] if args.dry_run else 480.0
    least = STARTUP_S + STOP_S + PACK_S + 30
    if args.budget_s < least:
        p.error(f"--budget-s {args.budget_s:.0f} leaves no time to train; give at least {least}")
    return args


if __name__ == "__main__":
    sys.exit(Driver(parse_args()).run())
