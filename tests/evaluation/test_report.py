"""report.md: the numbers of eval.json and every figure reach the Markdown; absent blocks are left out."""

import os

import numpy as np
import pytest

from pyro_vlae.evaluation import report as R
from pyro_vlae.evaluation.disentangle import evaluate_all
from pyro_vlae.presets import get_preset
from pyro_vlae.training.runs import RunConfig


def _config(kind="vlae", dataset="synthetic"):
    preset = get_preset("tiny")
    return RunConfig(kind, dataset, "tiny", preset.model, preset.train)


def _evaluation(**extra):
    latents = {
        "z1": {"kl": 3.3381, "kl_method": "analytic", "dims": 2, "active_units": 2, "au_variance": [1.2, 0.8]},
        "z2": {"kl": 0.000123, "kl_method": "monte-carlo", "dims": 2, "active_units": 0, "au_variance": [0.0, 0.0]},
    }
    block = {
        "likelihood": {
            "num_images": 128, "num_samples": 50, "num_dims": 256, "likelihood": "laplace", "density": True,
            "elbo": -14.33127, "iwae": 8.37912, "iwae_stderr": 3.69311, "iwae_minus_elbo": 22.71039,
            "recon": -8.40021, "kl_total": 3.33822, "elbo_bpd": 0.08076, "iwae_bpd": -0.04722, "seconds": 0.3,
        },
        "latents": latents,
        "settings": {"split": "test", "num_samples": 50, "seed": 0, "checkpoint_step": 100, "device": "cpu",
                     "seconds": 2.9},
    }  # fmt: skip
    block.update(extra)
    return {"step": 100, "test": {"elbo": -14.9}, "evaluation": {"test": block}}


def _with_classifier(data):
    ev = data["evaluation"]["test"]
    ev["classifier"] = {"test_accuracy": 0.984375, "cached": True, "path": "x.pt"}
    ev["sample_quality"] = {"num_images": 128, "fd_samples": 59.70612, "fd_train_vs_eval": 1.02841}
    ev["probes"] = {
        s: {"train_accuracy": 0.8, "test_accuracy": a, "majority_baseline": 0.1016}
        for s, a in (("z1", 0.71875), ("z2", 0.578125), ("all", 1.0))
    }
    for s in ("z1", "z2"):
        ev["latents"][s]["probe_accuracy"] = ev["probes"][s]["test_accuracy"]
    return data


def _diagnostics(data):
    """``layers`` and ``gibbs`` blocks shaped as ``pyro_vlae.evaluation.diagnostics`` writes them."""
    data["layers"] = {
        "model_kind": "vlae",
        "layers": {
            "z1": {"variance_share": 0.597315, "class_change_rate": 0.0416667, "kl_per_dim": [0.9, 1.5]},
            "z2": {"variance_share": 0.450814, "class_change_rate": 0.1145833, "kl_per_dim": [0.1, 0.2]},
        },
        "baseline_class_change_rate": 0.0875,
        "settings": {"num_groups": 32, "num_samples": 16, "seed": 0},
    }
    chain = {"keep": ["z1"], "max_rhat": 1.04912, "min_ess_bulk": 163.921, "class_switch_rate": 0.0,
             "stats": {"z1[0]": {"rhat": 1.01, "ess_bulk": 200.0}}}  # fmt: skip
    data["gibbs"] = {
        "model_kind": "vlae", "num_chains": 8, "num_steps": 100, "burn_in": 50, "seed": 0,
        "chains": {"z1": chain, "all": {**chain, "keep": ["z1", "z2"], "max_rhat": 1.5311}},
        "frechet_distance": {"reference_images": 128, "num_images": 400, "gibbs_z1": 65.7421, "ancestral": 64.1603},
    }  # fmt: skip
    return data


