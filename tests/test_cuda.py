"""The CUDA code paths: model and guide on the GPU, SVI steps, checkpoints across devices, resume, the training step in
a CUDA graph (replays against the eager step, resume, no host synchronisation in the hot loop), torchrun with NCCL.

The tests that need a GPU are marked ``cuda`` and skip when no CUDA device is present, so the default (CPU) run
collects and skips them.  On a GPU: ``python -m pytest -m cuda tests/test_cuda.py`` (``benchmarks/gpu/gpu_check.py``
runs it).  The last section checks, on any machine, device handling that a CPU can exercise with a faked ``torch.cuda``.

What each test compares against is independent of the GPU: the same weights evaluated on the CPU (with TF32 off, so
both sides compute in float32), the straight run a resumed run must reproduce, and the plain one-process run that a
one-process ``torchrun`` job must reproduce.
"""

import contextlib
import copy
import dataclasses
import json
import math
import os
import socket
import subprocess
import sys

import pyro
import pytest
import torch
from pyro import poutine

from pyro_vlae.data import load_data
from pyro_vlae.evaluation.classifier import predict, train_classifier
from pyro_vlae.experiments import gibbs as G
from pyro_vlae.experiments import interventions as iv
from pyro_vlae.presets import get_preset
from pyro_vlae.training import checkpoint as C
from pyro_vlae.training import distributed as D
from pyro_vlae.training import loop as T
from pyro_vlae.training import runs as TR
from pyro_vlae.training import step as S
from pyro_vlae.training.checkpoint import load_checkpoint, save_checkpoint

CUDA = torch.device("cuda")
RTOL = 1e-5  # float32 on both devices, TF32 off: only the order of summation differs
KINDS = ["vlae", "hvae"]
QUIET = ["--no-progress", "--no-figures", "--no-eval"]


def gpu(test):
    """Mark ``test`` as a ``cuda`` test that skips without a CUDA device."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")(test))


@contextlib.contextmanager
def full_float32():
    """TF32 off for matmuls and convolutions, so CUDA and CPU results differ by rounding only."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


TINY = get_preset("tiny")


def tiny_config(kind="vlae", num_steps=6):
    """The tiny preset on synthetic data: a log line every step, a checkpoint every 3 steps."""
    train = dataclasses.replace(TINY.train, num_steps=num_steps, log_every=1, checkpoint_every=3)
    return TR.RunConfig(kind, "synthetic", "tiny", TINY.model, train, seed=1)


@pytest.fixture(scope="module")
def bundle():
    return load_data("synthetic", "unused", 16)


def fixed_noise_loss(model, guide, x, codes):
    """``log q(z|x) - log p(x, z)`` at the given codes ``z``: the negative ELBO's integrand, a deterministic function
    of the weights (the same on every device)."""
    gtr = poutine.trace(poutine.condition(guide, data=codes)).get_trace(x)
    mtr = poutine.trace(poutine.condition(model, data=codes)).get_trace(x)
    return gtr.log_prob_sum() - mtr.log_prob_sum()


def loss_and_grads(model, guide, x, codes):
    pyro.clear_param_store()  # the CPU and CUDA copies share parameter names in Pyro's param store
    params = list(model.parameters()) + list(guide.parameters())
    loss = fixed_noise_loss(model, guide, x, codes)
    return loss.item(), torch.autograd.grad(loss, params, allow_unused=True)


