"""``benchmarks/claims/c5_pilot.py``: the layouts it trains, the fair C4 comparison's sizes, resuming, the pool passing
a SIGTERM on to its children, and the report read back from a fabricated ``eval.json``."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "claims")
sys.path.insert(0, BENCH)
import c5_pilot as CP  # noqa: E402


def test_the_issue_layouts_are_all_there_with_and_without_the_fade_in():
    for dims in ("2-2-2-2", "3-3-3-3", "5-5-5-10"):
        plain, fade = CP.LAYOUTS[f"vlae-{dims}"][1], CP.LAYOUTS[f"vlae-{dims}-fade"][1]
        assert "--fade-in" not in plain and fade[fade.index("--fade-in") + 1] == str(CP.FADE_IN)
        assert plain[plain.index("--latent-dims") + 1] == dims.replace("-", ",")
    beta = CP.LAYOUTS["vlae-3-3-3-fade-beta8"][1]
    assert beta[beta.index("--anneal") + 1] == "const:8"  # a KL scale above 1 through the schedule


def test_the_c4_runs_match_the_layers_and_the_total_code_size():
    runs = CP.c4_runs("5,5,5,10")
    assert runs["c4-hvae"] == ("hvae", ["--latent-dims", "5,5,5,10"])
    assert runs["c4-vae-beta4"] == ("vae", ["--latent-dims", "25", "--beta", "4"])


def test_a_run_with_a_checkpoint_is_resumed_and_a_new_one_started(tmp_path):
    new = CP.train_cmd(str(tmp_path), "vlae-2-2-2-2", "vlae", ["--latent-dims", "2,2,2,2"], 300, 0)
    assert "--run-dir" in new and new[new.index("--num-steps") + 1] == "300"
    os.makedirs(tmp_path / "vlae-2-2-2-2" / "checkpoints")
    (tmp_path / "vlae-2-2-2-2" / "checkpoints" / "latest.pt").write_bytes(b"x")
    again = CP.train_cmd(str(tmp_path), "vlae-2-2-2-2", "vlae", ["--latent-dims", "2,2,2,2"], 300, 0)
    assert again[again.index("--resume") + 1] == str(tmp_path / "vlae-2-2-2-2") and "--run-dir" not in again
    assert not CP._done(str(tmp_path / "vlae-2-2-2-2"), 300)  # no metrics, no figures: not done


def test_the_pool_runs_two_at_a_time_and_passes_a_sigterm_on(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(
        textwrap.dedent(
            """
            import signal, sys, time
            signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
            print("up", flush=True)
            time.sleep(60)
            """
        )
    )
    driver = tmp_path / "driver.py"
    driver.write_text(
        textwrap.dedent(
            f"""
            import sys, time
            sys.path.insert(0, {BENCH!r})
            import c5_pilot as CP
            log = {str(tmp_path)!r} + "/j{{}}.log"
            jobs = [(f"j{{k}}", [sys.executable, {str(script)!r}], log.format(k)) for k in range(3)]
            print(CP.run_pool(jobs, 2, time.time() + 600), flush=True)
            """
        )
    )
    p = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while (
        time.time() < deadline
        and sum((tmp_path / f"j{k}.log").exists() and "up" in (tmp_path / f"j{k}.log").read_text() for k in range(3))
        < 2
    ):
        time.sleep(0.2)
    assert not (tmp_path / "j2.log").exists()  # two at a time
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    assert "{'j0': 143, 'j1': 143}" in out  # both children got the SIGTERM; the third never started
    assert not (tmp_path / "j2.log").exists()


def test_the_report_reads_every_rule_the_accuracy_and_active_dims(tmp_path):
    a = {
        "factors": ["floor_hue", "shape"],
        "layers": ["z1", "z2"],
        "assigned_layer": {"floor_hue": "z1", "shape": "spread"},
        "assigned_layer_by_mi_mass": {"floor_hue": "z1", "shape": None},
        "assigned_layer_by_importance": {"floor_hue": "z1", "shape": "z2"},
        "mi_mass": [[0.9, 0.4], [0.1, 0.6]],
        "importance_share": [[0.8, 0.3], [0.2, 0.7]],
        "best_unit_nmi": [[0.7, 0.05], [0.02, 0.06]],
        "best_unit_nmi_interval": {"low": [[0.68, 0.0], [0.0, 0.01]], "high": [[0.72, 0.09], [0.04, 0.1]]},
    }
    dci = {"informativeness_per_factor": [0.98, 0.3], "chance_per_factor": [0.1, 0.27]}
    e = {
        "step": 3000,
        "evaluation": {
            "test": {
                "latents": {"z1": {"kl": 8.5, "active_units": 2}, "z2": {"kl": 0.01, "active_units": 0}},
                "likelihood": {"elbo": 3300.0},
                "disentanglement": {"assignment": a, "overall": {"dci": dci}, "factor_names": a["factors"]},
            }
        },
    }
    os.makedirs(tmp_path / "run-a")
    (tmp_path / "run-a" / "eval.json").write_text(json.dumps(e))
    os.makedirs(tmp_path / "run-b")
    (tmp_path / "run-b" / "eval.json").write_text(json.dumps({"step": 3000, "test": {}}))  # trained, not evaluated
    text = CP.report(str(tmp_path), ["run-a", "run-b"])
    assert "KL per layer z1 / z2 (nats): 8.50 / 0.01; active dims per layer: 2 / 0" in text
    assert "| floor_hue | 0.98 (0.10) | z1 | z1 | z1 | 0.70 [0.68, 0.72] / 0.02 [0.00, 0.04] |" in text
    assert "| shape | 0.30 (0.27) | spread | chance | z2 | 0.05 [0.00, 0.09] / 0.06 [0.01, 0.10] |" in text
    assert "#### run-b: not evaluated" in text
