r"""Proposition 1, shown: a Markov HVAE trained to the optimum, whose bottom-layer Gibbs chain recovers ``p_data``.

The data come from a 3-layer linear-Gaussian Markov model over 16-d vectors whose exact posteriors are diagonal
(orthogonal loadings, diagonal transitions; see ``linear_gaussian_toy.toy_truth``), so the optimum is inside the
family of the library's ``MarkovHVAEModel`` / ``MarkovHVAEGuide`` with ``conditionals="affine"`` on vector data.
The pair is trained by SVI with ``Trace_ELBO`` on fresh draws of ``p_data``, then compared with the closed forms:

* the ELBO (exact expectation, and a Monte Carlo estimate) against its optimum ``-H(p_data)`` (Prop. 1, Eq. 5);
* the stationary law of the chain of Eq. 6, ``z_1 ~ q(z_1|x)``, ``x ~ p(x|z_1)`` (discrete Lyapunov equation),
  against ``p_data`` as a Gaussian KL, and the same for ancestral samples of the whole model;
* the library's ``gibbs_chain`` on 10k chains against the closed form (a check of both).

Two controls must fail as theory predicts, each measured on the library's simulated chains, so each can fail.

* The mean-fed chain (``feed="mean"``) drops the likelihood's noise: its law lives on the ``d_1``-dimensional range
  of the decoder (its KL to ``p_data`` is infinite), and it is under-dispersed even on that range.  At the optimum,
  along the ``k``-th direction of the range (signal-to-noise ratio ``snr_k``, chain autocorrelation
  ``rho_k = snr_k / (1 + snr_k)``) the data's variance is ``D_k = s_0^2 (1 + snr_k)``; the sample-fed chain keeps it,
  ``D_k = rho_k^2 D_k + c_k + s_0^2``, the mean-fed one loses the ``s_0^2``: ``V_k = D_k - s_0^2 / (1 - rho_k^2)``,
  so ``V_k / D_k = r_k = snr_k / (1 + 2 snr_k)`` and the KL on the range is ``K* = 1/2 sum_k (r_k - 1 - log r_k)``
  (1.086 nats for this toy; :func:`mean_fed_kl_at_optimum`).  The check: the *simulated* mean-fed chain's KL on the
  range is at least ``K*/2``, and its samples span only ``d_1`` dimensions.  A chain that fed samples would score at
  most ``KL(chain || data) <= 0.02`` there (a projection never raises a KL), 27 times below ``K*/2``, and span all
  ``DIM``: both checks would fail.
* A guide whose ``q(z_1|x)`` mean map is scaled by 1.05 lowers the ELBO by about ``E KL(q'||q)`` (a second-order,
  small change) but moves the chain's law by much more, while ancestral samples, which never use the guide, are
  untouched.

    python benchmarks/claims/gibbs_toy.py [--quick] [--seed 0] [--chains 10000] [--figure PATH]

``--figure`` draws the per-direction variances of the data, the trained chain, the mean-fed chain and the
perturbed-guide chain (simulated), and their KLs against the targets.

It prints every figure with its target and exits with status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time

import numpy as np
import pyro
import torch
from linear_gaussian_toy import (
    chain_after,
    chain_law,
    data_law,
    elbo,
    empirical_kl,
    exact_guide,
    gaussian_kl,
    guide_links,
    kl_floor,
    model_links,
    neg_entropy,
    sample_chain_model,
    set_links,
    toy_truth,
)
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import ClippedAdam

from pyro_vlae.experiments.gibbs import gibbs_chain
from pyro_vlae.guides import get_guide
from pyro_vlae.models import get_model
from pyro_vlae.nets import ModelConfig
from pyro_vlae.training.loop import VALIDATED_STEPS

DIM, LATENT = 16, (8, 8, 8)
ELBO_TOL = 0.02  # nats per dimension below -H
CHAIN_TOL = 0.02  # KL(chain || data), nats
CLEARLY_WORSE = 5  # a control must be at least this many times the chain target
MEAN_FED_SHARE = 0.5  # the simulated mean-fed chain's KL on the decoder's range must reach this share of K*
PERTURB = 1.05  # the perturbed guide scales q(z_1|x)'s mean map by this
SCHEDULES = {  # steps, batch size, first and last learning rate (exponential decay)
    "full": (12000, 1024, 1e-2, 1e-4),
    "quick": (3000, 512, 1e-2, 5e-4),
}


def toy_config() -> ModelConfig:
    return ModelConfig(
        name="gibbs-toy",
        image_shape=(DIM,),
        latent_dims=LATENT,
        conditionals="affine",
        likelihood="gaussian-learned",
        obs_scale=1.0,
        value_range=None,
        batch_norm=False,
    )


def train(truth, schedule, seed, log):
    """SVI with ``Trace_ELBO`` on fresh batches of ``p_data``; returns the trained model and guide."""
    steps, batch, lr, lr_end = schedule
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    model, guide = get_model("hvae", toy_config()), get_guide("hvae", toy_config())
    optim = ClippedAdam({"lr": lr, "lrd": (lr_end / lr) ** (1 / steps), "clip_norm": 100.0})
    svi = SVI(model, guide, optim, Trace_ELBO())
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(1, steps + 1):
        with pyro.validation_enabled(step <= VALIDATED_STEPS):  # as the library's fit: checked, then fast
            loss = svi.step(sample_chain_model(truth, LATENT[-1], batch, gen))
        if step % (steps // 5) == 0:
            log(f"  step {step:6d}  -ELBO per dim on the batch {loss / batch / DIM:.4f}")
    return model, guide


@torch.no_grad()
def mc_elbo(model, guide, x):
    """Monte Carlo ELBO per example (one ``z`` draw each): mean and standard error, through Pyro traces."""
    gtr = poutine.trace(guide).get_trace(x)
    mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(x)
    per = sum(mtr.nodes[s]["fn"].log_prob(mtr.nodes[s]["value"]) for s in ["x", *model.latent_sites])
    per = per - sum(gtr.nodes[s]["fn"].log_prob(gtr.nodes[s]["value"]) for s in model.latent_sites)
    per = per.double()
    return per.mean().item(), per.std().item() / math.sqrt(len(per))


def mean_fed_kl_at_optimum(truth) -> float:
    """``K*``, the KL to ``p_data`` of the mean-fed chain's stationary law on the decoder's range at the optimum (the
    exact guide), from the closed forms; equal to ``1/2 sum_k (r_k - 1 - log r_k)``, ``r_k = snr_k / (1 + 2 snr_k)``."""
    exact, _ = exact_guide(truth, LATENT[-1])
    mean, cov, _ = chain_law(exact[0], truth[-1], "mean")
    return on_range(mean, cov, truth[-1].A, *data_law(truth, LATENT[-1]))


def on_range(mean, cov, decoder_A, mx, Sx) -> float:
    """``KL(N(mean, cov) || N(mx, Sx))`` of the two laws projected on the range of the decoder's matrix."""
    basis = np.linalg.svd(decoder_A, full_matrices=False)[0]
    return gaussian_kl(basis.T @ mean, basis.T @ cov @ basis, basis.T @ mx, basis.T @ Sx @ basis)


