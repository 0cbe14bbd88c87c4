"""The shipped files' format: the architecture is inside the hashed ``.pt`` (an edited ``.json`` is refused), the
re-packed files hold the very weights of the format-1 files, and a format-1 file is a clear error."""

import hashlib
import io
import json
import os
import shutil
import subprocess

import pytest
import torch

import pyro_vlae as pv
from pyro_vlae import pretrained as P
from pyro_vlae.pretrained import repack as R

#: :func:`pyro_vlae.pretrained.repack.weights_digest` of the format-1 files as shipped before the re-pack (computed
#: from them, at commit 45928b0): the re-packed files must hold exactly these tensors.
FORMAT1_DIGESTS = {
    "vlae-mnist": "e38aadc77bd0e994e5aba93629e558c4b40bc2666ec681e55158c8c266853996",
    "mnist-classifier": "66d03f9abc344ab194dc3d08cf58351a1eb06a42a949498499b52d4be9542ca5",
}
#: The last commit that shipped the format-1 files.
FORMAT1_COMMIT = "45928b0"


def copy_entry(tmp_path, monkeypatch, name):
    for ext in (".pt", ".json"):
        shutil.copy(os.path.join(P.FOLDER, name + ext), tmp_path / (name + ext))
    monkeypatch.setattr(P, "FOLDER", str(tmp_path))
    return tmp_path / (name + ".json")


def edit_json(path, edit):
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta, indent=2))


@pytest.mark.parametrize(
    "field, value",
    [("obs_scale", 0.25), ("value_range", [0.0, 255.0]), ("likelihood", "bernoulli")],
    ids=["obs_scale", "value_range", "likelihood"],
)
def test_an_edited_json_beside_a_shipped_model_is_refused(tmp_path, monkeypatch, field, value):
    path = copy_entry(tmp_path, monkeypatch, "vlae-mnist")
    edit_json(path, lambda meta: meta["config"]["model"].__setitem__(field, value))
    with pytest.raises(P.PretrainedError, match=rf"config\.model\.{field}: .* in vlae-mnist\.json, .* hashed") as e:
        pv.load_pretrained("vlae-mnist")
    assert "\n" not in str(e.value) and "reinstall" in str(e.value)


def test_an_edited_json_beside_the_shipped_classifier_is_refused(tmp_path, monkeypatch):
    path = copy_entry(tmp_path, monkeypatch, "mnist-classifier")
    edit_json(path, lambda meta: meta.__setitem__("feature_dim", 64))
    with pytest.raises(P.PretrainedError, match=r"feature_dim: 64 in mnist-classifier\.json, 128 in the hashed"):
        P.load_classifier("mnist-classifier")


def test_a_json_without_its_architecture_is_refused_in_one_short_line(tmp_path, monkeypatch):
    path = copy_entry(tmp_path, monkeypatch, "vlae-mnist")
    edit_json(path, lambda meta: meta.pop("config"))
    with pytest.raises(P.PretrainedError, match=r"config\.[a-z_.]+: null in vlae-mnist\.json, .* and \d+ more\)") as e:
        pv.load_pretrained("vlae-mnist")
    assert len(str(e.value)) < 600


def test_provenance_fields_outside_the_architecture_may_be_read_but_not_trusted_for_building(tmp_path, monkeypatch):
    """A note edited in the ``.json`` does not matter; the networks are built from the hashed config."""
    path = copy_entry(tmp_path, monkeypatch, "vlae-mnist")
    edit_json(path, lambda meta: meta.__setitem__("note", "edited"))
    model, _ = pv.load_pretrained("vlae-mnist")
    assert model.config.obs_scale == 0.125 and list(model.config.value_range) == [0.0, 1.0]


@pytest.mark.parametrize("name", sorted(FORMAT1_DIGESTS))
def test_the_shipped_files_are_the_current_format_with_the_format1_weights(name):
    with open(os.path.join(P.FOLDER, name + ".pt"), "rb") as f:
        state = torch.load(f, weights_only=True)
    assert state["format"] == P.FORMAT == 2
    assert R.weights_digest(state) == FORMAT1_DIGESTS[name]
    meta = P.info(name)
    assert meta["format"] == 2 and meta["repacked"]["weights_digest"] == FORMAT1_DIGESTS[name]


