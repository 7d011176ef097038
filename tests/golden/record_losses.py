"""Record the first 5 training losses of the smoke configs (and one (2, 2, 2)-mesh run on 8 fake devices).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python tests/golden/record_losses.py tests/golden/smoke_losses.json

The file pins the model's numbers across refactors: tests/test_golden.py retrains the same runs and compares.
"""
import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

RUNS = {
    "grin_tiny:smoke": ("grin_tiny", "smoke", {}),
    "gshard_tiny:smoke": ("gshard_tiny", "smoke", {}),
    "dense_tiny:smoke": ("dense_tiny", "smoke", {}),
    "fine_grained_tiny:smoke": ("fine_grained_tiny", "smoke", {}),
    "grin_tiny:smoke mesh (2,2,2)": ("grin_tiny", "smoke", {"mesh": {"data": 2, "expert": 2, "model": 2}}),
}
STEPS = 5


def config_for(name):
    import importlib.util
    module, variant, overrides = RUNS[name]
    spec = importlib.util.spec_from_file_location(module, os.path.join(REPO, "configs", module + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config(variant)
    config.train.steps = STEPS
    config.train.warmup_steps = 2
    config.train.log_every = 1
    config.train.eval_every = 0
    config.train.checkpoint_every = 0
    config.train.progress = False
    # The data stream as it was when the losses were recorded (the windowed shuffle and the old validation split).
    if "shuffle" in config.data:
        config.data.shuffle = "windows"
        config.data.validation_fraction = 0.02
        config.data.document_attention = False  # packed rows as one sequence, as the trainer fed them then
        config.train.final_eval_batches = 1
    for section, values in overrides.items():
        for key, value in values.items():
            config[section][key] = value
    return config


def losses_of(name):
    from grin_jax.train import trainer
    from grin_jax.train.metrics import read_jsonl
    with tempfile.TemporaryDirectory() as workdir:
        trainer.train(config_for(name), workdir)
        records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return [r["train/loss"] for r in records if r.get("train/loss") is not None][:STEPS]


if __name__ == "__main__":
    out = {name: losses_of(name) for name in RUNS}
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))
