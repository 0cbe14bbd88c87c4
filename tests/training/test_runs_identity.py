"""Run identity (issue 29, item 5): every run gets an id at creation, kept in ``config.json`` and every checkpoint; a
resume refuses a checkpoint of another run naming both, and writes nothing; runs saved before ids still resume."""

import json

import pytest

from pyro_vlae import run as R
from pyro_vlae.training import checkpoint as C
from pyro_vlae.training import runs as TR

QUIET = ("--no-progress", "--no-figures", "--no-eval")
BASE = ("--dataset", "synthetic", "--num-steps", "2", *QUIET)


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def resume(capsys, run, steps: int = 4):
    """``--resume RUN --num-steps STEPS`` in this process: ``(exit code, stderr)``, which holds no traceback."""
    code = R.main(["--resume", str(run), "--num-steps", str(steps), *QUIET])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def strip_ids(run):
    """Make ``run`` look like a run saved before run ids: no ``run_id`` in config.json or in its checkpoint."""
    config = json.loads((run / "config.json").read_text())
    config.pop("run_id", None)
    (run / "config.json").write_text(json.dumps(config))
    path = run / "checkpoints" / "latest.pt"
    state = C.load_checkpoint(str(path))
    state["config"].pop("run_id", None)
    C.save_checkpoint(str(path), state)


def resumes_and_gets_an_id(capsys, run):
    """A plain resume of ``run`` to step 4 works, and its config.json and new checkpoint hold one and the same id."""
    code, err = resume(capsys, run)
    assert code == 0, err
    run_id = json.loads((run / "config.json").read_text())["run_id"]
    state = C.load_checkpoint(str(run / "checkpoints" / "latest.pt"))
    assert state["step"] == 4 and run_id and state["config"]["run_id"] == run_id


@pytest.fixture
def donor_into_run(tmp_path, capsys):
    """A run, and a donor run of another likelihood, seed and learning rate whose checkpoint is copied into it."""
    run, donor = tmp_path / "run", tmp_path / "donor"
    assert R.main([*BASE, "--run-dir", str(run)]) == 0
    other = ("--likelihood", "gaussian", "--seed", "3", "--lr", "0.002")
    assert R.main([*BASE, *other, "--run-dir", str(donor)]) == 0
    (run / "checkpoints" / "latest.pt").write_bytes((donor / "checkpoints" / "latest.pt").read_bytes())
    capsys.readouterr()
    return run, donor


def test_a_donor_checkpoint_is_refused_naming_both_ids_and_nothing_is_written(donor_into_run, capsys):
    run, donor = donor_into_run
    before = snapshot(run)
    code, err = resume(capsys, run)
    assert code != 0
    assert err.startswith(f"error: refusing to resume {run}: its checkpoint") and err.count("\n") == 1, err
    ours, theirs = (json.loads((d / "config.json").read_text())["run_id"] for d in (run, donor))
    assert ours and theirs and ours != theirs
    assert f"run id {theirs} in the checkpoint, {ours} in config.json" in err
    assert "likelihood gaussian in the checkpoint, laplace in config.json" in err
    assert snapshot(run) == before  # config.json byte-identical, no metrics, no checkpoint, no lock left


def test_an_old_donor_without_ids_is_refused_by_its_settings(donor_into_run, capsys):
    run, donor = donor_into_run
    strip_ids(run), strip_ids(donor)
    (run / "checkpoints" / "latest.pt").write_bytes((donor / "checkpoints" / "latest.pt").read_bytes())
    before = snapshot(run)
    code, err = resume(capsys, run)
    assert code != 0 and err.count("\n") == 1 and "belongs to another run" in err
    for part in ("likelihood gaussian in the checkpoint, laplace", "seed 3 in the checkpoint, 0", "lr 0.002 in the"):
        assert part in err, err
    assert snapshot(run) == before


def test_a_run_saved_before_ids_still_resumes_and_gets_an_id(tmp_path, capsys):
    run = tmp_path / "run"
    assert R.main([*BASE, "--run-dir", str(run)]) == 0
    strip_ids(run)
    resumes_and_gets_an_id(capsys, run)


