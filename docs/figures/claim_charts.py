"""Draw the reproduction page's two charts from the committed results files (no run folder needed).

``python docs/figures/claim_charts.py`` writes ``docs/figures/c4_scores.png`` (C4: the three models' disentanglement
scores side by side, from ``docs/results/c4.json``) and ``docs/figures/speed.png`` (the training step's images per
second and share of the matmul ceiling, from ``docs/results/speed.json``), each written atomically.
"""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(os.path.dirname(HERE), "results")


def _load(name: str) -> dict:
    with open(os.path.join(RESULTS, f"{name}.json")) as f:
        return json.load(f)


def _save(fig, name: str) -> str:
    path = os.path.join(HERE, name)
    tmp = f"{path}.{os.getpid()}.tmp.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def c4_scores() -> str:
    """Bars of MIG, SAP and DCI disentanglement / completeness / informativeness per model."""
    runs = _load("c4")["runs"][:3]
    labels = ["VLAE", "Markov HVAE", "β-VAE"]
    metrics = [("mig", "MIG"), ("sap", "SAP"), ("dci_d", "DCI dis."), ("dci_c", "DCI compl."), ("dci_i", "DCI inform.")]
    fig, ax = plt.subplots(figsize=(7.5, 3.0))
    width = 0.26
    for k, (run, label) in enumerate(zip(runs, labels)):
        xs = [m + (k - 1) * width for m in range(len(metrics))]
        ax.bar(xs, [run["numbers"][key] for key, _ in metrics], width, label=label)
    ax.set_xticks(range(len(metrics)), [name for _, name in metrics])
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title("C4: shapes3d 32×32, about one epoch per model, one seed (docs/results/c4.json)", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    return _save(fig, "c4_scores.png")


def speed() -> str:
    """Images per second (Pyro and hand-written) and the share of the matmul ceiling against the 60 % target."""
    data = _load("speed")
    runs = data["runs"]
    names = [r["run"].replace(", ", "\n") for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.5, 3.0))
    xs = range(len(runs))
    left.bar([x - 0.2 for x in xs], [r["numbers"]["pyro"] for r in runs], 0.4, label="Pyro SVI step")
    left.bar([x + 0.2 for x in xs], [r["numbers"]["hand"] for r in runs], 0.4, label="hand-written step")
    left.set_xticks(list(xs), names, fontsize=8)
    left.set_ylabel("images / s (2 CPU cores)")
    left.legend(fontsize=8, frameon=False)
    right.bar([x - 0.2 for x in xs], [r["numbers"]["ceiling_pct"] for r in runs], 0.4, label="Pyro")
    right.bar([x + 0.2 for x in xs], [r["numbers"]["ceiling_hand_pct"] for r in runs], 0.4, label="hand-written")
    target = data["setup"]["target_ceiling_pct"]
    right.axhline(target, color="k", ls="--", lw=1, label=f"target {target} %")
    right.set_xticks(list(xs), names, fontsize=8)
    right.set_ylim(0, 100)
    right.set_ylabel("% of the matmul ceiling")
    right.legend(fontsize=8, frameon=False, loc="upper right")
    fig.suptitle("Speed: batch 100, torch 2.14.1, pyro 1.9.2 (docs/results/speed.json)", fontsize=9)
    return _save(fig, "speed.png")


if __name__ == "__main__":
    for path in (c4_scores(), speed()):
        print(path, os.path.getsize(path), "bytes")
