"""Expert MLPs over stacked weights. Axes: T tokens, M token-slot rows, D model, F expert hidden, E experts.

Parameters of E experts (no biases), one pytree:
  gated activations ('swiglu', 'geglu'): {'w_gate': [E, D, F], 'w_up': [E, D, F], 'w_down': [E, F, D]}
      y = (act(x W_gate) * (x W_up)) W_down          (SwiGLU = PhiMoE / Mixtral: w1 gate, w3 up, w2 down)
  plain activations ('gelu', 'relu'):   {'w_up': [E, D, F], 'w_down': [E, F, D]}
      y = act(x W_up) W_down
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class Activation(NamedTuple):
    fn: Callable[[jax.Array], jax.Array]
    gated: bool


ACTIVATIONS: dict[str, Activation] = {
    "swiglu": Activation(jax.nn.silu, gated=True),
    "geglu": Activation(lambda x: jax.nn.gelu(x, approximate=False), gated=True),
    "gelu": Activation(lambda x: jax.nn.gelu(x, approximate=False), gated=False),
    "relu": Activation(jax.nn.relu, gated=False),
}


def get_activation(name: str) -> Activation:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r} is unknown: accepted values are {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def init_expert_params(key, *, num_experts: int, d_model: int, d_hidden: int, activation: str = "swiglu",
                       dtype=jnp.float32, init_scale: float = 1.0) -> dict:
    """Stacked expert weights, fan-in scaled normal initialisation."""
    act = get_activation(activation)
    k_gate, k_up, k_down = jax.random.split(key, 3)
    def normal(k, shape, fan_in):
        return (jax.random.normal(k, shape, jnp.float32) * (init_scale / fan_in ** 0.5)).astype(dtype)
    params = {
        "w_up": normal(k_up, (num_experts, d_model, d_hidden), d_model),
        "w_down": normal(k_down, (num_experts, d_hidden, d_model), d_hidden),
    }
    if act.gated:
        params["w_gate"] = normal(k_gate, (num_experts, d_model, d_hidden), d_model)
    return params


def check_expert_params(params: dict, activation: str) -> tuple[int, int, int]:
    """Validate the expert pytree for `activation`; returns (E, D, F)."""
    act = get_activation(activation)
    wanted = {"w_up", "w_down"} | ({"w_gate"} if act.gated else set())
    if set(params) != wanted:
        raise ValueError(f"expert params for activation={activation!r} must have keys {sorted(wanted)}, "
                         f"got {sorted(params)}")
    num_experts, d_model, d_hidden = params["w_up"].shape
    if params["w_down"].shape != (num_experts, d_hidden, d_model):
        raise ValueError(f"expert params: w_down has shape {params['w_down'].shape}, expected "
                         f"{(num_experts, d_hidden, d_model)} to match w_up {params['w_up'].shape}")
    if act.gated and params["w_gate"].shape != params["w_up"].shape:
        raise ValueError(f"expert params: w_gate has shape {params['w_gate'].shape}, expected {params['w_up'].shape}")
    return num_experts, d_model, d_hidden


def apply_experts_grouped(params: dict, x_MD: jax.Array, group_sizes_E: jax.Array, *, activation: str,
                          gmm: Callable) -> jax.Array:
    """Rows of x_MD sorted by expert (group_sizes_E rows each) through their experts -> [M, D].

    `gmm(lhs_MK, rhs_EKN, group_sizes_E) -> [M, N]` is a grouped matmul (see gmm.py). Gated activations run
    w_gate and w_up as one grouped matmul over the weights concatenated along F (one pass over the rows)."""
    act = get_activation(activation)
    if act.gated:
        d_hidden = params["w_up"].shape[-1]
        gate_up_MF = gmm(x_MD, jnp.concatenate([params["w_gate"], params["w_up"]], axis=-1), group_sizes_E)
        h_MF = act.fn(gate_up_MF[:, :d_hidden]) * gate_up_MF[:, d_hidden:]
    else:
        h_MF = act.fn(gmm(x_MD, params["w_up"], group_sizes_E))
    return gmm(h_MF, params["w_down"], group_sizes_E)


def apply_experts_batched(params: dict, x_ECD: jax.Array, *, activation: str) -> jax.Array:
    """Each expert e on its own rows x_ECD[e] -> [E, C, D] (a batched matmul; C rows per expert)."""
    act = get_activation(activation)
    up_ECF = jnp.einsum("ecd,edf->ecf", x_ECD, params["w_up"])
    if act.gated:
        h_ECF = act.fn(jnp.einsum("ecd,edf->ecf", x_ECD, params["w_gate"])) * up_ECF
    else:
        h_ECF = act.fn(up_ECF)
    return jnp.einsum("ecf,efd->ecd", h_ECF, params["w_down"])


def apply_experts_all(params: dict, x_TD: jax.Array, *, activation: str) -> jax.Array:
    """Every expert on every token -> [E, T, D] (the dense reference; E x the FLOPs)."""
    num_experts = params["w_up"].shape[0]
    return apply_experts_batched(params, jnp.broadcast_to(x_TD, (num_experts,) + x_TD.shape), activation=activation)