def test_the_id_is_made_at_creation_and_kept_by_every_checkpoint_and_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert R.main([*BASE, "--checkpoint-every", "1", "--keep-every", "1", "--run-dir", str(run)]) == 0
    run_id = json.loads((run / "config.json").read_text())["run_id"]
    assert len(run_id) >= 16
    assert R.main(["--resume", str(run), "--num-steps", "4", "--lr", "0.002", "--force-config", *QUIET]) == 0
    assert json.loads((run / "config.json").read_text())["run_id"] == run_id
    for name in ("step1.pt", "step3.pt", "latest.pt"):  # a run's last step is in latest.pt only
        assert C.load_checkpoint(str(run / "checkpoints" / name))["config"]["run_id"] == run_id


def test_the_same_id_accepts_settings_a_forced_resume_changed():
    """An id match is the run itself: a --force-config resume may have changed its learning rate since."""
    from pyro_vlae.presets import get_preset

    p = get_preset("tiny")
    saved = TR.RunConfig("vlae", "synthetic", "tiny", p.model, p.train, seed=1, run_id="a" * 16)
    theirs = TR.RunConfig.from_dict({**saved.to_dict(), "train": {**saved.train.to_dict(), "lr": 0.5}})
    assert TR.identity_differences(saved.to_dict(), theirs) == []
    other = TR.RunConfig.from_dict({**theirs.to_dict(), "run_id": "b" * 16})
    assert TR.identity_differences(saved.to_dict(), other)[0].startswith(
        f"run id {'b' * 16} in the checkpoint, {'a' * 16}"
    )


def test_the_checkpoint_is_read_after_the_run_lock_is_taken(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert R.main([*BASE, "--run-dir", str(run)]) == 0
    real, seen = R.load_checkpoint, []

    def load(path, *args, **kwargs):
        seen.append((run / "run.lock").exists())
        return real(path, *args, **kwargs)

    monkeypatch.setattr(R, "load_checkpoint", load)
    code, err = resume(capsys, run, 3)
    assert code == 0, err
    assert seen and all(seen)


def die_before_the_first_checkpoint(monkeypatch):
    """Make the next ``R.main`` stop where a killed resume would: ``config.json`` written, no checkpoint yet."""

    def killed(*args, **kwargs):
        raise OSError("killed before its first checkpoint")

    monkeypatch.setattr(R, "fit", killed)


@pytest.fixture
def legacy_run_after_a_killed_forced_resume(tmp_path, capsys, monkeypatch):
    """A run saved before ids, whose ``--force-config --lr 0.002`` resume died before writing a checkpoint."""
    run = tmp_path / "run"
    assert R.main([*BASE, "--run-dir", str(run)]) == 0
    strip_ids(run)
    with monkeypatch.context() as m:
        die_before_the_first_checkpoint(m)
        assert R.main(["--resume", str(run), "--num-steps", "4", "--lr", "0.002", "--force-config", *QUIET]) != 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["run_id"] and saved["train"]["lr"] == 0.002  # the id and the forced lr, with no checkpoint of them
    assert "run_id" not in C.load_checkpoint(str(run / "checkpoints" / "latest.pt"))["config"]
    capsys.readouterr()
    return run


def test_a_legacy_run_whose_forced_resume_died_before_a_checkpoint_resumes(
    legacy_run_after_a_killed_forced_resume, capsys
):
    run = legacy_run_after_a_killed_forced_resume
    resumes_and_gets_an_id(capsys, run)


def test_after_a_killed_forced_resume_an_old_donor_is_still_refused(legacy_run_after_a_killed_forced_resume, capsys):
    run, donor = legacy_run_after_a_killed_forced_resume, legacy_run_after_a_killed_forced_resume.parent / "donor"
    assert R.main([*BASE, "--seed", "3", "--run-dir", str(donor)]) == 0
    strip_ids(donor)
    (run / "checkpoints" / "latest.pt").write_bytes((donor / "checkpoints" / "latest.pt").read_bytes())
    capsys.readouterr()
    before = snapshot(run)
    code, err = resume(capsys, run)
    assert code != 0 and "belongs to another run" in err and "seed 3 in the checkpoint, 0" in err, err
    assert snapshot(run) == before
