"""Convert checkpoints between transformers (PhiMoE / GRIN-MoE, Mixtral) and grin_jax.

    python -m grin_jax.convert --from-hf HF_DIR --out CKPT_DIR [--dtype bfloat16]
    python -m grin_jax.convert --to-hf CKPT_DIR --out HF_DIR [--layout 5.x|4.x] [--dtype bfloat16]
                               [--max-shard-size 5GB]

HF_DIR: a local directory with config.json and *.safetensors (either layout, sharded or not; no hub access).
CKPT_DIR: grin_jax's checkpoint (params.safetensors + model_config.json [+ hf_config.json]).
--out must be new or empty (stale files from an earlier conversion would be read with the new ones); --overwrite
replaces its contents. User errors print one line (set GRIN_JAX_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import argparse
import sys

from grin_jax.cli import run_main
from grin_jax.convert import checkpoint_to_hf, hf_to_checkpoint
from grin_jax.convert.hf import LAYOUTS
from grin_jax.models.config import DTYPES


def main(argv=None) -> int:
    return run_main(_main, argv)  # a user error (ValueError, a missing file, a full disk): one line


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grin_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="HF_DIR", help="import a transformers checkpoint directory")
    source.add_argument("--to-hf", metavar="CKPT_DIR", help="export a grin_jax checkpoint directory")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--layout", choices=LAYOUTS, default="5.x",
                        help="--to-hf: 5.x fused experts (mlp.experts.gate_up_proj) or 4.x per-expert "
                             "(block_sparse_moe.experts.j.w1/w2/w3); default 5.x")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="cast the parameters (default: keep)")
    parser.add_argument("--max-shard-size", default=None, help="shard the safetensors output, e.g. 5GB")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the contents of a non-empty --out directory (refused otherwise)")
    args = parser.parse_args(argv)
    common = dict(dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    if args.from_hf:
        config = hf_to_checkpoint(args.from_hf, args.out, **common)
        print(f"imported {args.from_hf} -> {args.out}: {config}")
    else:
        checkpoint_to_hf(args.to_hf, args.out, layout=args.layout, **common)
        print(f"exported {args.to_hf} -> {args.out} ({args.layout} layout)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
