"""Shared pieces of the speed benchmarks: timing, the hand-written PyTorch step, and the model cases.

The hand-written step reuses the model's and guide's ``nn.Module`` weights: reparameterised samples, the Laplace
log-likelihood and each layer's ``log q - log p`` in closed form, summed as ``Trace_ELBO`` sums them, ``backward`` and
one ``torch.optim.Adam`` step with the same fused kernel that training's ``FusedAdam`` uses.
:func:`check_same_loss` checks that both losses agree on the same noise before anything is timed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import platform
import statistics
import time

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from pyro_vlae.evaluation.likelihood import importance_log_likelihood
from pyro_vlae.nets import squash
from pyro_vlae.presets import get_preset
from pyro_vlae.training.optim import fused_supported
from pyro_vlae.training.runs import RunConfig, build

KL_SCALE = 0.5
BATCH = 100
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


# ---------------------------------------------------------------------------------------------------------------------
# Machine and timing helpers.


def timing_parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """The flags every timing script shares: ``--quick``, ``--repeats``, ``--steps``, ``--threads``, ``--device``."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--repeats", type=int, default=4, help="alternating timing blocks per variant")
    p.add_argument("--steps", type=int, default=5, help="training steps per timing block")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    return p


def machine_line(device) -> str:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    gpu = f", GPU {torch.cuda.get_device_name()}" if device.type == "cuda" else ""
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, pyro {pyro.__version__}, "
        f"{torch.get_num_threads()} torch threads{gpu}"
    )


def load_line() -> str:
    with contextlib.suppress(OSError), open("/proc/loadavg") as f:
        return "load average " + " ".join(f.read().split()[:3])
    return "load average unknown"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def alternate(variants: dict, steps: int, repeats: int, device, batch: int = BATCH) -> dict:
    """Median images/s of each variant, timed in turn (A B A B ...).

    :param variants: name -> ``(prepare, step)``; ``prepare()`` sets global state before a block, ``step()`` is one
        training step on ``batch`` images.  A variant whose step raises is reported as the error text.
    """
    rates, errors = {k: [] for k in variants}, {}
    for _ in range(2):  # warm-up (allocator, lazy init)
        for name, (prepare, step) in variants.items():
            try:
                prepare()
                step()
            except Exception as e:  # noqa: BLE001 - record and move on
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    for _ in range(repeats):
        for name, (prepare, step) in variants.items():
            if name in errors:
                continue
            prepare()
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            sync(device)
            rates[name].append(steps * batch / (time.perf_counter() - t0))
    return {k: errors.get(k) or statistics.median(v) for k, v in rates.items()}


def device_time_us(events) -> float:
    """Summed duration (microseconds) of the profiler events that ran on a CUDA device (kernels, copies, sets)."""
    cuda = torch.autograd.DeviceType.CUDA
    return sum(e.time_range.elapsed_us() for e in events if e.device_type == cuda)


