"""grin_jax's own parameter checkpoint: a directory with

    params.safetensors   the flattened parameters ('layers.0.attn.q.kernel', ... as models.flatten_params)
    model_config.json    ModelConfig.to_dict()
    hf_config.json       (optional) the config.json of the Hugging Face checkpoint it was imported from, so that
                         an export keeps the fields grin_jax does not model (token ids, ...)

Large models may be sharded (params-0000k-of-0000n.safetensors + params.safetensors.index.json).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Mapping

import numpy as np

from grin_jax.convert import hf as _hf
from grin_jax.models.config import ModelConfig

PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "model_config.json"
HF_CONFIG_FILE = "hf_config.json"


def to_numpy_flat(params) -> dict:
    """nnx.State of params, or an already flat {name: array} mapping -> {name: numpy array}."""
    from flax import nnx

    if isinstance(params, nnx.State):
        from grin_jax.models.lm import flatten_params
        params = flatten_params(params)
    return {k: np.asarray(v) for k, v in params.items()}


def save_checkpoint(path: str, config: ModelConfig, params, *, hf_config: Mapping | None = None,
                    max_shard_size=None) -> None:
    os.makedirs(path, exist_ok=True)
    flat = to_numpy_flat(params)
    names = _hf.write_safetensors_dir(path, flat, max_shard_size=max_shard_size,
                                      metadata={"format": "grin_jax"})
    if names != ["model.safetensors"]:  # sharded: rename to params-*
        index_path = os.path.join(path, "model.safetensors.index.json")
        with open(index_path) as f:
            index = json.load(f)
        for name in names:
            os.replace(os.path.join(path, name), os.path.join(path, name.replace("model-", "params-")))
        index["weight_map"] = {k: v.replace("model-", "params-") for k, v in index["weight_map"].items()}
        with open(os.path.join(path, PARAMS_FILE + ".index.json"), "w") as f:
            json.dump(index, f, indent=2)
        os.remove(index_path)
    else:
        os.replace(os.path.join(path, "model.safetensors"), os.path.join(path, PARAMS_FILE))
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(config.to_dict(), f, indent=2)
    if hf_config is not None:
        with open(os.path.join(path, HF_CONFIG_FILE), "w") as f:
            json.dump(dict(hf_config), f, indent=2, sort_keys=True)


def load_checkpoint(path: str):
    """-> (ModelConfig, flat numpy params, hf_config dict or None)."""
    with open(os.path.join(path, CONFIG_FILE)) as f:
        config = ModelConfig.from_dict(json.load(f))
    files = sorted(glob.glob(os.path.join(path, "params*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no {PARAMS_FILE} in {path}")
    flat = {}
    for name in files:
        flat.update(_hf.load_safetensors(name))
    hf_config = None
    if os.path.exists(os.path.join(path, HF_CONFIG_FILE)):
        with open(os.path.join(path, HF_CONFIG_FILE)) as f:
            hf_config = json.load(f)
    return config, flat, hf_config