def sample_rank(x: np.ndarray) -> int:
    """Numerical rank of the samples' covariance (eigenvalues above 1e-6 of the largest)."""
    eig = np.linalg.eigvalsh(np.cov(x, rowvar=False))
    return int((eig > 1e-6 * eig.max()).sum())


def mean_fed_checks(rep: dict, k_star: float) -> list:
    """The mean-fed control's checks on the simulated chain (see the module text for why each can fail)."""
    return [
        (f"mean-fed chain: KL on the decoder's range >= K*/2 = {MEAN_FED_SHARE * k_star:.3f} (simulated)",
         rep["kl_range_sim"] >= MEAN_FED_SHARE * k_star),
        (f"mean-fed chain: samples span {LATENT[0]} of {DIM} dimensions (simulated)", rep["rank_sim"] == LATENT[0]),
    ]  # fmt: skip


def chain_report(name, model, guide, truth_law, x0, steps, feed, seed):
    """Closed-form stationary law and ``gibbs_chain`` simulation of one chain; returns the figures."""
    mx, Sx = truth_law
    ml, gl = model_links(model), guide_links(guide)
    mean, cov, M = chain_law(gl[0], ml[-1], feed)
    out = gibbs_chain(model, guide, x0, steps, return_means=False, seed=seed, feed=feed).samples[-1]
    x = out.double().numpy()
    rank = int(np.linalg.matrix_rank(cov, tol=1e-8 * np.abs(cov).max()))
    r = {"name": name, "rho": float(np.abs(np.linalg.eigvals(M)).max()), "rank": rank, "rank_sim": sample_rank(x)}
    r["samples"] = x
    r["tr_pred"], r["tr_sim"] = float(np.trace(cov)), float(np.trace(np.cov(x, rowvar=False)))
    r["kl"] = gaussian_kl(mean, cov, mx, Sx) if rank == len(mx) else math.inf
    if rank == len(mx):
        m_t, c_t = chain_after(gl[0], ml[-1], x0.double().mean(0).numpy(), np.cov(x0.double().numpy().T), steps, feed)
        r["kl_sim"], r["kl_sim_vs_closed"] = empirical_kl(out, mx, Sx), empirical_kl(out, m_t, c_t)
    # on the decoder's range, where even the mean-fed chain's law has full rank
    r["kl_range"] = on_range(mean, cov, ml[-1].A, mx, Sx)
    r["kl_range_sim"] = on_range(x.mean(0), np.cov(x, rowvar=False), ml[-1].A, mx, Sx)
    return r


