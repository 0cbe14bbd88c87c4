"""``benchmarks/gpu/paper_scale.py`` and ``benchmarks/gpu/model_pack.py``: the plan's budget arithmetic, the float16
export, the packing into what the GPU machine returns, the unpack round trip, and (slow) evaluation of a returned
float16 run against its float32 original."""

import json
import os
import subprocess
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu")
sys.path.insert(0, BENCH)
import model_pack as MP  # noqa: E402
import paper_scale as PS  # noqa: E402

from pyro_vlae.presets import get_preset  # noqa: E402
from pyro_vlae.training.runs import RunConfig, build, load_run, save_run_checkpoint  # noqa: E402

MiB = 2**20
SIZES = {"mnist": 50 * MiB, 32: 10 * MiB, 64: 40 * MiB}


# --------------------------------------------------------------------------------------------------- the plan
def test_the_plan_splits_the_budget_and_estimates_epochs_from_the_rates():
    rates = {("vlae", 32): 60_000.0, ("hvae", 32): 120_000.0, ("vlae", 64): 20_000.0}
    p = PS.plan(600, rates, SIZES, 60 * MiB)
    train_s = 600 - PS.STARTUP_S - PS.STOP_S - PS.PACK_S
    assert p["train_s"] == train_s
    # the three share the GPU: images per model = time x share / (1/r_vlae + 1/r_hvae + 1/r_vae), r_vae = r_vlae
    images = train_s * (1 - PS.MNIST_SHARE) / (1 / 60_000 + 1 / 120_000 + 1 / 60_000)
    assert p["estimates"][32]["epochs"] == pytest.approx(images / 470_000)
    assert p["estimates"][64]["img_s_alone"] == {"vlae": 20_000.0, "hvae": 20_000.0, "vae": 20_000.0}
    assert p["rates_assumed_for"] == []
    assert p["size"] == 32 and "under 30" in p["why"] and "exceed the 60 MiB" in p["why"]


def test_64x64_needs_both_30_epochs_and_room_for_the_weights():
    fast = {("vlae", 64): 1e7, ("vlae", 32): 1e7}
    assert PS.plan(600, fast, SIZES, 100 * MiB)["size"] == 64
    p = PS.plan(600, fast, SIZES, 60 * MiB)  # 90 MiB of weights do not fit in 60
    assert p["size"] == 32 and "exceed" in p["why"] and "under 30" not in p["why"]
    slow = {("vlae", 64): 1e3, ("vlae", 32): 1e3}
    p = PS.plan(600, slow, SIZES, 100 * MiB)
    assert p["size"] == 32 and "under 30" in p["why"] and "exceed" not in p["why"]


def test_without_measured_rates_the_issues_target_is_assumed_and_said():
    p = PS.plan(400, {}, SIZES, 60 * MiB)
    assert p["rates_assumed_for"] == [32, 64]
    assert p["estimates"][32]["img_s_alone"]["vlae"] == PS.ASSUMED_RATES[32]


def test_rates_are_the_fastest_mode_that_ran_in_each_shapes3d_row(tmp_path):
    rows = [
        {"model": "vlae", "preset": "shapes3d-32", "batch": 512,
         "modes": {"hand": {"img_s": 50.0}, "graph": {"img_s": 80.0}, "svi": {"error": "boom"}}},
        {"model": "hvae", "preset": "shapes3d", "batch": 256, "modes": {"svi": {"img_s": 7.0}}},
        {"model": "vlae", "preset": "shapes3d-32", "batch": 100, "modes": {"hand": {"img_s": 999.0}}},
        {"model": "vlae", "preset": "mnist", "batch": 100, "modes": {"hand": {"img_s": 999.0}}},
    ]  # fmt: skip
    (tmp_path / "speed.json").write_text(json.dumps({"rows": rows}))
    assert PS.read_rates(tmp_path / "speed.json") == {("vlae", 32): 80.0, ("hvae", 64): 7.0}
    assert PS.read_rates(tmp_path / "missing.json") == {} and PS.read_rates(None) == {}


def test_the_shapes3d_runs_are_reproduces_three():
    runs = {name: (kind, flags) for name, kind, flags in PS.shapes3d_runs()}
    assert runs == {
        "shapes3d_vlae": ("vlae", ["--latent-dims", "3,3,3,3"]),
        "shapes3d_hvae": ("hvae", ["--latent-dims", "3,3,3,3"]),
        "shapes3d_vae-beta4": ("vae", ["--latent-dims", "12", "--beta", "4"]),
    }


def test_too_small_a_budget_is_refused(capsys):
    with pytest.raises(SystemExit):
        PS.parse_args(["--out", "x", "--budget-s", "60"])
    assert "leaves no time to train" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- float16 export
