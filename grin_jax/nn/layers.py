"""Basic NNX layers that own parameters with logical axis names.

Axes: B batch, S sequence, D model (logical 'embed'), V vocabulary ('vocab'), F FFN hidden ('mlp'),
H query heads ('heads'), G KV heads ('kv_heads'), K head dim ('kv'), E experts ('experts').

Every parameter is an `nnx.Param` whose metadata `out_sharding` holds its logical axis names, e.g.
('embed', 'vocab'). No mesh is built here: outside a mesh context the names are only metadata
(`nnx.get_partition_spec(state)` reads them); under `jax.set_mesh(mesh)` + `nnx.logical_axis_rules(rules)`
the parameters are sharded eagerly when created (Flax's eager sharding).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Names = tuple  # logical axis names, one per array axis (None = never sharded)


def param(value: jax.Array, names: Sequence[str | None]) -> nnx.Param:
    """An `nnx.Param` carrying logical axis names. Eager sharding only when a mesh is in context."""
    names = tuple(names)
    if len(names) != jnp.ndim(value):
        raise ValueError(f"param: {len(names)} axis names {names} for an array of shape {jnp.shape(value)}")
    eager = nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty
    return nnx.Param(value, out_sharding=names, eager_sharding=eager)


def batch_stat(value: jax.Array, names: Sequence[str | None]) -> nnx.BatchStat:
    """An `nnx.BatchStat` (a running statistic: a non-trainable variable the train state carries apart from the
    parameters, models/lm.py) carrying logical axis names, as `param`."""
    names = tuple(names)
    if len(names) != jnp.ndim(value):
        raise ValueError(f"batch_stat: {len(names)} axis names {names} for an array of shape {jnp.shape(value)}")
    eager = nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty
    return nnx.BatchStat(value, out_sharding=names, eager_sharding=eager)


def normal_init(key, shape, dtype, std: float) -> jax.Array:
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)


class Dense(nnx.Module):
    """y = x . W (+ b), contracting the last len(in_shape) axes of x with the first axes of W.

    kernel: in_shape + out_shape (e.g. [D, H, K] for a query projection), bias: out_shape.
    Matmul in `dtype` (compute dtype); parameters stored in `param_dtype`; fan-in scaled normal init. out_dtype:
    the matmul's result dtype (None: dtype; the LM head asks float32: bfloat16 operands, float32 logits).
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], *, names: Sequence[str | None],
                 use_bias: bool = False, param_dtype=jnp.float32, dtype=jnp.float32, rngs: nnx.Rngs,
                 init_std: float | None = None, out_dtype=None):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        names = tuple(names)
        fan_in = 1
        for n in self.in_shape:
            fan_in *= n
        std = fan_in ** -0.5 if init_std is None else init_std
        self.kernel = param(normal_init(rngs.params(), self.in_shape + self.out_shape, param_dtype, std), names)
        self.bias = (param(jnp.zeros(self.out_shape, param_dtype), names[len(self.in_shape):])
                     if use_bias else None)
        self.dtype = dtype
        self.out_dtype = dtype if out_dtype is None else out_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_shape)
        if x.shape[x.ndim - n_in:] != self.in_shape:
            raise ValueError(f"Dense: input trailing shape {x.shape[x.ndim - n_in:]} != {self.in_shape}")
        y = jnp.tensordot(x.astype(self.dtype), self.kernel[...].astype(self.dtype), axes=n_in,
                          preferred_element_type=self.out_dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.out_dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table [V, D] ('vocab', 'embed'); `attend` gives tied-head logits x @ table^T."""

    def __init__(self, vocab_size: int, d_model: int, *, param_dtype=jnp.float32, dtype=jnp.float32,
                 init_std: float = 0.02, rngs: nnx.Rngs):
        self.embedding = param(normal_init(rngs.params(), (vocab_size, d_model), param_dtype, init_std),
                               ("vocab", "embed"))
        self.dtype = dtype

    def table(self) -> jax.Array:
        """The table, gathered along D under FSDP (sharding.fsdp_gathered; imported here: it imports the MoE)."""
        from grin_jax.sharding import fsdp_gathered
        return fsdp_gathered(self.embedding[...], ("vocab", "embed"))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.table(), tokens, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied-head logits in float32 (operands in x's dtype)."""
        x_TD = x.reshape(-1, x.shape[-1])  # 2-D: XLA:CPU's backward of the 3-D form is slower
        logits = jnp.einsum("td,vd->tv", x_TD, self.table().astype(x.dtype), preferred_element_type=jnp.float32)
        return logits.reshape(x.shape[:-1] + logits.shape[-1:])


class LayerNorm(nnx.Module):
    """LayerNorm with weight and bias ('embed'), statistics in float32 (torch.nn.LayerNorm semantics:
    biased variance, eps inside the square root). Output in `dtype`."""

    def __init__(self, dim: int, *, eps: float = 1e-5, param_dtype=jnp.float32, dtype=jnp.float32):
        self.scale = param(jnp.ones((dim,), param_dtype), ("embed",))
        self.bias = param(jnp.zeros((dim,), param_dtype), ("embed",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm with a weight ('embed'), statistics in float32 (Mixtral / T5 semantics)."""

    def __init__(self, dim: int, *, eps: float = 1e-5, param_dtype=jnp.float32, dtype=jnp.float32):
        self.scale = param(jnp.ones((dim,), param_dtype), ("embed",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


NORMS = {"layernorm": LayerNorm, "rmsnorm": RMSNorm}


def make_norm(kind: str, dim: int, *, eps: float, param_dtype=jnp.float32, dtype=jnp.float32):
    if kind not in NORMS:
        raise ValueError(f"norm={kind!r} is unknown: accepted values are {sorted(NORMS)}")
    return NORMS[kind](dim, eps=eps, param_dtype=param_dtype, dtype=dtype)