def metrics_losses(run_dir) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def assert_close_losses(a, b, rtol=1e-4):
    assert len(a) == len(b), (a, b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert abs(u - v) <= rtol * abs(v), f"step {i + 1}: {u} vs {v}"


def all_tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from all_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from all_tensors(v)


# ---------------------------------------------------------------------------------------------------------------------
# Model and guide on the GPU.


@gpu
@pytest.mark.parametrize("kind", KINDS, ids=KINDS)
def test_model_and_guide_on_cuda_compute_the_cpu_loss_and_gradients(kind):
    cfg = tiny_config(kind)
    model, guide, _, _ = TR.build(cfg, "cpu")
    x = torch.rand(8, *cfg.model.image_shape)
    nodes = poutine.trace(guide).get_trace(x).nodes
    codes = {s: nodes[s]["value"].detach() for s in model.latent_sites}
    model_gpu, guide_gpu = copy.deepcopy(model).to(CUDA), copy.deepcopy(guide).to(CUDA)
    for t in [*model_gpu.parameters(), *model_gpu.buffers(), *guide_gpu.parameters(), *guide_gpu.buffers()]:
        assert t.device.type == "cuda"
    with full_float32():
        loss, grads = loss_and_grads(model, guide, x, codes)
        loss_gpu, grads_gpu = loss_and_grads(
            model_gpu, guide_gpu, x.to(CUDA), {s: v.to(CUDA) for s, v in codes.items()}
        )
    assert loss_gpu == pytest.approx(loss, rel=RTOL)
    scale = max(float(g.abs().max()) for g in grads if g is not None)
    for g, gg in zip(grads, grads_gpu):
        assert (g is None) == (gg is None)
        if g is not None:
            assert gg.device.type == "cuda" and float((gg.cpu() - g).abs().max()) <= 1e-4 * scale
    pyro.clear_param_store()
    samples = model_gpu.eval()(batch_size=5)
    assert samples.device.type == "cuda" and samples.shape == (5, *cfg.model.image_shape)


@gpu
def test_svi_steps_on_cuda_step_every_parameter_with_the_fused_kernel():
    cfg = tiny_config("vlae")
    pyro.set_rng_seed(0)
    model, guide, optim, svi = TR.build(cfg, CUDA)
    x = torch.rand(16, *cfg.model.image_shape, device=CUDA)
    steps = 40
    losses = [T.train_step(svi, x, kl_scale=1.0) for _ in range(steps)]
    assert all(T.is_finite(v) for v in losses)
    assert sum(losses[-5:]) < sum(losses[:5])  # the same batch 40 times: the loss must fall
    assert optim.optimizer.defaults["fused"] is True and optim.untrained([model, guide]) == []
    params = [*model.parameters(), *guide.parameters()]
    assert all(p.device.type == "cuda" for p in params)
    for p in params:  # every parameter was stepped on every step, its Adam state on the GPU
        state = optim.optimizer.state[p]
        assert int(state["step"]) == steps and all(t.device.type == "cuda" for t in all_tensors(state))


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints across devices, and resume.


@gpu
def test_checkpoint_saved_on_cuda_loads_on_cpu_and_back(bundle, tmp_path):
    cfg = tiny_config("vlae", num_steps=4)
    T.fit(cfg, bundle, str(tmp_path / "run"), CUDA, progress=False)
    path = str(tmp_path / "run" / "checkpoints" / "latest.pt")
    on_cpu = load_checkpoint(path)  # map_location="cpu"
    assert all(t.device.type == "cpu" for t in all_tensors(on_cpu))
    model_cpu, guide_cpu, _, _ = TR.load_run(str(tmp_path / "run"), "cpu")
    model_gpu, guide_gpu, _, _ = TR.load_run(str(tmp_path / "run"), CUDA)
    x = bundle.tensors("test")[0][:8]
    with torch.no_grad(), full_float32():
        pyro.set_rng_seed(3)
        nodes = poutine.trace(guide_cpu).get_trace(x).nodes
        codes = {s: nodes[s]["value"] for s in model_cpu.latent_sites}
        pyro.clear_param_store()
        cpu = fixed_noise_loss(model_cpu, guide_cpu, x, codes).item()
        pyro.clear_param_store()
        gpu = fixed_noise_loss(model_gpu, guide_gpu, x.to(CUDA), {s: v.to(CUDA) for s, v in codes.items()}).item()
    assert gpu == pytest.approx(cpu, rel=RTOL)
    # Back: written again from the CPU copy, then loaded straight onto the GPU, bit for bit.
    save_checkpoint(str(tmp_path / "again.pt"), on_cpu)
    back = load_checkpoint(str(tmp_path / "again.pt"), map_location=CUDA)
    original = load_checkpoint(path, map_location=CUDA)
    for part in ("model", "guide"):
        for k, v in back[part].items():
            assert v.device.type == "cuda" and torch.equal(v, original[part][k]), f"{part}.{k}"


@gpu
def test_resume_on_cuda_from_a_cpu_loaded_checkpoint_continues_the_straight_run(bundle, tmp_path):
    """3 steps, then a resume to 6 from the checkpoint read onto the CPU (as ``--resume`` reads it), against 6 straight
    steps.  Negative control: the same resume without the saved CUDA random state draws other noise."""
    cfg = tiny_config("vlae", num_steps=6)
    T.fit(cfg, bundle, str(tmp_path / "straight"), CUDA, progress=False)
    half = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_steps=3))
    for name in ("resumed", "no_cuda_rng"):
        T.fit(half, bundle, str(tmp_path / name), CUDA, progress=False)
        state = load_checkpoint(str(tmp_path / name / "checkpoints" / "latest.pt"))
        assert "cuda" in state["rng"]
        if name == "no_cuda_rng":
            del state["rng"]["cuda"]
            torch.cuda.manual_seed_all(12345)
        result = T.fit(cfg, bundle, str(tmp_path / name), CUDA, resume=state, progress=False)
        assert result.step == 6
    straight = metrics_losses(tmp_path / "straight")
    assert_close_losses(metrics_losses(tmp_path / "resumed"), straight)
    control = metrics_losses(tmp_path / "no_cuda_rng")
    assert abs(control[3] - straight[3]) > 1e-3 * abs(straight[3]), "the CUDA random state made no difference"


