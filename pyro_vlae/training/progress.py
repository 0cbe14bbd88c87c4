"""What a run reports while it trains: per-layer KLs, ``metrics.jsonl`` records, the progress bar and TensorBoard.

``layer_kls`` measures the KL of each layer; ``log_record`` makes one ``metrics.jsonl`` line of it, ``postfix`` the
progress bar's summary; ``truncate_metrics`` drops lines past a resumed step; ``open_tensorboard`` returns a writer when
TensorBoard is installed.
"""

from __future__ import annotations

import json
import os

import torch
from pyro import poutine

from .checkpoint import atomic_write_text


@torch.no_grad()
def layer_kls(model, guide, x: torch.Tensor) -> dict:
    """Per-layer KL ``E_q[log q(z_l|.) - log p(z_l|.)]`` per image, single-sample estimate, at ``kl_scale = 1``.

    Also returns ``"recon"``, the reconstruction log-likelihood per image, so ``elbo = recon - sum(kl)``.
    """
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        gtr = poutine.trace(guide).get_trace(x)
        mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(x)
    n = x.shape[0]
    out = {}
    for name in model.latent_sites:
        z = gtr.nodes[name]["value"]
        out[name] = float((gtr.nodes[name]["fn"].log_prob(z) - mtr.nodes[name]["fn"].log_prob(z)).sum()) / n
    out["recon"] = float(mtr.nodes["x"]["fn"].log_prob(x).sum()) / n
    return out


def truncate_metrics(path: str, step: int) -> None:
    """Keep only the ``metrics.jsonl`` lines at or before ``step`` (used when resuming)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:
                continue
    atomic_write_text(path, "".join(kept))


def log_record(model, guide, x, step, loss, kl_scale, img_per_s, elapsed) -> dict:
    was = model.training, guide.training
    model.eval(), guide.eval()  # no batch-norm statistics are updated by logging
    try:
        kls = layer_kls(model, guide, x)
    finally:
        model.train(was[0]), guide.train(was[1])
    kl_total = sum(v for k, v in kls.items() if k.startswith("z"))
    rec = {
        "step": step,
        "loss": float(loss) / x.shape[0],
        "kl_scale": kl_scale,
        "elbo": kls["recon"] - kl_total,
        "recon": kls["recon"],
        "img_per_s": img_per_s,
        "elapsed_s": elapsed,
    }
    rec.update({f"kl_{k}": v for k, v in kls.items() if k.startswith("z")})
    return rec


def postfix(rec: dict) -> dict:
    out = {"loss": f"{rec['loss']:.1f}", "elbo": f"{rec['elbo']:.1f}"}
    out.update({k[3:]: f"{v:.2f}" for k, v in rec.items() if k.startswith("kl_z")})
    out["img/s"] = f"{rec['img_per_s']:.0f}"
    return out


def open_tensorboard(run_dir, log):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:
        return None
    try:
        return SummaryWriter(os.path.join(run_dir, "tensorboard"))
    except Exception as e:  # pragma: no cover - optional extra
        log(f"tensorboard logging disabled: {e}")
        return None