def test_title_likelihood_and_layer_numbers():
    text = R.render_report(_evaluation(), _config(), [])
    assert text.startswith("# VLAE on synthetic: preset tiny, 100 steps\n")
    for number in ("-14.331", "8.379 ± 3.693", "22.710", "-8.400", "0.0808", "-0.0472"):
        assert number in text, number
    assert "log p(x), IWAE bound (K = 50)" in text and "log *density*" in text
    assert "| layer | dims | KL (nats) | active units |\n" in text  # no probes without a classifier
    assert "| z1 | 2 | 3.338 | 2/2 |" in text
    assert "| z2 | 2 | 1.23e-04 (MC) | 0/2 |" in text
    assert "E_q[log p(x\\|z)]" in text  # a '|' inside a cell is escaped, so the table keeps its columns
    assert "not measured" in text and "## Classifier" not in text and "## Gibbs" not in text
    assert "## Disentanglement" not in text and "## Figures" not in text


def test_classifier_probes_and_diagnostics_blocks():
    text = R.render_report(_diagnostics(_with_classifier(_evaluation())), _config(), [])
    header = "| layer | dims | KL (nats) | active units | probe accuracy | variance share | class change rate |"
    assert header in text
    assert "| z1 | 2 | 3.338 | 2/2 | 0.7188 | 0.5973 | 0.0417 |" in text
    assert "| all layers | - | - | - | 1.000 | - | - |" in text
    assert "majority-class baseline 0.1016" in text and "(independent samples: 0.0875)" in text
    for number in ("0.9844", "59.706", "1.028", "65.742", "64.160"):
        assert number in text, number
    assert "Gibbs chain keeping z1 (400 images, diagnostics)" in text
    assert "num chains 8, num steps 100, burn in 50, seed 0." in text
    assert "from an earlier run of the diagnostics" not in text
    data = _diagnostics(_evaluation())
    data["evaluation"]["test"]["settings"]["diagnostics"] = "skipped"
    assert "from an earlier run of the diagnostics" in R.render_report(data, _config(), [])
    assert "| chain keeps | max R-hat | min bulk ESS | class switch rate |" in text
    assert "| z1 | 1.049 | 163.92 | 0 |" in text and "| all | 1.531 | 163.92 | 0 |" in text


def test_disentanglement_assignment_table():
    rng = np.random.default_rng(0)
    factors = rng.integers(0, 4, size=(300, 2))
    noise = rng.standard_normal((300, 2))
    codes = np.stack([factors[:, 0] + 0.1 * noise[:, 0], noise[:, 1], factors[:, 1] + 0.1 * noise[:, 0], noise[:, 0]])
    dis = evaluate_all(codes.T, factors, groups=[("z1", slice(0, 2)), ("z2", slice(2, 4))], factor_names=["shape", "x"])
    text = R.render_report(_evaluation(disentanglement=dis), _config(dataset="sprites"), [])
    assert "## Disentanglement" in text and "| codes | mig | mig sup |" in text
    assert "| layer | shape | x |" in text and "| assigned layer | z1 | z2 |" in text
    assert f"| all layers | {R.fmt(dis['overall']['summary']['mig'])} |" in text
    a = dis["assignment"]
    assert R.fmt(a["mi_mass"][0][0]) in text
    assert "DCI importance (fit on the active codes)" in text and text.count("| assigned layer | z1 | z2 |") == 3
    z1 = dis["layers"]["z1"]["summary"]  # a layer has no DCI disentanglement or completeness: "-" in their columns
    assert f"| z1 | {R.fmt(z1['mig'])} | {R.fmt(z1['mig_sup'])} | - | - | {R.fmt(z1['dci_informativeness'])} |" in text
    # The headline table: each layer's best dim with its bootstrap interval, the rule under it.
    band = a["best_unit_nmi_interval"]
    cell = f"{R.fmt(a['best_unit_nmi'][0][0])} [{R.fmt(band['low'][0][0])}, {R.fmt(band['high'][0][0])}]"
    assert f"| z1 | {cell} |" in text and "best single dim (95% bootstrap interval in brackets)" in text
    assert text.index("best single dim") < text.index(R.RULE) < text.index("summed over its dims")
    assert "posterior-mean variance > 0.01" in text  # no explained shares given: the old criterion, said so
    shared = evaluate_all(codes.T, factors, groups=[("z1", slice(0, 2)), ("z2", slice(2, 4))], explained_share=[1] * 4)
    shared_text = R.render_report(_evaluation(disentanglement=shared), _config(dataset="sprites"), [])
    assert "over active dims only (x explains over 1% of the dim's variance)" in shared_text
    # An eval.json from before the best-dim rule: its summed-share headline, said to be the earlier rule.
    old = {k: v for k, v in a.items() if k not in ("rule", "assigned_layer_by_mi_mass")}
    old_text = R.render_report(_evaluation(disentanglement={**dis, "assignment": old}), _config(dataset="sprites"), [])
    assert "an earlier rule" in old_text and R.RULE not in old_text
    assert old_text.count("| assigned layer | z1 | z2 |") == 2


