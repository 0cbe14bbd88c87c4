"""The interactive explorer (pyro_vlae/explore.py), driven through its matplotlib callbacks under the Agg backend."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.backend_bases import KeyEvent, MouseEvent  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

import pyro_vlae as pv  # noqa: E402
from pyro_vlae import explore as X  # noqa: E402
from pyro_vlae.training.runs import RunConfig, build, save_run_checkpoint  # noqa: E402


def tiny_model():
    config = pv.get_preset("tiny").model
    model = pv.get_model("vlae", config)
    return model.eval()


def make_explorer(model, **kwargs):
    fig = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(fig)
    return X.Explorer(model, figure=fig, **kwargs)


def click(ex, site, x, y, button=1):
    px, py = ex.pads[site].transData.transform((x, y))
    event = MouseEvent("button_press_event", ex.figure.canvas, px, py, button=button)
    ex.figure.canvas.callbacks.process("button_press_event", event)


def press(ex, key):
    ex.figure.canvas.callbacks.process("key_press_event", KeyEvent("key_press_event", ex.figure.canvas, key))


@torch.no_grad()
def expected_grid(model, ex):
    """The grid recomputed without handlers: the decoder on the set codes (repeated) and the free layers' draws."""
    n = ex.num_images
    zs = [ex.fixed[s].expand(n, -1) if s in ex.fixed else ex.draws[s] for s in model.latent_sites]
    images = model.likelihood.mean(model.decode(zs)).clamp(0, 1)
    return make_grid(images, nrow=ex.grid, padding=1, pad_value=1.0)[0].numpy()


def shown(ex):
    return np.asarray(ex.grid_ax.images[-1].get_array())


def test_a_click_sets_the_layer_and_redraws_the_grid():
    model = tiny_model()
    ex = make_explorer(model, grid=4)
    assert ex.sites == ["z3", "z2", "z1"] and not ex.fixed
    np.testing.assert_allclose(shown(ex), expected_grid(model, ex), atol=1e-6)
    before = shown(ex).copy()
    click(ex, "z3", 1.0, -0.5)
    np.testing.assert_allclose(ex.fixed["z3"].numpy(), [1.0, -0.5], atol=1e-4)
    np.testing.assert_allclose(shown(ex), expected_grid(model, ex), atol=1e-6)
    assert not np.allclose(shown(ex), before)
    assert "z3=(1.00, -0.50)" in ex.grid_ax.get_title()


def test_keys_resample_the_free_layers_only_and_clear():
    model = tiny_model()
    ex = make_explorer(model, grid=3)
    click(ex, "z2", -1.5, 2.0)
    draws = {s: d.clone() for s, d in ex.draws.items()}
    press(ex, "r")
    assert not torch.equal(ex.draws["z1"], draws["z1"]) and not torch.equal(ex.draws["z3"], draws["z3"])
    codes = ex.codes()
    torch.testing.assert_close(codes["z2"], torch.tensor([[-1.5, 2.0]] * 9), atol=1e-4, rtol=0)
    np.testing.assert_allclose(shown(ex), expected_grid(model, ex), atol=1e-6)
    press(ex, "x")  # other keys do nothing
    assert set(ex.fixed) == {"z2"}
    click(ex, "z2", 0.0, 0.0, button=3)  # right click frees the layer
    assert not ex.fixed
    click(ex, "z1", 0.5, 0.5)
    click(ex, "z3", 0.5, 0.5)
    press(ex, "c")
    assert not ex.fixed
    np.testing.assert_allclose(shown(ex), expected_grid(model, ex), atol=1e-6)


def test_set_code_checks_the_layer_and_size():
    ex = make_explorer(tiny_model(), grid=2)
    with pytest.raises(ValueError, match="unknown layer 'z9'; the layers are z1, z2, z3"):
        ex.set_code("z9", [0.0, 0.0])
    with pytest.raises(ValueError, match="z1 has 2 dimension\\(s\\); got a code of 3 values"):
        ex.set_code("z1", [0.0, 0.0, 0.0])


def test_save_writes_the_view_headless_from_a_pretrained_name(tmp_path, capsys):
    path = tmp_path / "view.png"
    assert X.main(["vlae-mnist", "--set", "z3=1.5,-0.5", "--grid", "4", "--save", str(path)]) == 0
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 300
    assert capsys.readouterr().out.strip() == str(path)


def test_a_run_folder_is_a_source_too(tmp_path):
    config = RunConfig("vlae", "synthetic", "tiny", pv.get_preset("tiny").model, pv.get_preset("tiny").train)
    model, guide, optim, _ = build(config, "cpu")
    save_run_checkpoint(str(tmp_path), model, guide, optim, 0, config)
    loaded = X.load_source(str(tmp_path))
    ex = make_explorer(loaded, grid=2)
    assert ex.images().shape == (4, 1, 16, 16)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["no-such-model", "--save", "x.png"], "error: 'no-such-model' is neither a run folder nor a pretrained name"),
        (["vlae-mnist", "--set", "z3:1,2", "--save", "x.png"], "error: --set 'z3:1,2': expected LAYER=X,Y"),
        (["vlae-mnist", "--set", "z7=1,2", "--save", "x.png"], "error: unknown layer 'z7'"),
    ],
    ids=["unknown-source", "bad-set", "unknown-layer"],
)
def test_bad_input_is_a_one_line_error(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert X.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