def expected_q_kl(perturbed, exact, mean, cov) -> float:
    """``E_{x ~ N(mean, cov)} KL(q'(z_1|x) || q(z_1|x))`` for two diagonal affine-Gaussian links."""
    dA, db = perturbed.A - exact.A, perturbed.b - exact.b
    shift2 = (dA @ mean + db) ** 2 + np.einsum("ij,jk,ik->i", dA, cov, dA)
    ratio = perturbed.s**2 / exact.s**2
    return float(0.5 * np.sum(ratio + shift2 / exact.s**2 - 1 - np.log(ratio)))


def run(args) -> int:
    t0 = time.time()
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    schedule = SCHEDULES["quick" if args.quick else "full"]
    truth = toy_truth(DIM, LATENT[0], seed=0)
    mx, Sx = data_law(truth, LATENT[-1])
    neg_h = neg_entropy(Sx)
    exact, off = exact_guide(truth, LATENT[-1])
    log(f"data: x in R^{DIM}, latents {LATENT}; -H(p_data) = {neg_h:.4f} nats = {neg_h / DIM:.5f} per dim")
    log(f"  exact posteriors diagonal: largest off-diagonal covariance {off:.1e}")
    pyro.set_rng_seed(args.seed)
    ref_model, ref_guide = get_model("hvae", toy_config()), get_guide("hvae", toy_config())
    set_links(ref_model, ref_guide, truth, exact)
    ref = chain_law(guide_links(ref_guide)[0], model_links(ref_model)[-1])
    log(
        f"  the library pair at the true parameters: ELBO - (-H) = "
        f"{elbo(mx, Sx, model_links(ref_model), guide_links(ref_guide)) - neg_h:.1e}, "
        f"KL(chain || data) = {gaussian_kl(ref[0], ref[1], mx, Sx):.1e}  (closed forms; both 0 in theory)"
    )
    log(f"training: {schedule[0]} SVI steps, batch {schedule[1]}, Adam lr {schedule[2]:g} -> {schedule[3]:g}")
    t_train = time.time()
    model, guide = train(truth, schedule, args.seed, log)
    log(f"  trained in {time.time() - t_train:.1f} s")
    model.eval(), guide.eval()
    ml, gl = model_links(model), guide_links(guide)
    gen = torch.Generator().manual_seed(args.seed + 2)
    checks = []

    def check(label, ok):
        checks.append((label, bool(ok)))

    log("\nELBO (Prop. 1: the optimum is -H(p_data))")
    e = elbo(mx, Sx, ml, gl)
    mc, se = mc_elbo(model, guide, sample_chain_model(truth, LATENT[-1], 100_000, gen))
    gap = (neg_h - e) / DIM
    log(f"  trained ELBO {e:.4f} (exact expectation), {mc:.4f} +- {se:.4f} (Monte Carlo, 100k draws)")
    log(f"  -H - ELBO = {neg_h - e:.4f} nats = {gap:.5f} per dim   target <= {ELBO_TOL}")
    check("ELBO within 0.02 nats/dim of -H", gap <= ELBO_TOL)
    check("Monte Carlo ELBO agrees with the closed form (4 s.e.)", abs(mc - e) <= 4 * se)

    x0 = sample_chain_model(truth, LATENT[-1], args.chains, gen)
    floor = kl_floor(DIM, args.chains)
    log(f"\nchains of Eq. 6: {args.chains} chains, {args.steps} steps from data draws")
    log(f"  (sampling floor of an empirical Gaussian KL at this size ~ {floor:.4f})")
    rep = chain_report("trained", model, guide, (mx, Sx), x0, args.steps, "sample", args.seed)
    log(f"  stationary law (Lyapunov): KL(chain || data) = {rep['kl']:.4f}   target <= {CHAIN_TOL}")
    log(f"  largest |eigenvalue| of the chain's map {rep['rho']:.3f}")
    log(
        f"  gibbs_chain: KL(empirical || data) = {rep['kl_sim']:.4f}, "
        f"KL(empirical || closed-form law after {args.steps} steps) = {rep['kl_sim_vs_closed']:.4f}"
    )
    check("KL(chain || data) <= 0.02", rep["kl"] <= CHAIN_TOL)
    check("gibbs_chain matches the closed-form chain law (3 x floor)", rep["kl_sim_vs_closed"] <= 3 * floor)
    ma, Ca = data_law(ml, LATENT[-1])
    with torch.no_grad():
        anc = poutine.trace(model).get_trace(batch_size=args.chains).nodes["x"]["value"]
    kl_anc = gaussian_kl(ma, Ca, mx, Sx)
    log(f"  ancestral samples: KL(model || data) = {kl_anc:.4f}   target <= {CHAIN_TOL}")
    log(f"  ({empirical_kl(anc, mx, Sx):.4f} from {args.chains} draws of the library model)")
    check("KL(ancestral || data) <= 0.02", kl_anc <= CHAIN_TOL)

    log("\ncontrol 1: the mean-fed chain (x' = mean of p(x|z_1)); theory: its law lives on the decoder's range,")
    log("  under-dispersed there by r_k = snr_k / (1 + 2 snr_k) per direction")
    mean_rep = chain_report("mean", model, guide, (mx, Sx), x0, args.steps, "mean", args.seed)
    k_star = mean_fed_kl_at_optimum(truth)
    log(
        f"  covariance rank {mean_rep['rank']} of {DIM} closed form, {mean_rep['rank_sim']} simulated: KL(chain || "
        f"data) = {mean_rep['kl']}; total variance {mean_rep['tr_pred']:.3f} predicted, {mean_rep['tr_sim']:.3f} "
        f"simulated, data {np.trace(Sx):.3f}"
    )
    log(
        f"  on the {LATENT[0]}-d range of the decoder: KL = {mean_rep['kl_range']:.4f} closed form, "
        f"{mean_rep['kl_range_sim']:.4f} simulated; K* at the optimum {k_star:.4f}   target >= "
        f"{MEAN_FED_SHARE * k_star:.4f} (a sample-fed chain scores <= {CHAIN_TOL} there)"
    )
    checks.extend(mean_fed_checks(mean_rep, k_star))
    check("mean-fed chain simulation matches prediction (5%)", abs(mean_rep["tr_sim"] / mean_rep["tr_pred"] - 1) < 0.05)

    log(f"\ncontrol 2: q(z_1|x)'s mean map scaled by {PERTURB}; theory: the ELBO drops by E KL(q'||q), the chain's")
    log("  law moves, ancestral samples do not")
    bad = copy.deepcopy(guide)
    with torch.no_grad():
        bad.conditionals[0].loc.weight.mul_(PERTURB)
    bl = guide_links(bad)
    drop, predicted = e - elbo(mx, Sx, ml, bl), expected_q_kl(bl[0], gl[0], mx, Sx)
    log(f"  ELBO drop {drop:.4f} nats ({drop / DIM:.5f} per dim); E KL(q'||q) = {predicted:.4f}")
    bad_rep = chain_report("perturbed", model, bad, (mx, Sx), x0, args.steps, "sample", args.seed)
    log(
        f"  KL(chain || data) = {bad_rep['kl']:.4f} closed form, {bad_rep['kl_sim']:.4f} from gibbs_chain "
        f"(largest |eigenvalue| {bad_rep['rho']:.3f}); ancestral KL unchanged at {kl_anc:.4f}"
    )
    check("perturbed-guide chain clearly worse", bad_rep["kl"] >= CLEARLY_WORSE * CHAIN_TOL)
    check("perturbed-guide ELBO drop matches E KL(q'||q) (10%)", abs(drop - predicted) <= 0.1 * predicted)

    if args.figure:
        log(f"\nfigure: {figure(args.figure, Sx, truth, [rep, mean_rep, bad_rep], kl_anc, k_star)}")
    log("\ntargets")
    for label, ok in checks:
        log(f"  [{'ok' if ok else 'MISSED'}] {label}")
    log(f"runtime {time.time() - t0:.1f} s")
    return 0 if all(ok for _, ok in checks) else 1