def _git_show(rev_path: str):
    root = os.path.dirname(os.path.dirname(P.FOLDER))
    try:
        return subprocess.run(["git", "show", rev_path], cwd=root, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


@pytest.mark.parametrize("name", sorted(FORMAT1_DIGESTS))
def test_the_loaded_weights_equal_the_format1_files_in_the_history(name):
    """Where the repository's history is at hand: every tensor the loader returns is bit-equal to the one it returned
    from the format-1 file."""
    old = _git_show(f"{FORMAT1_COMMIT}:pyro_vlae/pretrained/{name}.pt")
    if old is None:
        pytest.skip("not a git checkout with the format-1 commit")
    assert (
        hashlib.sha256(old).hexdigest()
        == json.loads(_git_show(f"{FORMAT1_COMMIT}:pyro_vlae/pretrained/{name}.json"))["sha256"]
    )
    old_state = torch.load(io.BytesIO(old), weights_only=True)
    assert old_state["format"] == 1 and R.weights_digest(old_state) == FORMAT1_DIGESTS[name]
    if name == "mnist-classifier":
        loaded = P.load_classifier(name).state_dict()
        expected = P._float32(old_state["classifier"])
    else:
        model, guide = pv.load_pretrained(name)
        loaded = {
            **{"m." + k: v for k, v in model.state_dict().items()},
            **{"g." + k: v for k, v in guide.state_dict().items()},
        }
        expected = {"m." + k: v for k, v in P._float32(old_state["model"]).items()}
        expected.update({"g." + k: v for k, v in P._float32(old_state["guide"]).items()})
        expected["m.ladder_gain"] = old_state["ladder_gain"].float()
    assert loaded.keys() == expected.keys()
    for k, v in expected.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k


def test_a_format1_file_is_a_clear_error_naming_the_fix(tmp_path, monkeypatch):
    path = copy_entry(tmp_path, monkeypatch, "vlae-mnist")
    state = torch.load(tmp_path / "vlae-mnist.pt", weights_only=True)
    old = {k: v for k, v in state.items() if k not in ("spec",)}
    old["format"] = 1
    torch.save(old, tmp_path / "vlae-mnist.pt")
    data = (tmp_path / "vlae-mnist.pt").read_bytes()
    edit_json(path, lambda meta: meta.__setitem__("sha256", hashlib.sha256(data).hexdigest()))
    with pytest.raises(P.PretrainedError, match="format-1 .* before the architecture was stored with the weights") as e:
        pv.load_pretrained("vlae-mnist")
    assert "python -m pyro_vlae.pretrained.export" in str(e.value) and "repack" in str(e.value)


def test_repack_converts_a_format1_entry_with_the_same_tensors_and_refuses_what_it_should(
    tmp_path, monkeypatch, capsys
):
    path = copy_entry(tmp_path, monkeypatch, "mnist-classifier")
    assert R.main(["mnist-classifier", "--folder", str(tmp_path)]) == 2  # already the current format
    assert "nothing to re-pack" in capsys.readouterr().err
    state = torch.load(tmp_path / "mnist-classifier.pt", weights_only=True)
    torch.save({"classifier": state["classifier"], "format": 1}, tmp_path / "mnist-classifier.pt")
    assert R.main(["mnist-classifier", "--folder", str(tmp_path)]) == 2  # the .json's SHA-256 is the format-2 file's
    assert "does not match the SHA-256" in capsys.readouterr().err
    data = (tmp_path / "mnist-classifier.pt").read_bytes()
    edit_json(path, lambda meta: meta.__setitem__("sha256", hashlib.sha256(data).hexdigest()))
    meta = R.repack("mnist-classifier", str(tmp_path), log=lambda *a: None)
    assert meta["repacked"]["weights_digest"] == FORMAT1_DIGESTS["mnist-classifier"] and meta["format"] == 2
    loaded = P.load_classifier("mnist-classifier").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in P._float32(state["classifier"]).items())
