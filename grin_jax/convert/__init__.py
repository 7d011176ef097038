"""Hugging Face checkpoint import / export: PhiMoE (GRIN-MoE, Phi-3.5-MoE) and Mixtral, in transformers' 5.x
fused-expert layout and the 4.x per-expert layout (hf.py), and grin_jax's own checkpoint (checkpoint.py).

    config, graphdef, params = import_hf('path/to/GRIN-MoE')            # a transformers checkpoint directory
    logits, aux = grin_jax.models.apply(graphdef, params, tokens)
    export_hf('out/', config, params, layout='4.x')                     # or '5.x'

Command line: python -m grin_jax.convert --help
"""

from __future__ import annotations

import os
import shutil

from grin_jax.convert.checkpoint import load_checkpoint, save_checkpoint, to_numpy_flat
from grin_jax.convert.hf import (FAMILIES, LAYOUTS, cast_flat, family_of, flat_from_hf_state,
                                 hf_config_from_model_config, hf_state_from_flat, model_config_from_hf,
                                 read_hf_checkpoint, read_safetensors_dir, write_hf_checkpoint,
                                 write_safetensors_dir)


def import_hf(path: str, *, dtype: str | None = None, **overrides):
    """A transformers checkpoint directory -> (ModelConfig, graphdef, params). dtype sets param_dtype (default:
    the checkpoint's dtype); overrides replace ModelConfig fields; moe={...} updates the MoE section (e.g. moe={'backend': 'dense'})."""
    from grin_jax.models.lm import unflatten_params

    if dtype is not None:
        overrides["param_dtype"] = dtype
    config, flat, _ = read_hf_checkpoint(path, **overrides)
    graphdef, params = unflatten_params(config, flat)
    return config, graphdef, params


def export_hf(path: str, config, params, *, layout: str = "5.x", dtype: str | None = None, max_shard_size=None,
              base_hf_config=None) -> dict:
    """(ModelConfig, params as nnx.State or flat mapping) -> a transformers checkpoint directory. Returns the
    written config.json."""
    return write_hf_checkpoint(path, config, to_numpy_flat(params), layout=layout, base_hf_config=base_hf_config,
                               dtype=dtype, max_shard_size=max_shard_size)


def prepare_output_dir(out_dir: str, *, overwrite: bool = False) -> None:
    """An output directory must be new or empty: files left by an earlier conversion (an old params.safetensors
    beside new shards, an old index) would make readers load the wrong weights. overwrite=True empties it first.
    Raises ValueError naming the directory and what is in it."""
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir} exists and is not a directory")
    entries = sorted(os.listdir(out_dir))
    if not entries:
        return
    if not overwrite:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ValueError(f"--out {out_dir} is not empty ({len(entries)} entries: {shown}): choose an empty or new "
                         "directory, or pass --overwrite (overwrite=True) to replace its contents")
    shutil.rmtree(out_dir)


def hf_to_checkpoint(hf_dir: str, out_dir: str, *, dtype: str | None = None, max_shard_size=None,
                     overwrite: bool = False):
    """transformers checkpoint -> grin_jax checkpoint (params.safetensors + model_config.json + hf_config.json).
    out_dir must be new or empty unless overwrite (prepare_output_dir)."""
    overrides = {} if dtype is None else {"param_dtype": dtype}
    config, flat, hf_config = read_hf_checkpoint(hf_dir, **overrides)
    prepare_output_dir(out_dir, overwrite=overwrite)
    save_checkpoint(out_dir, config, cast_flat(flat, dtype), hf_config=hf_config, max_shard_size=max_shard_size)
    return config


def checkpoint_to_hf(ckpt_dir: str, out_dir: str, *, layout: str = "5.x", dtype: str | None = None,
                     max_shard_size=None, overwrite: bool = False):
    """grin_jax checkpoint -> transformers checkpoint directory in `layout`. out_dir must be new or empty unless
    overwrite (prepare_output_dir)."""
    config, flat, hf_config = load_checkpoint(ckpt_dir)
    prepare_output_dir(out_dir, overwrite=overwrite)
    write_hf_checkpoint(out_dir, config, flat, layout=layout, base_hf_config=hf_config, dtype=dtype,
                        max_shard_size=max_shard_size)
    return config


__all__ = [
    "import_hf", "export_hf", "prepare_output_dir", "hf_to_checkpoint", "checkpoint_to_hf", "load_checkpoint", "save_checkpoint",
    "to_numpy_flat", "FAMILIES", "LAYOUTS", "family_of", "flat_from_hf_state", "hf_config_from_model_config",
    "hf_state_from_flat", "model_config_from_hf", "read_hf_checkpoint", "read_safetensors_dir",
    "write_hf_checkpoint", "write_safetensors_dir",
]
