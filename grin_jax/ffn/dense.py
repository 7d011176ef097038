"""The dense FFN kind: y = (act(x W_gate) * x W_up) W_down for gated activations, else act(x W_up) W_down; and the
`none` kind, a block without an FFN (y = 0: the block is attention only), a baseline for ablations
(experiments/peer/).

Axes: B batch, S sequence, D model, F hidden. Parameters (no biases): w_up, w_gate [D, F] ('embed', 'mlp'),
w_down [F, D] ('mlp', 'embed'); fan-in scaled normal init.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from grin_jax import sections as _sections
from grin_jax.ffn import register_ffn
from grin_jax.moe import experts as _experts
from grin_jax.nn.layers import normal_init, param


@dataclasses.dataclass(frozen=True, kw_only=True)
class DenseConfig:
    """d_hidden: the FFN width F (None = 4 * d_model). activation: experts.ACTIVATIONS."""

    d_model: int
    d_hidden: int | None = None
    activation: str = "swiglu"

    def __post_init__(self):
        if self.d_hidden is None:
            object.__setattr__(self, "d_hidden", 4 * self.d_model)
        if isinstance(self.d_hidden, bool) or not isinstance(self.d_hidden, int) or self.d_hidden < 1:
            raise ValueError(f"dense.d_hidden={self.d_hidden!r} is invalid: accepted values are None or integers >= 1")
        if self.activation not in _experts.ACTIVATIONS:
            raise ValueError(f"dense.activation={self.activation!r} is invalid: accepted values are "
                             f"{sorted(_experts.ACTIVATIONS)}")

    @classmethod
    def from_section(cls, values, *, d_model: int) -> "DenseConfig":
        return _sections.from_section(cls, values, d_model=d_model, section="dense")

    def to_section(self) -> dict:
        return {"d_hidden": self.d_hidden, "activation": self.activation}

    @property
    def loss_weights(self) -> dict:
        return {}


# The dense FFN takes the kernel from tokens x width = 2^18 up: below, XLA's matmuls are faster (the kernel's fixed
# cost per call; experiments/bench/dense_ffn_crossover.py).
KERNEL_MIN_TOKENS_X_WIDTH = 1 << 18


def kernel_unavailable(activation: str, dtype, tokens: int | None = None, d_hidden: int | None = None) -> str | None:
    """None when the dense FFN runs on the CPU expert kernel (cpu_kernel.auto_unavailable, an activation the kernel
    has, and tokens x d_hidden >= KERNEL_MIN_TOKENS_X_WIDTH when given), else why it runs as XLA matmuls.
    $GRIN_JAX_KERNEL=0 turns the kernel off."""
    from grin_jax.moe import cpu_kernel
    if tokens is not None and d_hidden is not None and tokens * d_hidden < KERNEL_MIN_TOKENS_X_WIDTH:
        return (f"tokens x d_hidden = {tokens} x {d_hidden} < {KERNEL_MIN_TOKENS_X_WIDTH}: XLA's matmuls are faster "
                "there")
    return cpu_kernel.supports(activation, dtype) or cpu_kernel.auto_unavailable(dtype)


@register_ffn("dense")
class DenseFFN(nnx.Module):
    Config = DenseConfig

    def __init__(self, config: DenseConfig, *, norm: str = "layernorm", norm_eps: float = 1e-5,
                 param_dtype=jnp.float32, dtype=jnp.float32, rngs: nnx.Rngs):
        del norm, norm_eps
        d_model, d_hidden = config.d_model, config.d_hidden
        self.act = _experts.get_activation(config.activation)
        self.activation = config.activation
        self.w_up = param(normal_init(rngs.params(), (d_model, d_hidden), param_dtype, d_model ** -0.5),
                          ("embed", "mlp"))
        self.w_gate = (param(normal_init(rngs.params(), (d_model, d_hidden), param_dtype, d_model ** -0.5),
                             ("embed", "mlp")) if self.act.gated else None)
        self.w_down = param(normal_init(rngs.params(), (d_hidden, d_model), param_dtype, d_hidden ** -0.5),
                            ("mlp", "embed"))
        self.dtype = dtype

    def __call__(self, x_BSD: jax.Array, *, training: bool = False, rng=None):
        del training, rng
        # [B, S, D] -> [T, D] first: XLA:CPU runs the backward of a 3-D x 2-D matmul (weight gradient contracting
        # two axes) ~2x slower than that of the 2-D one.
        x = x_BSD.reshape(-1, x_BSD.shape[-1]).astype(self.dtype)
        if kernel_unavailable(self.activation, self.dtype, x.shape[0], self.w_up.shape[-1]) is None:
            y = self._kernel(x)
            return y.reshape(x_BSD.shape[:-1] + y.shape[-1:]), {"losses": {}, "metrics": {}}
        up = x @ self.w_up[...].astype(self.dtype)
        h = self.act.fn(x @ self.w_gate[...].astype(self.dtype)) * up if self.act.gated else self.act.fn(up)
        y = h @ self.w_down[...].astype(self.dtype)
        return y.reshape(x_BSD.shape[:-1] + y.shape[-1:]), {"losses": {}, "metrics": {}}

    def _kernel(self, x_TD: jax.Array) -> jax.Array:
        """The FFN on the C++ expert kernel as one expert that every token takes with weight 1: blocks of tokens
        through gate/up, activation and down in cache, the [T, F] hidden never written (the backward recomputes
        it from the saved pre-activations)."""
        from grin_jax.moe import cpu_kernel
        weights = {name: getattr(self, name)[...][None].astype(x_TD.dtype) for name in ("w_up", "w_down", "w_gate")
                   if getattr(self, name) is not None}
        T = x_TD.shape[0]
        return cpu_kernel.kernel_expert_mlp(weights, x_TD, jnp.zeros((T, 1), jnp.int32),
                                            jnp.ones((T, 1), jnp.float32), activation=self.activation)

    @staticmethod
    def param_counts(config: DenseConfig) -> dict:
        matrices = 3 if _experts.get_activation(config.activation).gated else 2
        n = matrices * config.d_model * config.d_hidden
        return {"dense_ffn": (n, n)}

    @staticmethod
    def check_mesh(config: DenseConfig, sizes: dict) -> None:
        model = sizes.get("model", 1)
        if config.d_hidden % model:
            raise ValueError(f"dense.d_hidden={config.d_hidden} is not divisible by mesh.model={model}: the dense "
                             "FFN width is sharded over the model axis")


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoFFNConfig:
    """The `none` kind has no options."""

    d_model: int

    @classmethod
    def from_section(cls, values, *, d_model: int) -> "NoFFNConfig":
        return _sections.from_section(cls, values, d_model=d_model, section="none")

    def to_section(self) -> dict:
        return {}

    @property
    def loss_weights(self) -> dict:
        return {}


@register_ffn("none")
class NoFFN(nnx.Module):
    """No FFN: y = 0, so the block is x + Attn(Norm(x)) (its pre-FFN norm is kept and stays unused)."""

    Config = NoFFNConfig

    def __init__(self, config: NoFFNConfig, *, norm: str = "layernorm", norm_eps: float = 1e-5,
                 param_dtype=jnp.float32, dtype=jnp.float32, rngs: nnx.Rngs):
        del config, norm, norm_eps, param_dtype, rngs
        self.dtype = dtype

    def __call__(self, x_BSD: jax.Array, *, training: bool = False, rng=None):
        del training, rng
        return jnp.zeros_like(x_BSD, dtype=self.dtype), {"losses": {}, "metrics": {}}

    @staticmethod
    def param_counts(config: NoFFNConfig) -> dict:
        del config
        return {}

    @staticmethod
    def check_mesh(config: NoFFNConfig, sizes: dict) -> None:
        del config, sizes