@pytest.fixture
def tiny_run(tmp_path):
    """A tiny vlae run folder with a checkpoint (no training), one weight planted beyond float16's range."""
    p = get_preset("tiny")
    config = RunConfig("vlae", "synthetic", "tiny", p.model, p.train, seed=1)
    model, guide, optim, svi = build(config, "cpu")
    x = torch.rand(4, *p.model.image_shape)
    svi.step(x, kl_scale=1.0)  # the optimiser holds state, as after training
    name, w = next((n, w) for n, w in guide.named_parameters() if w.dim() == 2)
    with torch.no_grad():
        w[0, 0] = 1e5
    run = tmp_path / "run"
    save_run_checkpoint(str(run), model, guide, optim, 7, config)
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    (run / "metrics.jsonl").write_text('{"step": 7}\n')
    return run, name


def test_export_half_keeps_config_and_metrics_and_stores_float16_weights(tiny_run, tmp_path):
    run, big = tiny_run
    info = MP.export_half(run, tmp_path / "half")
    assert sorted(os.listdir(tmp_path / "half")) == ["checkpoints", "config.json", "metrics.jsonl"]
    state = torch.load(tmp_path / "half" / "checkpoints" / "latest.pt", weights_only=True)
    full = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert info["step"] == state["step"] == 7 and state["optim"] == {} and "rng" not in state
    assert info["kept_float32"] == [big] and state["guide"][big].dtype == torch.float32
    for part in ("model", "guide"):
        for k, v in full[part].items():
            h = state[part][k]
            if v.is_floating_point() and k != big:
                assert h.dtype == torch.float16 and torch.equal(h, v.half()), k
            else:
                assert h.dtype == v.dtype and torch.equal(h, v), k


def test_a_float16_run_loads_for_evaluation_with_outputs_close_to_float32(tiny_run, tmp_path):
    run, _ = tiny_run
    MP.export_half(run, tmp_path / "half")
    m32, g32, _, _ = load_run(str(run))
    m16, g16, _, _ = load_run(str(tmp_path / "half"))
    assert all(p.dtype == torch.float32 for p in m16.parameters())  # the networks stay float32
    x = torch.rand(8, 1, 16, 16)
    with torch.no_grad():
        a = torch.cat([torch.cat(p, -1) for p in g32.posterior(x)], -1)
        b = torch.cat([torch.cat(p, -1) for p in g16.posterior(x)], -1)
        za = [torch.randn(8, d) for d in m32.config.latent_dims]
        da, db = m32.decode(za), m16.decode(za)
    assert ((a - b).norm() / a.norm()) < 5e-3 and ((da - db).norm() / da.norm()) < 5e-3
    assert not torch.equal(a, b)  # the comparison sees the rounding: it is not comparing one model with itself


# --------------------------------------------------------------------------------------------- packing
def _folders(tmp_path, sizes):
    out = []
    for i, n in enumerate(sizes):
        d = tmp_path / "runs" / f"run{i}"
        (d / "checkpoints").mkdir(parents=True)
        (d / "checkpoints" / "latest.pt").write_bytes(os.urandom(n))  # incompressible, as float16 weights nearly are
        (d / "config.json").write_text(json.dumps({"i": i}))
        out.append(d)
    return out


def test_pack_splits_into_parts_within_the_limits_and_unpack_restores_the_folders(tmp_path):
    runs = _folders(tmp_path, [30_000, 20_000])
    out = tmp_path / "out"
    m = MP.pack(runs, out, max_bytes=100_000, part_bytes=16_000, tmp_dir=tmp_path)
    files = sorted(os.listdir(out))
    assert files == [MP.MANIFEST] + [f"models.tar.gz.part{i:02d}" for i in range(len(m["parts"]))]
    assert len(m["parts"]) == 4 and all(p["bytes"] <= 16_000 for p in m["parts"]) and m["left_out"] == []
    assert sum(p["bytes"] for p in m["parts"]) == m["archive"]["bytes"]
    back = MP.unpack(out, tmp_path / "back")
    assert [p.name for p in back] == ["run0", "run1"]
    for src, dst in zip(runs, back):
        for rel in ("checkpoints/latest.pt", "config.json"):
            assert (src / rel).read_bytes() == (dst / rel).read_bytes()
    assert not any(n.endswith((".tmp", ".tar.gz")) for n in files)


def test_pack_leaves_out_the_last_runs_when_they_do_not_fit(tmp_path):
    runs = _folders(tmp_path, [30_000, 30_000, 30_000])
    m = MP.pack(runs, tmp_path / "out", max_bytes=70_000, part_bytes=16_000, tmp_dir=tmp_path)
    assert m["runs"] == ["run0", "run1"] and m["left_out"] == ["run2"] and m["archive"]["bytes"] <= 70_000


def test_the_default_part_size_keeps_the_gpu_checks_output_within_what_the_machine_returns():
    import gpu_check as GC

    files = 4 + GC.MODEL_PARTS  # summary.md, summary.json, results.tar.gz, the manifest, the parts
    assert files <= MP.MAX_FILES and MP.PART_BYTES < MP.MAX_FILE_BYTES
    assert GC.MODEL_PARTS * MP.PART_BYTES + 2 * MiB <= MP.MAX_TOTAL_BYTES  # 2 MiB left for the summaries and logs


