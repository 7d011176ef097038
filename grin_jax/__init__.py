"""grin-jax: Mixture-of-Experts language models in JAX (GRIN, fine-grained MoE, DS-MoE, PEER)."""

__version__ = "0.1.0"