# ---------------------------------------------------------------------------------------------------------------------
# The graph-safe step in a CUDA graph.


def _steps(cfg, graph: bool, scales, xs):
    """One step per KL scale and batch from the same seed (validation on for the first two), eager or captured;
    returns the losses, the state dicts and the step."""
    pyro.set_rng_seed(3)
    model, guide, optim, _ = TR.build(cfg, CUDA)
    stepper = S.make_step(model, guide, optim, cfg.train.elbo, CUDA, graph=graph, warn=pytest.fail)
    losses = []
    for i, (k, x) in enumerate(zip(scales, xs)):
        with pyro.validation_enabled(i < 2):
            stepper.step(x, kl_scale=k)
        losses.append(stepper.read().loss)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.update({f"guide.{k}": v for k, v in guide.state_dict().items()})
    return losses, state, stepper


@gpu
@pytest.mark.parametrize("kind,elbo", [("vlae", "meanfield"), ("hvae", "trace")], ids=["vlae-meanfield", "hvae"])
def test_graph_replays_match_the_eager_step(kind, elbo):
    """Twelve steps: 2 validated, 3 warm-up, the capture, 6 replays, with a KL scale that changes every step and the
    batch changing (copied into the static input) against the eager step on the same noise."""
    cfg = tiny_config(kind)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, elbo=elbo))
    scales = [0.05 * (i + 1) for i in range(12)]
    xs = torch.rand(12, 16, *cfg.model.image_shape, device=CUDA)
    with full_float32():
        eager, eager_state, _ = _steps(cfg, False, scales, xs)
        graph, graph_state, stepper = _steps(cfg, True, scales, xs)
    assert stepper.graph is not None and stepper.failed is None
    assert_close_losses(graph, eager, rtol=1e-5)
    for k, v in eager_state.items():
        torch.testing.assert_close(graph_state[k], v, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


@gpu
def test_a_bf16_step_is_captured_and_replays_its_eager_steps():
    cfg = tiny_config("vlae")
    scales, xs = [0.5] * 10, torch.rand(10, 16, *cfg.model.image_shape, device=CUDA)
    results = []
    for graph in (False, True):
        pyro.set_rng_seed(3)
        model, guide, optim, _ = TR.build(cfg, CUDA)
        stepper = S.make_step(model, guide, optim, "trace", CUDA, graph=graph, precision="bf16", warn=pytest.fail)
        with pyro.validation_enabled(False):
            results.append([(stepper.step(x, kl_scale=k), stepper.read().loss)[1] for k, x in zip(scales, xs)])
    assert stepper.graph is not None and all(math.isfinite(v) for v in results[1])
    assert_close_losses(results[1], results[0], rtol=1e-3)


@gpu
def test_a_resumed_graph_run_reproduces_the_straight_graph_run(bundle, tmp_path):
    """30 straight steps (captured after step 13) against 15 steps and a resume to 30 (captured again after step 28),
    TF32 off; the graph run's checkpoint records a non-capturable optimiser and loads on the CPU."""
    cfg = tiny_config("vlae", num_steps=30)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, cuda_graph="on", tf32=False))
    warnings = []
    T.fit(cfg, bundle, str(tmp_path / "straight"), CUDA, progress=False, log=warnings.append)
    half = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_steps=15))
    T.fit(half, bundle, str(tmp_path / "resumed"), CUDA, progress=False, log=warnings.append)
    state = load_checkpoint(str(tmp_path / "resumed" / "checkpoints" / "latest.pt"))
    assert not any(g["capturable"] for st in state["optim"].values() for g in st["param_groups"])
    T.fit(cfg, bundle, str(tmp_path / "resumed"), CUDA, resume=state, progress=False, log=warnings.append)
    assert not warnings, warnings  # no capture fell back
    assert_close_losses(metrics_losses(tmp_path / "resumed"), metrics_losses(tmp_path / "straight"), rtol=1e-4)
    model, _, _, _ = TR.load_run(str(tmp_path / "straight"), "cpu")
    assert all(torch.isfinite(p).all() for p in model.parameters())