def test_layers_table_prints_both_activity_counts():
    """With explained shares in eval.json, ``active units`` is the scale-free count and Burda et al.'s is beside it;
    an older eval.json keeps its one column and its own wording."""
    data = _evaluation()
    for v, new, old in zip(data["evaluation"]["test"]["latents"].values(), (2, 1), (1, 0)):
        v.update(active_units=new, active_units_mean_variance=old, explained_share=[0.9, 0.5])
    text = R.render_report(data, _config(), [])
    assert "| layer | dims | KL (nats) | active units | mean var > 0.01 |" in text
    assert "| z1 | 2 | 3.338 | 2/2 | 1/2 |" in text and "| z2 | 2 | 1.23e-04 (MC) | 1/2 | 0/2 |" in text
    assert "Var_x(E[z|x]) / Var(z) > 0.01" in text
    text = R.render_report(_with_classifier(data), _config(), [])
    assert "| all layers | - | - | - | - | 1.000 |" in text  # the probe of all layers stays in its column
    assert "Var_x(E[z|x])" not in R.render_report(_evaluation(), _config(), [])


def test_a_spread_factor_prints_as_spread():
    """A factor whose high bit is in z1 and low bit in z2 has no clear layer: the row says `spread`, the rule above the
    table says when a layer is named, and a factor at chance keeps `-`."""
    rng = np.random.default_rng(0)
    factors = rng.integers(0, 4, size=(300, 3))
    bits = np.stack([factors[:, 0] // 2, factors[:, 1], factors[:, 0] % 2, rng.standard_normal(300)], axis=1)
    codes = bits + 0.02 * rng.standard_normal(bits.shape)
    groups = [("z1", slice(0, 2)), ("z2", slice(2, 4))]
    dis = evaluate_all(codes, factors, groups=groups, factor_names=["split", "shape", "x"])
    text = R.render_report(_evaluation(disentanglement=dis), _config(dataset="sprites"), [])
    assert text.count("| assigned layer | spread | z1 | - |") == 3
    assert R.RULE in text and "`spread` where no layer leads" in text


def test_figures_are_linked_with_captions_in_reading_order(tmp_path):
    folder = tmp_path / "figures"
    folder.mkdir()
    names = ["traversal_layer2.png", "intervention_layer10.png", "intervention_layer2.png", "prior_samples.png",
             "reconstructions.png", "gibbs_chain.png", "notes.txt"]  # fmt: skip
    for n in names:
        (folder / n).write_bytes(b"\x89PNG")
    figures = R.list_figures(str(tmp_path))
    assert figures == [
        "reconstructions.png", "prior_samples.png", "intervention_layer2.png", "intervention_layer10.png",
        "traversal_layer2.png", "gibbs_chain.png",
    ]  # fmt: skip
    path = R.write_report(str(tmp_path), _evaluation(), _config())
    with open(path) as f:
        text = f.read()
    for f in figures:
        assert f"](figures/{f})" in text and f"*{R.figure_caption(f)}*" in text
    assert "notes.txt" not in text
    assert "Resampling layer 10 alone" in text and "Gibbs chain." in text
    assert sorted(os.listdir(tmp_path)) == ["figures", "report.md"]  # written atomically: no temporary left


@pytest.mark.parametrize(
    "value,text",
    [(None, "-"), (True, "yes"), (3, "3"), (0.0, "0"), (1234.5, "1,234.5"), (123.456, "123.46"), (12.3456, "12.346"),
     (0.123456, "0.1235"), (1.5e-5, "1.50e-05"), (float("nan"), "nan")],
    ids=["none", "bool", "int", "zero", "thousands", "hundreds", "tens", "fraction", "tiny", "nan"],
)  # fmt: skip
def test_number_format(value, text):
    assert R.fmt(value) == text
