"""Test set-up: 8 fake CPU devices for sharding tests (must be set before jax initialises)."""
import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CPU kernels' OpenMP threads sleep between calls instead of spinning: with two pytest workers on two cores a
# spinning team takes the cores XLA's threads and the other worker need.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from grin_jax.train import trainer as _trainer  # noqa: E402  (after the XLA flags above)

_trainer.keep_freed_buffers()  # as the CLIs run: before the backend starts (XLA's per-step buffers reused)
