"""Benchmark suite for the MoE core: `python -m grin_jax.bench [--quick] [--json out.json]`.

Everything runs in ONE process; within a group the variants are compiled first, then timed interleaved
(repetition r of every variant before repetition r + 1 of any) and summarised by medians, so the ratios that
matter (MoE / dense FFN with the same active FLOPs) are measured side by side under the same machine load.
Each group also times an f32 square matmul ('peak_matmul') so achieved GFLOP/s can be read as % of the peak
measured in the same run.

Groups (cases.py has the exact shapes):
  G=1 .. G=16      dense FFN vs MoE at fixed active and total parameters (E = 8G experts of width 1024/G,
                   top-2G; G=1 coarse, G=8 fine-grained), forward and forward+backward, skewed and balanced
                   loads; backends 'kernel' (the C++ CPU kernel), 'tiled' (its pure-XLA fallback) and 'capacity'
                   (drops tokens), plus the unfused sort + `gmm.tiled_gmm` path as an ablation.
  backends ...     every dispatch backend ('dense' reference, 'ragged_dot', 'kernel', 'tiled', 'capacity', 'auto') at a
                   reduced T (the dense reference and XLA:CPU's ragged_dot compute E/K x and E x the FLOPs).
  routers ...      SparseMixer-v2 vs top-k softmax (`routing.route`), forward and forward+backward.
  PEER ...         the PEER layer and a PEER LM's train step (docs/peer.md#speed).
  DS-MoE layer     DS-MoE's FFN at inference: top-K of 32 experts and a threshold against its dense mode
                   (docs/ds_moe.md#speed); `--only DS-MoE`.
  DS-MoE LM ...    a whole DS-MoE LM's eval forward (MLP and attention experts) at ~30 % active against its dense mode.
  train step       grin_tiny vs dense_tiny, one whole optimizer step (when the trainer and configs/ load).

Records (`--json`): group, name, case, mode, backend, load, shape, reps, median_s, min_s, median_cpu_s,
ratio_to_dense, cpu_ratio_to_dense, useful_gflop, gflops_per_s, memory (XLA memory_analysis of the compiled
executable: temp_bytes, argument_bytes, output_bytes, alias_bytes, peak_bytes = temp + arguments + outputs -
aliased).
"""
