#!/usr/bin/env bash
# The main job (configs/grin_tiny.py, as configured) with 3 seeds, from a committed tree; writes
# experiments/main_job/seeds.json (each run's summary.json) and prints the spread.
#   bash experiments/main_job/run.sh [WORKDIR_ROOT]
set -euo pipefail
cd "$(dirname "$0")/../.."
root=${1:-workdirs/main_job}
for seed in 0 1 2; do
  rm -rf "$root/seed$seed"
  python -m grin_jax.train --config=configs/grin_tiny.py --workdir="$root/seed$seed" --config.train.seed=$seed \
      --config.train.progress=False
done
python - "$root" <<'PY'
import json, sys
root = sys.argv[1]
runs = [json.load(open(f"{root}/seed{s}/summary.json")) for s in range(3)]
keys = ("git_commit", "git_dirty", "validation_loss", "validation_loss_stderr", "validation_bits_per_byte",
        "final_train_loss", "smoothed_train_loss", "corpus_fraction", "tokens_per_second", "wall_seconds")
table = [{k: r.get(k) for k in keys} | {"seed": s} for s, r in enumerate(runs)]
json.dump(table, open("experiments/main_job/seeds.json", "w"), indent=1)
v = [r["validation_loss"] for r in runs]
t = [r["smoothed_train_loss"] for r in runs]
for row in table:
    print(row)
print(f"validation loss spread (max - min) {max(v) - min(v):.4f} nats; smoothed train - validation "
      f"{[round(a - b, 4) for a, b in zip(t, v)]}")
PY
