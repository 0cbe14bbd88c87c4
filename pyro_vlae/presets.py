"""Architecture and training presets: data, kept in one registry, saved as ``config.json`` beside every checkpoint.

The reference-sized presets follow the paper's public TensorFlow code (``vladder.py``): MNIST uses convolutions with
64 and 128 channels, dense width 1024 and three 2-d codes with ``loss_ratio = 8`` (a Laplace scale of 1/8); SVHN four
codes of 5, 5, 5 and 10 dimensions; CelebA four codes of 10 with ``loss_ratio = 0.5``.  The HVAE and VAE presets are
the same objects: every model kind reads the same widths and latent sizes, so comparisons are at matched capacity.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

from .nets import ModelConfig

ANNEAL_HELP = "exp:T (kl_scale = 1 - exp(-t/T), the reference), linear:N (ramp to 1 over N steps) or none"


@dataclass
class TrainConfig:
    """Optimisation settings.  Serialised as the ``train`` block of ``config.json``.

    :param num_steps: SVI steps (one mini-batch each).
    :param batch_size: images per step.
    :param lr: Adam learning rate (the reference uses 2e-4).
    :param anneal: KL-scale schedule, see :func:`pyro_vlae.training.annealing.kl_schedule`.
    :param elbo: ``"trace"`` (``Trace_ELBO``) or ``"meanfield"`` (``TraceMeanField_ELBO``, analytic KLs).
    :param log_every: steps between ``metrics.jsonl`` lines.
    :param checkpoint_every: steps between checkpoints (one is always written at the end).
    :param checkpoint_seconds: also write a checkpoint once this many seconds of wall time have passed since the last
        one (0: off), so that a crash or a kill at any minute still leaves recent weights.  Read from a host clock:
        the step count and this time are checked between steps without reading the device.
    :param keep_every: steps between checkpoints kept as ``step<k>.pt`` besides ``latest.pt`` (0: none).
    :param fade_in: VLAE only: steps per layer of the progressive fade-in of lower layers (0: off), see
        :func:`pyro_vlae.training.annealing.ladder_gains`.
    :param cuda_graph: ``"auto"`` (capture the training step in a CUDA graph on CUDA), ``"on"`` (CUDA only) or
        ``"off"``, see :mod:`pyro_vlae.training.step`.  Changes the speed, not the step.
    :param tf32: on CUDA, matrix products and convolutions in TF32 (``True``) or full float32.
    :param precision: ``"fp32"``, or ``"bf16"``: the networks' forward pass in bfloat16 (autocast), weights, optimiser
        and every log-probability in float32.

    Presets hold one; edit a copy for a run of your own:

    >>> import dataclasses
    >>> import pyro_vlae as pv
    >>> train = dataclasses.replace(pv.get_preset("tiny").train, num_steps=4, lr=5e-4)
    >>> train.num_steps, train.batch_size, train.anneal
    (4, 16, 'exp:10')
    >>> pv.TrainConfig.from_dict(train.to_dict()) == train  # the ``train`` block of config.json
    True
    """

    num_steps: int = 5000
    batch_size: int = 100
    lr: float = 2e-4
    anneal: str = "exp:2000"
    elbo: str = "trace"
    log_every: int = 50
    checkpoint_every: int = 1000
    checkpoint_seconds: float = 0.0
    keep_every: int = 0
    fade_in: int = 0
    cuda_graph: str = "auto"
    tf32: bool = True
    precision: str = "fp32"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(**d)


@dataclass
class Preset:
    """A named architecture plus its default training schedule."""

    name: str
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    description: str = ""


def _preset(name, description, train=None, **model_kwargs) -> Preset:
    return Preset(name, ModelConfig(name=name, **model_kwargs), train or TrainConfig(), description)


PRESETS: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    """Add ``preset`` to the registry (overwriting one of the same name)."""
    PRESETS[preset.name] = preset
    return preset


register(
    _preset(
        "mnist",
        "reference-sized MNIST network: conv 64-128, dense 1024, 3 x 2-d codes, Laplace b = 1/8; GPU default "
        "schedule with a progressive fade-in of the lower layers",
        TrainConfig(num_steps=30000, lr=5e-4, anneal="exp:2000", fade_in=3000),
        image_shape=(1, 28, 28),
        latent_dims=(2, 2, 2),
        channels=(64, 128),
        hidden=1024,
        likelihood="laplace",
        obs_scale=1 / 8,
    )
)
register(
    Preset(
        "mnist-paper",
        dataclasses.replace(
            PRESETS["mnist"].model,
            name="mnist-paper",
            noise_injection="gated_add",
            inference="branches",
            reference_activations=True,
            bn_eps=1e-3,
            bn_momentum=1e-3,
        ),
        TrainConfig(num_steps=30000, lr=2e-4, anneal="exp:2000", elbo="meanfield"),
        "the reference code's MNIST VLAE (vladder_mnist): its layers and parameter counts (11,832,705 generative, "
        "14,075,148 inference), gated-add ladder inputs (gate initialised at 0.1), z1 on a conv stack of its own and "
        "each higher code on two dense layers of its own beside a shared trunk, leaky ReLU where it has it, batch-norm "
        "eps 1e-3 and decay 0.999, Laplace b = 1/8 (its 8 x L1 loss), closed-form KLs (--elbo meanfield), KL scale "
        "1 - exp(-t/2000), Adam 2e-4, batch 100, no fade-in. Unlike it: batch norm with a learned scale and no "
        "pre-norm bias (it has no scale and a redundant bias; the counts agree); PyTorch's default initialisation "
        "(it uses N(0, 0.02) before batch norm and Glorot elsewhere); v1's batch norm uses running statistics in eval "
        "mode (the reference normalises by the batch also when generating); the loss is summed over the batch, not "
        "averaged (only Adam's eps sees it); the KL scale counts steps from 0, not 1, and is at least 1e-4; 60,000 "
        "training images, not 55,000; a fixed 30,000 steps (the reference trains until stopped). The hvae and vae "
        "read its sizes, batch norm and schedule (the hvae with --elbo trace)",
    )
)
register(
    _preset(
        "mnist-cpu",
        "CPU-sized MNIST network for the 15-minute default job: conv 32-64, dense 256, 3 x 2-d codes",
        TrainConfig(num_steps=6000, lr=1e-3, anneal="exp:1000", batch_size=100, fade_in=1000),
        image_shape=(1, 28, 28),
        latent_dims=(2, 2, 2),
        channels=(32, 64),
        hidden=256,
        likelihood="laplace",
        obs_scale=1 / 8,
    )
)
register(
    _preset(
        "svhn",
        "reference-sized SVHN network: conv 64-128-256, dense 1024, codes of 5, 5, 5, 10",
        TrainConfig(num_steps=50000),
        image_shape=(3, 32, 32),
        latent_dims=(5, 5, 5, 10),
        channels=(64, 128, 256),
        hidden=1024,
        likelihood="laplace",
        obs_scale=1 / 8,
    )
)
register(
    _preset(
        "celeba",
        "reference-sized CelebA network at 64x64: conv 64-128-256-512, dense 1024, 4 x 10-d codes, Laplace b = 2",
        TrainConfig(num_steps=100000),
        image_shape=(3, 64, 64),
        latent_dims=(10, 10, 10, 10),
        channels=(64, 128, 256, 512),
        hidden=1024,
        likelihood="laplace",
        obs_scale=2.0,
    )
)
register(
    _preset(
        "sprites",
        "procedural dSprites at 64x64: conv 32-64-128-256, dense 512, 3 x 2-d codes, Bernoulli",
        TrainConfig(num_steps=20000, lr=5e-4),
        image_shape=(1, 64, 64),
        latent_dims=(2, 2, 2),
        channels=(32, 64, 128, 256),
        hidden=512,
        likelihood="bernoulli",
    )
)
register(
    _preset(
        "sprites-32",
        "procedural dSprites at 32x32 for CPU runs: conv 32-64-128, dense 256, 3 x 2-d codes, Bernoulli",
        TrainConfig(num_steps=6000, lr=1e-3, anneal="exp:1000"),
        image_shape=(1, 32, 32),
        latent_dims=(2, 2, 2),
        channels=(32, 64, 128),
        hidden=256,
        likelihood="bernoulli",
    )
)
_SHAPES3D = "procedural 3D Shapes-style scenes at"
for _src, _name, _desc in (
    ("sprites", "shapes3d", f"{_SHAPES3D} 64x64: conv 32-64-128-256, dense 512, 3 x 2-d codes, Laplace b = 1/8"),
    ("sprites-32", "shapes3d-32", f"{_SHAPES3D} 32x32 for CPU runs: conv 32-64-128, dense 256, 3 x 2-d codes, Laplace"),
):  # the sprites networks and schedules, on 3 channels with SVHN's Laplace likelihood (b = 1/8)
    _m = PRESETS[_src].model
    _m = dataclasses.replace(_m, name=_name, image_shape=(3, *_m.image_shape[1:]))
    _m = dataclasses.replace(_m, likelihood="laplace", obs_scale=1 / 8)
    register(Preset(_name, _m, dataclasses.replace(PRESETS[_src].train), _desc))
register(
    _preset(
        "tiny",
        "tiny network for tests and smoke runs on 16x16 images",
        TrainConfig(num_steps=20, batch_size=16, lr=1e-3, anneal="exp:10", log_every=5, checkpoint_every=10),
        image_shape=(1, 16, 16),
        latent_dims=(2, 2, 2),
        channels=(8, 16),
        hidden=32,
        likelihood="laplace",
        obs_scale=1 / 8,
    )
)

# --- Appendix B.1: the Gaussian HVAE's own settings (Fig. 2 and 3).  f_l (l = 1, 2) two dense layers with the
# W1 / W2 heads (mean, sigmoid standard deviation), f_0 two stride-2 (transposed) convolutions, Adam 1e-4 and the KL
# scale annealed from 0 to 1.  B.1 gives no widths or code sizes: codes of 32 / 16 / 8 reconstruct binarised MNIST
# (one encode-decode keeps the digit of 94 % of test images, benchmarks/claims/gibbs_mnist.py).  On 2 shared CPU cores
# the 30000 steps take over an hour (2.7-7 steps/s, benchmarks/RESULTS.md); on a GPU about 8 minutes.
_B1_TRAIN = TrainConfig(num_steps=30000, lr=1e-4, anneal="linear:6000", batch_size=100, log_every=200)
for _name, _lik, _scale, _desc in (
    ("mnist-hvae-b1", "gaussian", 0.1, "Gaussian likelihood with fixed sigma = 0.1"),
    ("mnist-hvae-b1-learned", "gaussian-learned", 0.1, "Gaussian likelihood with a learned sigma (starts at 0.1)"),
    ("mnist-hvae-b1-bernoulli", "bernoulli", 1.0, "Bernoulli likelihood on dynamically binarised MNIST (Fig. 2)"),
):
    register(
        _preset(
            _name,
            f"Appendix B.1 Markov HVAE on MNIST: conv 16-32, dense 512, codes 32 / 16 / 8, {_desc}; Adam 1e-4, "
            "KL scale annealed linearly from 0 to 1 over 6000 steps, 30000 steps (50 epochs)",
            dataclasses.replace(_B1_TRAIN),
            image_shape=(1, 28, 28),
            latent_dims=(32, 16, 8),
            channels=(16, 32),
            hidden=512,
            likelihood=_lik,
            obs_scale=_scale,
        )
    )

#: Preset used when ``--preset`` is not given, by dataset and by whether a GPU is present.
DEFAULT_PRESETS = {
    "mnist": ("mnist-cpu", "mnist"),
    "fashion-mnist": ("mnist-cpu", "mnist"),
    "svhn": ("svhn", "svhn"),
    "celeba": ("celeba", "celeba"),
    "sprites": ("sprites-32", "sprites"),
    "shapes3d": ("shapes3d-32", "shapes3d"),
    "synthetic": ("tiny", "tiny"),
}


def get_preset(name: str) -> Preset:
    """Return a deep copy of the preset ``name`` (so callers may edit it).

    :raises ValueError: for an unknown name, listing the known ones.

    >>> import pyro_vlae as pv
    >>> preset = pv.get_preset("mnist-cpu")
    >>> preset.model.latent_dims, preset.model.image_shape, preset.train.batch_size
    ((2, 2, 2), (1, 28, 28), 100)
    >>> preset.train.num_steps = 100  # a copy: the registry keeps its own
    >>> pv.get_preset("mnist-cpu").train.num_steps
    6000
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[name]
    return Preset(p.name, dataclasses.replace(p.model), dataclasses.replace(p.train), p.description)


def default_preset_name(dataset: str, cuda: bool) -> str:
    """Name of the preset a run on ``dataset`` uses by default (CPU-sized where one exists and no GPU is present)."""
    cpu, gpu = DEFAULT_PRESETS.get(dataset, ("tiny", "tiny"))
    return gpu if cuda else cpu


def check_image_shape(config: ModelConfig, image_shape, dataset: str = "the dataset") -> None:
    """Raise a clear error when the data's image shape differs from the preset's."""
    if tuple(image_shape) != tuple(config.image_shape):
        raise ValueError(
            f"{dataset} has images of shape {tuple(image_shape)} but preset {config.name!r} expects "
            f"{tuple(config.image_shape)}; pick a matching --preset (see `python -m pyro_vlae.run --list-presets`)"
        )
