"""The pure-functional MoE core: plain JAX functions over explicit parameter pytrees (no Flax here)."""

from grin_jax.moe.dispatch import BACKENDS, moe_ffn
from grin_jax.moe.experts import ACTIVATIONS, init_expert_params
from grin_jax.moe.layer import MoEConfig, init_moe_params, moe_layer
from grin_jax.moe.losses import load_balance_loss, mutual_information_loss, router_z_loss, routing_metrics
from grin_jax.moe.routing import ROUTERS, Routing, route
from grin_jax.moe.sparsemixer import sparsemixer_v2

__all__ = [
    "BACKENDS", "moe_ffn", "ACTIVATIONS", "init_expert_params", "MoEConfig", "init_moe_params", "moe_layer",
    "load_balance_loss", "mutual_information_loss", "router_z_loss", "routing_metrics", "ROUTERS", "Routing",
    "route", "sparsemixer_v2",
]