def kernel_ms(step, device, steps=5) -> float | None:
    """Kernel time per call of ``step()`` (milliseconds) from ``torch.profiler``; ``None`` off CUDA or when the
    profiler saw no device work.  Host time between kernels is not counted: ``1 / kernel_ms`` is the step rate with
    every host overhead removed."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    step()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        sync(device)
    total = device_time_us(prof.events())
    return total / steps / 1000 if total > 0 else None


def matmul_gflops(device, m, k, n, repeats=5) -> float:
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    reps = max(1, int(2e9 / (2 * m * k * n)))  # ~2 GFLOP per timing
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * m * k * n * reps / statistics.median(times) / 1e9


# ---------------------------------------------------------------------------------------------------------------------
# The hand-written step: same modules, same loss, no Pyro.


def normal_logpdf(z, loc, scale):
    return -0.5 * ((z - loc) / scale) ** 2 - torch.log(scale) - HALF_LOG_2PI


def recon_logpdf(model, raw, x):
    like = model.likelihood
    assert like.kind == "laplace", "the hand-written step implements the Laplace likelihood of the mnist presets"
    b = like.obs_scale
    return (-(x - squash(raw, like.value_range)).abs() / b - math.log(2 * b)).sum()


def hand_loss(model, guide, x, kl_scale):
    """``-ELBO`` with latent terms scaled by ``kl_scale``, summed over the batch, as ``Trace_ELBO`` computes it.

    Draws the noise in the guide's site order (:func:`guide_site_order`) so a fixed seed gives Pyro's samples.
    """
    kl = x.new_zeros(())
    if hasattr(model, "decode"):  # VLAE: q(z_l | x) for every layer, prior N(0, I)
        posterior = guide.posterior(x)
        zs = [None] * len(posterior)
        for l in getattr(guide, "site_order_", range(len(posterior))):
            loc, scale = posterior[l]
            z = loc + scale * torch.randn_like(loc)
            kl = kl + (normal_logpdf(z, loc, scale) + 0.5 * z**2 + HALF_LOG_2PI).sum()
            zs[l] = z
        raw = model.decode(zs)
    else:  # Markov / autoregressive HVAE: q(z_1|x) q(z_l|z_{l-1}), p(z_L) p(z_l|z_{l+1})
        zs, h = [], x
        for net in guide.conditionals:
            loc, scale = net(h)
            h = loc + scale * torch.randn_like(loc)
            kl = kl + normal_logpdf(h, loc, scale).sum()
            zs.append(h)
        kl = kl + (0.5 * zs[-1] ** 2 + HALF_LOG_2PI).sum()
        for l in range(len(zs) - 1, 0, -1):
            parent = torch.cat(zs[l:], dim=-1) if model.autoregressive else zs[l]
            loc, scale = model.conditionals[l - 1](parent)
            kl = kl - normal_logpdf(zs[l - 1], loc, scale).sum()
        raw = model.decoder(zs[0])
    return -(recon_logpdf(model, raw, x) - kl_scale * kl)


def hand_step_fn(model, guide, x, lr, loss_fn=hand_loss, fused=None, read=True):
    """One hand-written training step as a closure; ``fused=None`` uses the kernel training uses on this device.
    ``read=False`` leaves the loss on the device (no host synchronisation per step)."""
    params = list(model.parameters()) + list(guide.parameters())
    fused = fused_supported(x.device) if fused is None else fused
    opt = torch.optim.Adam(params, lr=lr, **({"fused": True} if fused else {"foreach": False}))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, guide, x, KL_SCALE)
        loss.backward()
        opt.step()
        return loss.item() if read else loss

    return step


def check_same_loss(model, guide, x, seed=1) -> tuple:
    """Pyro's and the hand-written loss (and gradients) on the same noise: returns (loss, |dloss|, max |dgrad|)."""
    params = list(model.parameters()) + list(guide.parameters())
    pyro.set_rng_seed(seed)
    lp = Trace_ELBO().differentiable_loss(model, guide, x, kl_scale=KL_SCALE)
    gp = torch.autograd.grad(lp, params, allow_unused=True)
    pyro.set_rng_seed(seed)
    lh = hand_loss(model, guide, x, KL_SCALE)
    gh = torch.autograd.grad(lh, params, allow_unused=True)
    pairs = [(a, b) for a, b in zip(gp, gh) if a is not None and b is not None]
    dg = max(float((a - b).abs().max()) for a, b in pairs) / max(float(a.abs().max()) for a, _ in pairs)
    return lp.item(), abs(lp.item() - lh.item()), dg


def count_flops(model, guide, x) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        hand_loss(model, guide, x, KL_SCALE).backward()
    model.zero_grad(set_to_none=True), guide.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def guide_site_order(guide, x) -> list:
    """Indices ``l - 1`` of the latent sites ``z_l`` in the order the guide samples them (one traced call in eval mode,
    on a forked random stream: nothing the timing or the loss check sees changes)."""
    was = guide.training
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        guide.eval()
        names = [n for n, site in poutine.trace(guide).get_trace(x[:2]).nodes.items() if site["type"] == "sample"]
    guide.train(was)
    return [int(n[1:]) - 1 for n in names if n.startswith("z") and n[1:].isdigit()]


def make_case(kind, preset_name, device, seed=0, batch=BATCH):
    preset = get_preset(preset_name)
    # Trace_ELBO always: the hand-written step is its loss (mnist-paper trains with meanfield, which the hvae refuses)
    train = dataclasses.replace(preset.train, elbo="trace")
    config = RunConfig(model_kind=kind, dataset="mnist", preset=preset_name, model=preset.model, train=train)
    pyro.set_rng_seed(seed)
    model, guide, _, svi = build(config, device)
    x = torch.rand(batch, *preset.model.image_shape, device=device)  # timing does not depend on pixel values
    guide.site_order_ = guide_site_order(guide, x)  # read by hand_loss
    return model, guide, svi, x, preset.train.lr


# ---------------------------------------------------------------------------------------------------------------------
# Generation and IWAE throughput.


def generation_rate(model, device, n=1000, repeats=3) -> float:
    was = model.training
    model.eval()
    times = []
    with torch.no_grad():
        model(batch_size=n)
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            model(batch_size=n)
            sync(device)
            times.append(time.perf_counter() - t0)
    model.train(was)
    return n / statistics.median(times)


def iwae_rate(model, guide, x, k) -> float:
    importance_log_likelihood(model, guide, x[:2], num_samples=min(k, 20))  # warm-up
    sync(x.device)
    t0 = time.perf_counter()
    importance_log_likelihood(model, guide, x, num_samples=k)
    sync(x.device)
    return x.shape[0] / (time.perf_counter() - t0)