def figure(path, Sx, truth, reps, kl_anc, k_star) -> str:
    """Variance of each chain's simulated samples along the data's 16 principal directions (the decoder's range first),
    against the data's; and each KL against its target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pyro_vlae.figures import _save

    U = np.linalg.qr(truth[-1].A, mode="complete")[0]  # the range of the true decoder, then its complement
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1.6, 1]})
    k = np.arange(DIM)
    a.plot(k, np.diag(U.T @ Sx @ U), "k-", lw=2, label="p_data (closed form)")
    labels = {"trained": "chain of Eq. 6", "mean": "mean-fed chain", "perturbed": "chain, guide mean x 1.05"}
    for r, style in zip(reps, ["o", "s", "^"]):
        a.plot(k, np.var(r["samples"] @ U, axis=0), style, ms=5, mfc="none", label=labels[r["name"]])
    a.axvline(LATENT[0] - 0.5, color="grey", ls=":")
    a.set(yscale="log", xlabel="direction (decoder's range | noise directions)", ylabel="variance",
          title="per-direction variance after the chain's steps")  # fmt: skip
    a.legend(fontsize=8)
    names = ["chain of Eq. 6", "ancestral", "mean-fed\n(on range,\nsimulated)", "guide x 1.05"]
    values = [reps[0]["kl"], kl_anc, reps[1]["kl_range_sim"], reps[2]["kl"]]
    b.bar(range(4), values, color=["tab:blue", "tab:gray", "tab:orange", "tab:green"])
    b.axhline(CHAIN_TOL, color="k", ls="--", lw=1, label=f"target for a sound chain ({CHAIN_TOL})")
    b.axhline(MEAN_FED_SHARE * k_star, color="tab:orange", ls=":", lw=1, label="mean-fed control floor (K*/2)")
    b.set_xticks(range(4), names, fontsize=8)
    b.set(yscale="log", ylim=(1e-4, 30), ylabel="KL to p_data (nats)", title="KL against the targets")
    b.legend(fontsize=7, loc="upper right")
    fig.suptitle(
        "Proposition 1 on a linear-Gaussian Markov HVAE trained by SVI (benchmarks/claims/gibbs_toy.py)", fontsize=10
    )
    fig.tight_layout()
    return _save(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter training (about a minute on 2 cores)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training run and the chains")
    parser.add_argument("--chains", type=int, default=10_000, help="simulated chains (and ancestral draws)")
    parser.add_argument("--steps", type=int, default=100, help="transitions of every simulated chain")
    parser.add_argument("--figure", help="write a PNG of the per-direction variances and the KLs here")
    args = parser.parse_args(argv)
    if args.chains < 2 * DIM or args.steps < 1:
        print(f"error: need --chains >= {2 * DIM} and --steps >= 1, got {args.chains} and {args.steps}")
        return 2
    torch.set_num_threads(1)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