# The forced-failure test runs in a process of its own: a capture fault that left the CUDA generator or context unusable
# would otherwise fail every later test of this process, hiding what they test.
IN_CHILD = "PYRO_VLAE_CUDA_TEST_CHILD"
CHILD_HANG_S = 600  # a bound on a hang, not a speed limit


def _in_own_process(name: str) -> bool:
    """In the parent: run test ``name`` of this file alone in a child pytest, assert it passed, return ``False``.  In
    that child: return ``True`` (run the test's body)."""
    if os.environ.get(IN_CHILD) == "1":
        return True
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", f"{__file__}::{name}"]
    env = {**os.environ, IN_CHILD: "1"}
    child = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env, timeout=CHILD_HANG_S)
    assert child.returncode == 0 and "1 passed" in child.stdout, child.stdout[-4000:] + child.stderr[-2000:]
    return False


@gpu
def test_a_real_capture_failure_falls_back_to_eager_steps_that_train():
    """A host read inside the captured region (what a synchronising op does) makes the real capture fail, not a test
    seam: the step warns once and goes on eagerly with the losses of a run that never tried to capture (the generator
    restored, so the step of the failed capture draws the eager run's noise), the default stream current again, and
    the CUDA context still usable (a CUDA generator left in capture mode, as some torch versions leave it, would raise
    on the first eager draw instead).  Runs in its own process."""
    if not _in_own_process("test_a_real_capture_failure_falls_back_to_eager_steps_that_train"):
        return
    cfg = tiny_config("vlae")
    xs = torch.rand(S.WARMUP_STEPS + 6, 16, *cfg.model.image_shape, device=CUDA)
    runs = {}
    for graph in (False, True):
        pyro.set_rng_seed(3)
        model, guide, optim, _ = TR.build(cfg, CUDA)
        warned = []
        stepper = S.make_step(model, guide, optim, "trace", CUDA, graph=graph, warn=warned.append)
        inner = stepper._step

        def syncing_step(x, inner=inner):
            if torch.cuda.is_current_stream_capturing():
                float(x.sum())  # a device-to-host read: illegal while capturing
            inner(x)

        stepper._step = syncing_step
        losses = []
        with full_float32(), pyro.validation_enabled(False):
            for x in xs:
                stepper.step(x, kl_scale=0.5)
                losses.append(stepper.read().loss)
        runs[graph] = losses, stepper, warned
    losses, stepper, warned = runs[True]
    assert stepper.graph is None and stepper.failed and len(warned) == 1, warned
    assert torch.cuda.current_stream(CUDA) == torch.cuda.default_stream(CUDA), "the capture stream was left current"
    before = [p.detach().clone() for p in stepper.params]
    with pyro.validation_enabled(False):
        for x in xs[:3]:
            stepper.step(x, kl_scale=0.5)
    assert all(math.isfinite(v) for v in losses)
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, stepper.params)), "eager steps did not train"
    assert_close_losses(losses, runs[False][0], rtol=1e-5)
    torch.randn(4, device=CUDA).sum().item()  # a fresh draw and a host read: the context is usable
    torch.cuda.synchronize()


@gpu
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_the_hot_loop_never_synchronises_with_the_host(bundle, graph):
    """Batches read on the device, the fade-in gains, the KL scale and the step, under
    ``torch.cuda.set_sync_debug_mode("error")``: any synchronising call raises."""
    from pyro_vlae.training.batches import Batches
    from pyro_vlae.training.distributed import SingleProcess

    cfg = tiny_config("vlae")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, fade_in=4))
    model, guide, optim, _ = TR.build(cfg, CUDA)
    stepper = S.make_step(model, guide, optim, "trace", CUDA, graph=graph, warn=pytest.fail)
    batches = Batches(bundle, 8, 0, SingleProcess(), CUDA, binarize=False)
    with pyro.validation_enabled(False):
        gains = T.set_fade_in(model, cfg, 0)
        for step in range(6):  # the first step, the warm-up and the capture may synchronise
            stepper.step(batches(step), kl_scale=0.1)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for step in range(6, 20):  # inside and after the fade-in ramp (steps 4 to 12)
                gains = T.set_fade_in(model, cfg, step, gains)
                T.train_step(stepper, batches(step), 1 - 0.9 ** (step + 1))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert (stepper.graph is not None) == graph
    stats = stepper.read()
    assert stats.first_bad is None and math.isfinite(stats.loss)


# ---------------------------------------------------------------------------------------------------------------------
# Experiments and the classifier on the GPU.


