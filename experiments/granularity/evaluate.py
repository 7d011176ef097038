"""Re-evaluate every finished trial's final checkpoint on more of the validation split: the first 48 batches
(98k tokens, about half of the split; 0 = all of it) instead of the trainer's end-of-run eval of train.eval_batches
= 8 batches = 16k tokens, too few to rank models that differ by 1-3 %.

    python experiments/granularity/evaluate.py [--sweep experiments/granularity/runs] [--max_batches 48]

Writes <trial>/val_full.json ({'loss', 'bits_per_byte', 'tokens', 'max_batches'}); trials that already have it
are skipped. analyze.py reads it. Every trial is evaluated on the same tokens (the split is read in order).
"""

import argparse
import json
import os
import sys
import time

import jax

from grin_jax.train import trainer

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", default=os.path.join(HERE, "runs"))
    parser.add_argument("--max_batches", type=int, default=48, help="0: the whole validation split")
    args = parser.parse_args(argv)
    trials_dir = os.path.join(args.sweep, "trials")
    for name in sorted(os.listdir(trials_dir)):
        workdir = os.path.join(trials_dir, name)
        out = os.path.join(workdir, "val_full.json")
        if not os.path.exists(os.path.join(workdir, "summary.json")) or os.path.exists(out):
            continue
        start = time.time()
        config, graphdef, params, tokenizer = trainer.load_trained(workdir)
        eval_step = jax.jit(trainer.make_eval_step(graphdef))
        result = trainer.evaluate(eval_step, params, config, tokenizer, max_batches=args.max_batches or None)
        result["max_batches"] = args.max_batches
        with open(out + ".tmp", "w") as f:
            json.dump(result, f, indent=2)
        os.replace(out + ".tmp", out)
        print(f"{name}: val loss {result['loss']:.4f} over {result['tokens']:.0f} tokens "
              f"({time.time() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
