"""Where the dense FFN should take the CPU expert kernel: a SwiGLU FFN's forward + backward at several sizes, as XLA
matmuls and as the kernel's single expert (what grin_jax/ffn/dense.py runs), interleaved in one process, medians.

    python experiments/bench/dense_ffn_crossover.py [--reps 50] > experiments/bench/dense_ffn_crossover_DATE.txt

Prints kernel time / XLA time per size (< 1: the kernel is faster). The layer's threshold
(dense.KERNEL_MIN_TOKENS_X_WIDTH, on tokens x width) is read off this table. Run it as the trainer runs (no
OMP_WAIT_POLICY set: the test suite sets PASSIVE, which makes every OpenMP region pay a wake-up)."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from grin_jax.train import trainer

SIZES = ((64, 32, 128), (256, 32, 128), (256, 64, 256), (512, 64, 256), (1024, 64, 256), (1024, 128, 512),
         (4096, 64, 256), (2048, 128, 512), (4096, 128, 512))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args(argv)
    trainer.keep_freed_buffers()
    import jax
    import jax.numpy as jnp

    from grin_jax.moe import cpu_kernel

    print(f"dense FFN crossover: jax {jax.__version__}, {os.cpu_count()} cpus, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}, reps {args.reps}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'T':>5} {'D':>4} {'F':>4} {'T x F':>8} {'xla ms':>8} {'kernel ms':>9} {'kernel / xla':>12}")
    for T, D, F in SIZES:
        keys = jax.random.split(jax.random.key(T * D + F), 5)
        x = jax.random.normal(keys[0], (T, D))
        params = tuple(jax.random.normal(k, shape) * 0.1 for k, shape in zip(keys[1:4], ((D, F), (D, F), (F, D))))
        cot = jax.random.normal(keys[4], (T, D))
        ids, ones = jnp.zeros((T, 1), jnp.int32), jnp.ones((T, 1), jnp.float32)

        def xla(p, x):
            return (jax.nn.silu(x @ p[0]) * (x @ p[1])) @ p[2]

        def kernel(p, x):
            weights = {"w_gate": p[0][None], "w_up": p[1][None], "w_down": p[2][None]}
            return cpu_kernel.kernel_expert_mlp(weights, x, ids, ones, activation="swiglu")

        fns = [jax.jit(jax.grad(lambda p, x, f=f: jnp.sum(f(p, x) * cot), argnums=(0, 1))) for f in (xla, kernel)]
        jax.block_until_ready([f(params, x) for f in fns])
        times = [[], []]
        for _ in range(args.reps):
            for i, f in enumerate(fns):
                start = time.perf_counter()
                jax.block_until_ready(f(params, x))
                times[i].append(time.perf_counter() - start)
        a, b = (1e3 * statistics.median(t) for t in times)
        print(f"{T:5d} {D:4d} {F:4d} {T * F:8d} {a:8.3f} {b:9.3f} {b / a:12.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