@gpu
def test_interventions_draw_on_the_cpu_so_cuda_matches_cpu_and_the_chain_runs():
    cfg = tiny_config("vlae")
    model, guide, _, _ = TR.build(cfg, "cpu")
    model.eval(), guide.eval()
    model_gpu, guide_gpu = copy.deepcopy(model).to(CUDA), copy.deepcopy(guide).to(CUDA)
    with full_float32():
        cpu = iv.intervene_layer(model, "z2", 3, 4, generator=torch.Generator().manual_seed(0))
        gpu = iv.intervene_layer(model_gpu, "z2", 3, 4, generator=torch.Generator().manual_seed(0))
    assert gpu.device.type == "cuda" and torch.allclose(gpu.cpu(), cpu, atol=1e-5)
    starts = G.chain_starts(model_gpu, torch.rand(20, *cfg.model.image_shape), num_chains=4)
    chain = G.gibbs_chain(model_gpu, guide_gpu, starts, num_steps=3, seed=0)
    assert chain.samples.shape == (4, 4, *cfg.model.image_shape) and chain.samples.device.type == "cuda"


@gpu
def test_classifier_trains_on_cuda_and_predicts_from_any_device():
    x = torch.rand(64, 1, 16, 16)
    y = (x.mean((1, 2, 3)) > x.mean()).long()
    clf = train_classifier(x, y, num_classes=2, epochs=1, batch_size=32, device=CUDA, log=lambda *a: None)
    assert next(clf.parameters()).device.type == "cuda"
    a, b = predict(clf, x), predict(clf, x.to(CUDA))
    assert a.device.type == "cpu" and torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------------
# torchrun with NCCL.

SPY = """
import sys
import torch.distributed as dist
real = dist.init_process_group
def spy(backend=None, *args, **kwargs):
    print(f"process group backend: {backend}", flush=True)
    return real(backend, *args, **kwargs)
dist.init_process_group = spy
from pyro_vlae.run import main
sys.exit(main(sys.argv[1:]))
"""


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for key in D.TORCHRUN_KEYS:
        env.pop(key, None)
    if os.path.exists("/sys/class/net/lo"):
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@gpu
def test_torchrun_one_process_with_nccl_matches_the_plain_run(tmp_path):
    (tmp_path / "spy.py").write_text(SPY)
    flags = ["--dataset", "synthetic", "--device", "cuda", "--num-steps", "4", "--batch-size", "8", "--log-every", "1"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr", "127.0.0.1"]
    torchrun += ["--master-port", str(_free_port()), "spy.py", *flags, *QUIET, "--run-dir", "ddp"]
    ddp = subprocess.run(torchrun, capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=240)
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    assert "process group backend: nccl" in ddp.stdout
    plain_cmd = [sys.executable, "-m", "pyro_vlae.run", *flags, *QUIET, "--run-dir", "plain"]
    plain = subprocess.run(plain_cmd, capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=240)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert "trained 4 steps" in ddp.stdout and "device cuda" in ddp.stdout
    assert_close_losses(metrics_losses(tmp_path / "ddp"), metrics_losses(tmp_path / "plain"))
    assert load_checkpoint(str(tmp_path / "ddp" / "checkpoints" / "latest.pt"))["step"] == 4


@gpu
def test_rng_state_with_more_gpus_than_present_restores_and_a_missing_index_is_refused():
    state = C.rng_state()
    state["cuda"] = [*state["cuda"], state["cuda"][0]]  # as saved on a machine with one GPU more
    C.set_rng_state(state)
    torch.cuda.synchronize()
    assert torch.equal(torch.cuda.get_rng_state(0), state["cuda"][0])
    with pytest.raises(ValueError, match="CUDA device"):
        TR.resolve_device(f"cuda:{torch.cuda.device_count()}")


# ---------------------------------------------------------------------------------------------------------------------
# Device handling checked on any machine, with torch.cuda faked where needed.


def fake_gpus(monkeypatch, count):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_a_checkpoint_from_a_machine_with_more_gpus_restores_only_those_present(monkeypatch):
    state = C.rng_state()
    state["cuda"] = [torch.full((8,), i, dtype=torch.uint8) for i in range(4)]  # saved on a 4-GPU machine
    restored = []
    fake_gpus(monkeypatch, 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.extend(states))
    C.set_rng_state(state)
    assert [int(s[0]) for s in restored] == [0, 1]


def test_a_cuda_index_beyond_the_visible_gpus_is_a_clear_error(monkeypatch):
    fake_gpus(monkeypatch, 1)
    assert TR.resolve_device("cuda:0") == torch.device("cuda", 0) and TR.resolve_device("cuda").type == "cuda"
    with pytest.raises(ValueError, match=r"--device cuda:1: this machine has 1 CUDA device\(s\), cuda:0 to cuda:0"):
        TR.resolve_device("cuda:1")