def test_unpack_refuses_a_changed_or_missing_part_with_an_error_line(tmp_path, capsys):
    runs = _folders(tmp_path, [40_000])
    out = tmp_path / "out"
    m = MP.pack(runs, out, max_bytes=100_000, part_bytes=16_000, tmp_dir=tmp_path)
    part = out / m["parts"][1]["file"]
    data = bytearray(part.read_bytes())
    data[100] ^= 1
    part.write_bytes(bytes(data))
    assert MP.main(["unpack", str(out), "--dest", str(tmp_path / "back")]) == 2
    assert "does not match the manifest" in capsys.readouterr().err and not (tmp_path / "back").exists()
    part.unlink()
    with pytest.raises(MP.PackError, match="is missing"):
        MP.unpack(out, tmp_path / "back")
    with pytest.raises(MP.PackError, match="holds no models.manifest.json"):
        MP.unpack(tmp_path, tmp_path / "back")


# --------------------------------------------------------------------------------------------- evaluation (slow)
@pytest.mark.slow
def test_evaluate_accepts_a_returned_float16_run_and_its_numbers_match_float32(tmp_path):
    """Train a tiny run, pack its float16 export, unpack it, evaluate both with the library's command."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = [sys.executable, "-m", "pyro_vlae.run", "--dataset", "synthetic", "--num-steps", "40", "--run-dir", run]
    train += ["--no-progress", "--no-figures", "--no-eval", "--data-dir", tmp_path / "data"]
    subprocess.run(list(map(str, train)), check=True, capture_output=True, env=env, timeout=300)
    MP.export_half(run, tmp_path / "half" / "run")
    MP.pack([tmp_path / "half" / "run"], tmp_path / "out", max_bytes=MP.MAX_TOTAL_BYTES, tmp_dir=tmp_path)
    (back,) = MP.unpack(tmp_path / "out", tmp_path / "back")
    results = []
    for folder in (run, back):
        cmd = [sys.executable, "-m", "pyro_vlae.evaluate", str(folder), "--num-samples", "20", "--max-images", "64"]
        proc = subprocess.run(cmd + ["--no-classifier", "--no-diagnostics"], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results.append(json.loads((folder / "eval.json").read_text())["evaluation"]["test"]["likelihood"])
    full, half = results
    for key in ("elbo", "iwae", "kl_total"):
        assert half[key] == pytest.approx(full[key], rel=1e-3), key


def test_the_real_models_fit_the_parts_the_gpu_check_allows():
    """mnist-paper's VLAE and the three 32x32 shapes3d models in float16, even uncompressed, fit in the 4 parts of
    15.5 MiB; the 64x64 ones do not (so the plan must say 32x32 whatever the rate)."""
    import gpu_check as GC

    sizes = PS.model_bytes(dry_run=False)
    room = GC.MODEL_PARTS * MP.PART_BYTES - 2**16  # tar headers
    assert sizes["mnist"] + sizes[32] <= room < sizes["mnist"] + sizes[64]
    p = PS.plan(480, {("vlae", 64): 1e9, ("vlae", 32): 1e9}, sizes, GC.MODEL_PARTS * MP.PART_BYTES)
    assert p["size"] == 32 and "exceed" in p["why"]


@pytest.mark.slow
def test_a_sigterm_to_the_driver_stops_every_run_and_still_packs_what_they_saved(tmp_path):
    """The dry run, stopped by SIGTERM once every run has logged: each run exits with its checkpoint (143), and the
    driver exports and packs the four of them."""
    import signal
    import time

    work = tmp_path / "work"
    # a budget far beyond the wait below, so that the runs are stopped by the driver's SIGTERM and never by its deadline
    cmd = [sys.executable, os.path.join(BENCH, "paper_scale.py"), "--dry-run", "--budget-s", "900"]
    cmd += ["--out", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd + ["--work-dir", str(work)], env=env, stdout=subprocess.PIPE, text=True)
    names = ["shapes3d_vlae", "shapes3d_hvae", "shapes3d_vae-beta4", "mnist-paper_vlae"]
    t0 = time.time()
    while not all((work / n / "metrics.jsonl").exists() for n in names) and time.time() - t0 < 600:
        time.sleep(1)
    logged = [n for n in names if (work / n / "metrics.jsonl").exists()]
    proc.send_signal(signal.SIGTERM)
    assert logged == names, f"only {logged} logged within 600 s"
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    summary = json.loads((work / "paper_scale.json").read_text())
    for name in names:
        run = summary["runs"][name]
        assert run["rc"] == 143 and run["signal"] == "stopped by SIGTERM: the driver itself was stopped", run
    assert summary["pack"]["runs"] == [names[3], *names[:3]]
    assert [p.name for p in MP.unpack(tmp_path / "out", tmp_path / "back")] == summary["pack"]["runs"]
