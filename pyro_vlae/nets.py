"""Plain PyTorch building blocks for the generative and inference networks.

Nothing here knows about Pyro: ``pyro_vlae.models`` and ``pyro_vlae.guides`` wire these blocks to sample sites.
The shapes follow the paper's reference implementation (Appendix B.2): stride-2 4x4 convolutions with batch norm and
leaky ReLU on the way up, dense ladder connections (never convolutional latents), and stride-2 4x4 transposed
convolutions on the way down.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

#: Smallest standard deviation a Gaussian head can output (the reference code adds 0.001 as well).
MIN_SCALE = 1e-3


@dataclass
class ModelConfig:
    """Architecture of one model/guide pair (a preset's ``.model``), saved as the ``model`` block of ``config.json``.

    :param name: preset name this config came from.
    :param image_shape: ``(C, H, W)`` of images, with ``H`` and ``W`` divisible by ``2 ** len(channels)``; or ``(D,)``
        for vectors, which the stacked HVAEs encode and decode with dense layers only (``channels`` is then unused).
    :param latent_dims: sizes of ``z1 .. zL`` (``z1`` the bottom layer).
    :param channels: output channels of the stride-2 convolutions, bottom to top.
    :param hidden: width of every dense layer.
    :param fc_layers: dense layers per ladder block (the reference uses 2).
    :param batch_norm: use batch norm after every hidden layer.
    :param noise_injection: ``"concat"`` (Eq. 11) or ``"gated_add"`` (reference code) for VLAE ladder inputs.
    :param likelihood: ``"gaussian"``, ``"laplace"``, ``"bernoulli"`` or ``"gaussian-learned"``.
    :param obs_scale: standard deviation (Gaussian) or scale ``b = 1 / loss_ratio`` (Laplace) of ``r(x)``.
    :param value_range: ``(lo, hi)`` of pixel values; decoder means are squashed into it.  ``None`` for real-valued
        data: the decoder output is the mean itself.
    :param beta: extra weight on the KL for the flat VAE baseline (beta-VAE); ignored by other models.
    :param conditionals: ``"mlp"`` (Appendix B.1: ``fc_layers`` dense layers, then a Gaussian head whose scale
        depends on the input) or ``"affine"``: every latent conditional of the stacked HVAEs, and for vector data also
        ``q(z_1|x)`` and the mean of ``p(x|z_1)``, is affine with a learned input-independent diagonal scale,
        ``N(W h + b, diag(s)^2)``.  With a ``gaussian-learned`` likelihood this is exactly the linear-Gaussian family.
    :param inference: VLAE guide only: ``"trunk"`` (one shared stack ``h_l = g_l(h_{l-1})`` with a linear Gaussian
        head per layer) or ``"branches"`` (the reference code: ``z_1`` has a convolutional stack of its own, and each
        higher ``z_l`` reads the shared trunk through ``fc_layers`` dense layers of its own).
    :param reference_activations: VLAE model only: leaky ReLU (slope 0.1) for ``v_1`` and the hidden transposed
        convolutions, as the reference code (whose ``conv2d_t_bn_relu`` applies leaky ReLU); ReLU otherwise.
    :param bn_eps: batch-norm epsilon (PyTorch's 1e-5; TensorFlow's ``contrib.layers.batch_norm`` uses 1e-3).
    :param bn_momentum: batch-norm running-statistics momentum (PyTorch's 0.1; a TensorFlow decay ``d`` is ``1 - d``).

    >>> import pyro_vlae as pv
    >>> config = pv.ModelConfig(image_shape=(1, 16, 16), latent_dims=(4, 2), channels=(8, 16), hidden=32)
    >>> pv.latent_shapes(pv.get_model("vlae", config))
    {'z1': (4,), 'z2': (2,)}
    """

    name: str = "custom"
    image_shape: tuple = (1, 28, 28)
    latent_dims: tuple = (2, 2, 2)
    channels: tuple = (64, 128)
    hidden: int = 1024
    fc_layers: int = 2
    batch_norm: bool = True
    noise_injection: str = "concat"
    likelihood: str = "laplace"
    obs_scale: float = 0.125
    value_range: tuple | None = field(default=(0.0, 1.0))
    beta: float = 1.0
    conditionals: str = "mlp"
    inference: str = "trunk"
    reference_activations: bool = False
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1

    def __post_init__(self):
        self.image_shape = tuple(int(s) for s in self.image_shape)
        self.latent_dims = tuple(int(d) for d in self.latent_dims)
        self.channels = tuple(int(c) for c in self.channels)
        if self.value_range is not None:
            self.value_range = tuple(float(v) for v in self.value_range)
        if len(self.image_shape) not in (1, 3) or min(self.image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) for images or (D,) for vectors, got {self.image_shape}")
        if self.conditionals not in CONDITIONALS:
            raise ValueError(f"conditionals must be one of {CONDITIONALS}, got {self.conditionals!r}")
        if not self.latent_dims or min(self.latent_dims) < 1:
            raise ValueError(f"latent_dims must be a non-empty tuple of positive ints, got {self.latent_dims}")
        if self.noise_injection not in ("concat", "gated_add"):
            raise ValueError(f"noise_injection must be 'concat' or 'gated_add', got {self.noise_injection!r}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if not self.obs_scale > 0:
            raise ValueError(f"obs_scale must be > 0, got {self.obs_scale}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.inference not in VLAE_INFERENCE:
            raise ValueError(f"inference must be one of {VLAE_INFERENCE}, got {self.inference!r}")
        if not (self.bn_eps > 0 and 0 < self.bn_momentum <= 1):
            raise ValueError(f"need bn_eps > 0 and 0 < bn_momentum <= 1, got {self.bn_eps} and {self.bn_momentum}")
        if self.is_vector:
            return
        factor = 2 ** len(self.channels)
        _, h, w = self.image_shape
        if h % factor or w % factor:
            raise ValueError(
                f"image size {h}x{w} is not divisible by 2**{len(self.channels)} = {factor} "
                f"(one halving per conv layer in channels={self.channels}); pick a preset made for this image size"
            )

    @property
    def num_layers(self) -> int:
        return len(self.latent_dims)

    @property
    def is_vector(self) -> bool:
        """Whether the data are vectors ``(D,)`` rather than images ``(C, H, W)``."""
        return len(self.image_shape) == 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(**d)


LIKELIHOODS = ("gaussian", "laplace", "bernoulli", "gaussian-learned")
CONDITIONALS = ("mlp", "affine")
VLAE_INFERENCE = ("trunk", "branches")


def activation(kind: str = "lrelu") -> nn.Module:
    """Leaky ReLU (slope 0.1, as in the reference) for ``"lrelu"``, ReLU for ``"relu"``."""
    return nn.LeakyReLU(0.1) if kind == "lrelu" else nn.ReLU()


def dense(in_dim: int, out_dim: int, batch_norm: bool, act: str = "lrelu") -> nn.Sequential:
    """Linear, optional batch norm, activation."""
    layers = [nn.Linear(in_dim, out_dim, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(out_dim))
    layers.append(activation(act))
    return nn.Sequential(*layers)


class MLP(nn.Module):
    """``num_layers`` dense blocks of width ``hidden``, then an optional linear map to ``out_dim``.

    :param in_dim: input width.
    :param hidden: hidden width.
    :param num_layers: number of dense (linear-BN-activation) blocks.
    :param out_dim: width of a final linear layer, or ``None`` for none.
    """

    def __init__(self, in_dim, hidden, num_layers, out_dim=None, batch_norm=True, act="lrelu"):
        super().__init__()
        layers, d = [], in_dim
        for _ in range(num_layers):
            layers.append(dense(d, hidden, batch_norm, act))
            d = hidden
        if out_dim is not None:
            layers.append(nn.Linear(d, out_dim))
            d = out_dim
        self.net = nn.Sequential(*layers)
        self.out_dim = d

    def forward(self, h):
        return self.net(h)


class ConvEncoder(nn.Module):
    """Stride-2 4x4 convolutions (each halves H and W), then flatten.

    :param image_shape: ``(C, H, W)`` of the input.
    :param channels: output channels of each convolution.
    """

    def __init__(self, image_shape, channels, batch_norm=True, act="lrelu"):
        super().__init__()
        check_image_shape_3d(image_shape, type(self).__name__)
        c, h, w = image_shape
        layers = []
        for out in channels:
            layers.append(nn.Conv2d(c, out, 4, stride=2, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(activation(act))
            c, h, w = out, h // 2, w // 2
        self.net = nn.Sequential(*layers)
        self.out_dim = c * h * w

    def forward(self, x):
        return self.net(x).flatten(1)


class DeconvDecoder(nn.Module):
    """Dense map to a ``(channels[-1], H / 2^n, W / 2^n)`` feature map, then stride-2 4x4 transposed convolutions.

    Returns unsquashed outputs (logits) of shape ``image_shape``; the likelihood decides how to squash them.
    """

    def __init__(self, in_dim, image_shape, channels, batch_norm=True, act="relu", conv_act=None):
        super().__init__()  # conv_act: activation of the hidden transposed convolutions (default: act)
        check_image_shape_3d(image_shape, type(self).__name__)
        c_out, h, w = image_shape
        n = len(channels)
        self.start = (channels[-1], h // 2**n, w // 2**n)
        self.fc = dense(in_dim, math.prod(self.start), batch_norm, act)
        layers = []
        chans = list(reversed(channels))
        for i, c in enumerate(chans):
            last = i == len(chans) - 1
            nxt = c_out if last else chans[i + 1]
            layers.append(nn.ConvTranspose2d(c, nxt, 4, stride=2, padding=1, bias=last or not batch_norm))
            if not last:
                if batch_norm:
                    layers.append(nn.BatchNorm2d(nxt))
                layers.append(activation(conv_act or act))
        self.net = nn.Sequential(*layers)

    def forward(self, h):
        return self.net(self.fc(h).view(-1, *self.start))


class GaussianHead(nn.Module):
    """Linear mean and ``sigmoid(linear) + MIN_SCALE`` standard deviation, as in Appendix B.1 and the reference."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.loc = nn.Linear(in_dim, out_dim)
        self.scale = nn.Linear(in_dim, out_dim)

    def forward(self, h):
        return full(self.loc(h)), torch.sigmoid(full(self.scale(h))) + MIN_SCALE


class AffineGaussian(nn.Module):
    """``N(W h + b, diag(s)^2)``: linear mean and a learned scale ``s = softplus(r) + MIN_SCALE`` that does not depend
    on ``h`` (the ``"affine"`` conditionals, exact for linear-Gaussian models).

    :param in_dim: input width.
    :param out_dim: output width.
    :param init_scale: initial ``s`` (every dimension).
    """

    def __init__(self, in_dim, out_dim, init_scale=1.0):
        super().__init__()
        self.loc = nn.Linear(in_dim, out_dim)
        self.raw_scale = nn.Parameter(torch.full((out_dim,), math.log(math.expm1(init_scale - MIN_SCALE))))

    def forward(self, h):
        loc = full(self.loc(h))
        return loc, (nn.functional.softplus(self.raw_scale) + MIN_SCALE).expand_as(loc)


def gaussian_conditional(in_dim, out_dim, config: ModelConfig) -> nn.Module:
    """A Gaussian conditional ``h -> (loc, scale)`` between layers: ``MLP`` plus :class:`GaussianHead`, or
    :class:`AffineGaussian` when ``config.conditionals == "affine"``."""
    if config.conditionals == "affine":
        return AffineGaussian(in_dim, out_dim)
    return nn.Sequential(
        MLP(in_dim, config.hidden, config.fc_layers, None, config.batch_norm), GaussianHead(config.hidden, out_dim)
    )


def dense_decoder(in_dim, config: ModelConfig) -> nn.Module:
    """Vector data: raw decoder outputs of width ``D`` from ``z_1``: one linear map (affine conditionals) or
    ``fc_layers`` dense ReLU layers then a linear map."""
    (d,) = config.image_shape
    layers = 0 if config.conditionals == "affine" else config.fc_layers
    return MLP(in_dim, config.hidden, layers, d, config.batch_norm, "relu")


class NoiseInjection(nn.Module):
    """Combines the deterministic path ``z~_{l+1}`` with the ladder input ``v_l(z_l)``.

    ``"concat"`` is the paper's ``[z~_{l+1}; v_l(z_l)]`` (Eq. 11); ``"gated_add"`` is the reference code's
    ``z~_{l+1} + gate * v_l(z_l)`` with a learned per-unit gate initialised at 0.1.
    """

    def __init__(self, dim, method="concat"):
        super().__init__()
        self.method = method
        if method == "gated_add":
            self.gate = nn.Parameter(torch.full((dim,), 0.1))
        self.out_dim = 2 * dim if method == "concat" else dim

    def forward(self, path, ladder):
        if self.method == "concat":
            return torch.cat([path, ladder], dim=-1)
        return path + self.gate * ladder


def set_batch_norm(module: nn.Module, eps: float, momentum: float) -> nn.Module:
    """Set ``eps`` and ``momentum`` of every batch-norm layer in ``module`` (``config.bn_eps``, ``bn_momentum``)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps, m.momentum = eps, momentum
    return module


def full(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when a bfloat16 / float16 autocast made it so (distribution parameters), else ``t`` itself."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def squash(raw: torch.Tensor, value_range) -> torch.Tensor:
    """Map unbounded decoder outputs into ``value_range`` with a sigmoid (the reference's output layer)."""
    lo, hi = value_range
    return lo + (hi - lo) * torch.sigmoid(raw)


# ---------------------------------------------------------------------------------------------------------------------
# Argument checks shared by every model and guide (plain Python, no Pyro).


_REGISTER = [True]  # whether children() goes through the owner's attribute lookup (see without_param_registration)


@contextlib.contextmanager
def without_param_registration():
    """Inside, :func:`children` reads child modules from ``module._modules``, past the owner's attribute lookup.

    A Pyro ``PyroModule`` registers a plain child module's parameters with Pyro (a ``pyro.module`` statement) every
    time the child is looked up; for the small networks here that is most of a training step's Python time.  A
    training step whose parameters are registered already and held by its optimiser
    (:class:`~pyro_vlae.training.step.GraphSafeStep`) runs the model and guide in here: the same modules compute the
    same values, and no ``param`` statement reaches Pyro's handlers.
    """
    _REGISTER[0], before = False, _REGISTER[0]
    try:
        yield
    finally:
        _REGISTER[0] = before


def children(module: nn.Module, *names: str) -> tuple:
    """The child modules ``names`` of ``module``, looked up as attributes (so a ``PyroModule`` registers their
    parameters) except inside :func:`without_param_registration`."""
    if _REGISTER[0]:
        return tuple(getattr(module, n) for n in names)
    return tuple(module._modules[n] for n in names)


def check_kl_scale(kl_scale):
    """Return ``kl_scale`` as a float, or raise if it is not a positive finite number.

    A tensor (the training step's device scalar, changed in place every step) is returned unchanged and not read:
    reading it would stop the host at every step.  ``poutine.scale`` checks a tensor scale ``> 0`` while Pyro's
    validation is on, and the training schedules never go below
    :data:`~pyro_vlae.training.annealing.MIN_KL_SCALE`.
    """
    if torch.is_tensor(kl_scale):
        return kl_scale
    value = float(kl_scale)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(
            f"kl_scale must be a finite number > 0, got {kl_scale!r}; annealing schedules start just above 0 "
            "(poutine.scale with 0 would drop the latent sites from the objective)"
        )
    return value


def check_images(x, image_shape, who: str) -> int:
    """Validate a batch of images against ``image_shape`` and return the batch size."""
    if not torch.is_tensor(x):
        raise TypeError(
            f"{who}: x must be a torch.Tensor of shape (N, {', '.join(map(str, image_shape))}), got {type(x)}"
        )
    ndim = 1 + len(image_shape)
    if x.dim() != ndim or tuple(x.shape[1:]) != tuple(image_shape):
        got = tuple(x.shape[1:]) if x.dim() == ndim else tuple(x.shape)
        raise ValueError(
            f"{who}: data shape {got} does not match the preset's "
            f"image shape {tuple(image_shape)}; choose a preset for this dataset (--preset) or resize the data"
        )
    return x.shape[0]


def check_image_shape_3d(image_shape, who: str) -> None:
    """Raise a clear error when a convolutional block is asked to handle vector data."""
    if len(image_shape) != 3:
        raise ValueError(
            f"{who} needs image data (C, H, W), got the vector shape {tuple(image_shape)}; vector data is supported "
            "by the stacked HVAEs ('hvae', 'hvae-ar'), which encode and decode it with dense layers"
        )


def batch_size_of(x, batch_size, image_shape, who: str) -> int:
    """Number of examples: from ``x`` when given (and then ``batch_size`` must agree), else ``batch_size``."""
    if x is not None:
        n = check_images(x, image_shape, who)
        if batch_size is not None and batch_size != n:
            raise ValueError(f"{who}: batch_size={batch_size} disagrees with x of batch size {n}")
        return n
    if batch_size is None:
        return 1
    if int(batch_size) < 1:
        raise ValueError(f"{who}: batch_size must be >= 1, got {batch_size}")
    return int(batch_size)
