"""FFN kinds: the feed-forward layer of a decoder block, one registry entry per kind.

A kind is an `nnx.Module` class registered under a name (`register_ffn`) with this contract:

    Config                          a frozen dataclass, validated in __post_init__, with
                                    `from_section(values, *, d_model)` (unknown keys raise naming the accepted
                                    ones) and `to_section()` (the inverse); `loss_weights` {loss name: weight}.
    Kind(config, *, norm, norm_eps, param_dtype, dtype, rngs)
                                    owns its parameters as nnx.Param with logical axis names (nn/layers.param).
    kind(x_BSD, *, training, rng) -> (y_BSD, aux)
                                    aux = {'losses': {name: scalar, unweighted}, 'metrics': {name: array}}; the
                                    model weighs the losses with config.loss_weights and sums them; the trainer
                                    logs every metric under '<section>/<name>' without knowing the kind.
    takes_token_mask = True         (optional) kind(x_BSD, *, training, rng, token_mask_BS) also receives the batch's
                                    token mask [B, S] (non-zero = a real token, 0 = padding) when the model has one
                                    (the train step passes its loss mask), e.g. for statistics over the tokens
                                    (PEER's query BatchNorm). Kinds without the attribute never receive it.
    takes_batch_stats = True        (optional) the kind's aux loss needs statistics of the whole batch (the MoE load
                                    balance's expert load, DS-MoE's batch-mean usage): its aux['batch_stats']
                                    {name: array} holds this batch's, defined so that their mean over the equal-sized
                                    micro-batches of an accumulated step is what it needs of the whole step; the
                                    train step (grad_accum_steps > 1) gives that mean back as kind(..., batch_stats=)
                                    in the gradient pass, where the kind computes a loss whose mean over the
                                    micro-batches equals the whole batch's, value and gradient (train/step.py).
    aux['sums'] (optional)          {name: array}: per-batch totals over the batch's real tokens (token_mask_BS)
                                    that evaluation adds up over the evaluation set, e.g. PEER's router score mass
                                    per expert; the model stacks them as '<section>/<name>' [L, ...] and the eval
                                    step returns them (train/step.py make_eval_step).
    Kind.eval_metrics(sums) -> dict (with aux['sums']) the section's evaluation metrics {name: float or list} from its
                                    sums over the evaluation set ({name: numpy [L, ...]}, float64); reported as
                                    '<section>/<name>' by grin_jax.train.evaluate (eval/ records, summary.json).
    Non-trainable state             a kind may own nnx.BatchStat variables (running statistics, updated in place
                                    when training=True): the train state carries them as state['model_state'],
                                    apart from the parameters (models/lm.py).
    Kind.param_counts(config) -> {component: (total, active per token)}
                                    what params.py and the FLOP accounting ask for (components: 'dense_ffn',
                                    'experts', 'router', 'norms', or a kind's own).
    Kind.check_mesh(config, sizes)  raise ValueError naming the key when the kind cannot be laid out on a mesh of
                                    these axis sizes {'data': n, 'fsdp': n, 'expert': n, 'model': n} (and 'platform': 'cpu' | 'gpu' | ...).

The model config names a section per kind (`model.moe`, `model.dense`, ...) and a per-layer `layout` of section
names; a section's kind is its `kind` key, else its own name. See docs/architecture.md#ffn-kinds and
tests/test_seam.py (a kind and a router defined inside a test file).
"""

from __future__ import annotations

FFN_KINDS: dict[str, type] = {}


def register_ffn(name: str):
    """Class decorator: register an FFN kind under `name`."""
    def register(cls):
        for attr in ("Config", "param_counts", "check_mesh"):
            if not hasattr(cls, attr):
                raise TypeError(f"FFN kind {name!r}: {cls.__name__} has no {attr!r} (see grin_jax.ffn)")
        FFN_KINDS[name] = cls
        return cls
    return register


def get_ffn(name: str) -> type:
    _load_builtin_kinds()
    if name not in FFN_KINDS:
        raise ValueError(f"FFN kind {name!r} is unknown: accepted kinds are {sorted(FFN_KINDS)}")
    return FFN_KINDS[name]


def known_kinds() -> list[str]:
    _load_builtin_kinds()
    return sorted(FFN_KINDS)


def _load_builtin_kinds() -> None:
    from grin_jax.ffn import dense, ds_moe, moe, peer  # noqa: F401  (registering imports)
