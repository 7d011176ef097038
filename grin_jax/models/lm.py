"""The decoder-only language model (GRIN-MoE / PhiMoE, Mixtral-style, their dense baselines) and its pure
functional entry points.

Axes: B batch, S sequence, D model, V vocabulary, L layers (stacked aux), E experts.

    model = DecoderLM(config, rngs=nnx.Rngs(0))
    logits_BSV, aux = model(tokens_BS, training=False)

Pure (for a trainer):
    graphdef, params = init(config, jax.random.key(0))            # params: nnx.State of nnx.Param (+ BatchStat)
    logits_BSV, aux = apply(graphdef, params, tokens_BS, training=True, rng=key)
    loss = cross_entropy(logits_BSV, targets_BS) + aux['aux_loss']

Running statistics (model state). A model may own non-trainable variables besides its parameters: nnx.BatchStat,
today only PEER's query BatchNorm (ffn/peer.py). The functional API keeps one rule:
    - `init`, `abstract_init`, `apply`, `apply_with_cache`, `generate`, `trainer.load_trained` hold the model's
      *variables*: one nnx.State with its nnx.Param and, when it has some, its nnx.BatchStat (for every model
      without running statistics this is exactly the parameters, as before). Eval mode (training=False) reads the
      running statistics from there.
    - the train state keeps them apart (`split_variables`): state['params'] (what the optimizer sees) and
      state['model_state'] (the nnx.BatchStat; the key is absent for a model without any, so such a model's state,
      checkpoints and numbers are unchanged). The train step runs `apply_train`, which returns the running
      statistics updated by the forward pass (batch statistics of the non-padding tokens, token_mask_BS); they are
      saved in the checkpoints with the rest of the state, and `trainer.load_trained` returns
      `join_variables(params, model_state)` for evaluation and generation.
    - the running statistics are not parameters: params.count_params counts nnx.Param only.

aux (`combine_aux`): 'aux_loss' scalar (sum over FFN sections of loss weight * mean over the section's layers),
    'losses' {'<section>/<loss>': mean over the section's layers, unweighted, e.g. 'moe/load_balance_loss'},
    'metrics' {'<section>/<metric>': stacked over the section's layers, e.g. 'moe/expert_load' [Lm, E]},
    'sums' {'<section>/<name>': stacked over the section's layers, e.g. 'peer/router_score_mass' [Lp, N]}: the
    kinds' per-batch totals over the real tokens that evaluation adds up (empty for kinds without; grin_jax.ffn).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from grin_jax.models.config import ModelConfig
from grin_jax.nn.attention import init_kv_cache
from grin_jax.nn.block import DecoderBlock, remat_policy
from grin_jax.nn.layers import Dense, Embed, make_norm, param


class DecoderLM(nnx.Module):
    """Sub-modules (checkpoint names): embed, layers.{i} (mlp = the layer's FFN kind), final_norm, lm_head (untied) /
    lm_head_bias (tied + bias)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        pdt, dt, adt = jnp.dtype(c.param_dtype), jnp.dtype(c.dtype), jnp.dtype(c.activation_dtype)
        self.embed = Embed(c.vocab_size, c.d_model, param_dtype=pdt, dtype=adt, init_std=c.init_std, rngs=rngs)
        layers = []
        for i in range(c.num_layers):
            _, kind, ffn_config = c.layer_config(i)
            layers.append(DecoderBlock(
                d_model=c.d_model, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.resolved_head_dim,
                norm=c.norm, norm_eps=c.norm_eps, rope_theta=c.rope_theta, sliding_window=c.sliding_window,
                attention_bias=c.attention_bias, ffn_kind=kind, ffn_config=ffn_config, moa=c.moa,
                max_positions=c.max_seq_len, param_dtype=pdt, dtype=dt, activation_dtype=adt, rngs=rngs))
        self.layers = nnx.List(layers)
        self.final_norm = make_norm(c.norm, c.d_model, eps=c.norm_eps, param_dtype=pdt, dtype=dt)
        if c.tie_embeddings:
            self.lm_head = None
            self.lm_head_bias = param(jnp.zeros((c.vocab_size,), pdt), ("vocab",)) if c.lm_head_bias else None
        else:
            self.lm_head = Dense((c.d_model,), (c.vocab_size,), names=("embed", "vocab"), use_bias=c.lm_head_bias,
                                 param_dtype=pdt, dtype=dt, rngs=rngs, out_dtype=jnp.float32)
            self.lm_head_bias = None

    def __call__(self, tokens_BS: jax.Array, *, training: bool = False, rng=None, positions_BS=None,
                 segment_ids_BS=None, token_mask_BS=None):
        """tokens [B, S] int -> (logits [B, S, V] float32, aux)."""
        logits, aux, _ = self.forward(tokens_BS, training=training, rng=rng, positions_BS=positions_BS,
                                      segment_ids_BS=segment_ids_BS, token_mask_BS=token_mask_BS)
        return logits, aux

    def forward(self, tokens_BS, *, training=False, rng=None, positions_BS=None, segment_ids_BS=None, cache=None,
                cache_index=None, token_mask_BS=None, row_sinks=None, batch_stats=None):
        """The full forward: (logits [B, S, V] float32, aux, new cache or None).

        positions_BS: RoPE positions (default 0..S-1, or from cache_index); segment_ids_BS: packed documents (a
        query attends only to keys of its own segment). cache: a list with one {'k', 'v'} [B, L, G, K] dict per
        layer (init_cache); this call's tokens are written at slots cache_index .. cache_index + S - 1.
        token_mask_BS: non-zero for real tokens, 0 for padding (the train and eval steps pass the loss mask):
        reaches the FFN kinds that take it (batch statistics, metrics and sums over the real tokens only); None =
        every token.
        In training mode the model's running statistics (nnx.BatchStat) are updated in place.
        row_sinks: the row-sparse update's zeros {'layers.<i>.mlp.<table>': array} (row_sink_shapes,
        grin_jax/train/sparse_rows.py): each reaches its layer's FFN kind, which adds it to the table's gathered
        rows and reports the rows' ids; aux['row_ids'] = {same name: ids} then.
        batch_stats: gradient accumulation's whole-step statistics, one {'mlp': ..., 'attention': ...} per layer
        (the mean over the micro-batches of aux['batch_stats'], train/step.py); None: this batch's own.
        """
        c = self.config
        if tokens_BS.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tokens_BS.shape}")
        batch, seq = tokens_BS.shape
        if cache is None and seq > c.max_seq_len:
            raise ValueError(f"sequence length {seq} exceeds model.max_seq_len={c.max_seq_len}")
        if positions_BS is None:
            offset = 0 if cache_index is None else cache_index
            positions_BS = jnp.broadcast_to(offset + jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        if cache is not None and len(cache) != c.num_layers:
            raise ValueError(f"cache has {len(cache)} layers, the model {c.num_layers}")
        x_BSD = self.embed(tokens_BS)
        block_kw = dict(training=training, segment_ids_BS=segment_ids_BS, token_mask_BS=token_mask_BS)
        if c.scan_layers and cache is None:
            if row_sinks:
                raise ValueError("model.scan_layers=True does not support row-sparse table updates (PEER's "
                                 "table_update='sparse'): set model.scan_layers=False or peer.table_update='dense'")
            x_BSD, layer_aux = self._scanned_layers(x_BSD, positions_BS, rng, block_kw, batch_stats)
            new_cache, row_ids = [], {}
        else:
            layer_aux, new_cache, row_ids = [], [], {}
            for i, block in enumerate(self.layers):
                layer_rng = None if rng is None else jax.random.fold_in(rng, i)
                prefix = f"layers.{i}.mlp."
                sinks = {k[len(prefix):]: v for k, v in (row_sinks or {}).items() if k.startswith(prefix)}
                stats_i = None if batch_stats is None else batch_stats[i]
                if c.remat != "none" and cache is None and not sinks:
                    x_BSD, aux_i = self._remat_block(block, x_BSD, positions_BS, layer_rng, stats_i, block_kw)
                    cache_i = None
                else:
                    x_BSD, aux_i, cache_i = block(x_BSD, positions_BS, rng=layer_rng,
                                                  cache=None if cache is None else cache[i], cache_index=cache_index,
                                                  row_sinks=sinks or None, batch_stats=stats_i, **block_kw)
                row_ids.update({prefix + name: ids for name, ids in aux_i.pop("row_ids", {}).items()})
                layer_aux.append(aux_i)
                new_cache.append(cache_i)
        h_BSD = self.final_norm(x_BSD)
        if self.lm_head is not None:
            logits = self.lm_head(h_BSD)
        else:
            logits = self.embed.attend(h_BSD.astype(jnp.dtype(c.dtype)))
            if self.lm_head_bias is not None:
                logits = logits + self.lm_head_bias[...].astype(logits.dtype)
        aux = combine_aux(layer_aux, c)
        if row_ids:
            aux["row_ids"] = row_ids
        return logits.astype(jnp.float32), aux, (None if cache is None else new_cache)


    def _remat_block(self, block, x_BSD, positions_BS, layer_rng, layer_stats, block_kw):
        """One block under jax.checkpoint with model.remat's policy: (x, aux); its running statistics (if any) are
        written back to the block."""
        graphdef, state = nnx.split(block)
        x_BSD, aux, stats = _checkpointed(_call_block, self.config, prevent_cse=True)(
            graphdef, state, x_BSD, positions_BS, layer_rng, layer_stats, block_kw)
        nnx.update(block, stats)
        return x_BSD, aux

    def _scanned_layers(self, x_BSD, positions_BS, rng, block_kw, batch_stats=None):
        """The layers as one lax.scan over G = num_layers / P repeats of the layout's period P (`scan_period`):
        each step runs P blocks whose variables are the step's slice of the stacked [G, ...] variables of
        layers p, p + P, p + 2P, ... (stacked here, under jit: one extra copy of the layer variables). Layer i
        draws fold_in(rng, i) as in the loop, so the numbers equal the unrolled model's. Returns (x, the per-layer
        aux in layer order)."""
        c = self.config
        period = scan_period(self)
        groups = c.num_layers // period
        blocks = list(self.layers)
        graphdefs, stacked, stacked_stats = [], [], []

        def stack(trees):
            return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)

        for p in range(period):
            splits = [nnx.split(blocks[g * period + p]) for g in range(groups)]
            graphdefs.append(splits[0][0])
            stacked.append(stack([state for _, state in splits]))
            stacked_stats.append(None if batch_stats is None
                                 else stack([batch_stats[g * period + p] for g in range(groups)]))
        call = _checkpointed(_call_block, c, prevent_cse=False) if c.remat != "none" else _call_block

        def step(x_BSD, xs):
            g, states, layer_stats = xs
            auxes, stats = [], []
            for p in range(period):
                i = g * period + p
                layer_rng = None if rng is None else jax.random.fold_in(rng, i)
                x_BSD, aux, stat = call(graphdefs[p], states[p], x_BSD, positions_BS, layer_rng, layer_stats[p],
                                        block_kw)
                auxes.append(aux)
                stats.append(stat)
            return x_BSD, (auxes, stats)

        x_BSD, (auxes, stats) = jax.lax.scan(step, x_BSD, (jnp.arange(groups), stacked, stacked_stats))
        layer_aux = [None] * c.num_layers
        for p in range(period):
            for g in range(groups):
                index = g * period + p
                layer_aux[index] = jax.tree.map(lambda a: a[g], auxes[p])
                if jax.tree.leaves(stats[p]):
                    nnx.update(blocks[index], jax.tree.map(lambda a: a[g], stats[p]))
        return x_BSD, layer_aux


def _call_block(graphdef, state, x_BSD, positions_BS, layer_rng, layer_stats, block_kw):
    """A block from its variables, applied: (x, aux, its running statistics after the call: nnx.BatchStat)."""
    block = nnx.merge(graphdef, state)
    x_BSD, aux, _ = block(x_BSD, positions_BS, rng=layer_rng, batch_stats=layer_stats, **block_kw)
    return x_BSD, aux, nnx.state(block, nnx.BatchStat)


def _checkpointed(fn, config: ModelConfig, *, prevent_cse: bool):
    """fn under jax.checkpoint with model.remat's policy; graphdef (argument 0) and block_kw's flags static."""
    policy = remat_policy(config.remat, config.remat_names)

    def wrapped(graphdef, state, x_BSD, positions_BS, layer_rng, layer_stats, block_kw):
        arrays = {k: v for k, v in block_kw.items() if k != "training"}

        def inner(state, x_BSD, positions_BS, layer_rng, layer_stats, arrays):
            return fn(graphdef, state, x_BSD, positions_BS, layer_rng, layer_stats,
                      {**arrays, "training": block_kw["training"]})

        return jax.checkpoint(inner, policy=policy, prevent_cse=prevent_cse)(state, x_BSD, positions_BS, layer_rng,
                                                                             layer_stats, arrays)

    return wrapped


def scan_period(model: "DecoderLM") -> int:
    """The smallest P dividing num_layers such that layer i and layer i mod P have the same structure (graphdef:
    FFN kind and settings): the scan's step runs P layers. P = num_layers (one step) when nothing repeats."""
    graphdefs = [nnx.split(block)[0] for block in model.layers]
    count = len(graphdefs)
    return next(p for p in range(1, count + 1)
                if count % p == 0 and all(graphdefs[i] == graphdefs[i % p] for i in range(count)))


def combine_aux(layer_aux: list, config: ModelConfig) -> dict:
    """The layers' FFN aux (and, with model.moa, the attention experts' aux under 'attention', reported as the
    section 'moa') -> {'aux_loss': sum over sections and losses of weight * mean over the section's layers,
    'losses': {'<section>/<loss>': mean over the section's layers (unweighted)},
    'metrics': {'<section>/<metric>': stacked over the section's layers, in layer order},
    'sums': {'<section>/<name>': the kinds' aux['sums'] (when they have some), stacked likewise},
    'batch_stats': one {'mlp': the FFN kind's aux['batch_stats'], 'attention': the attention experts'} per layer
    ({} for those without: gradient accumulation's whole-step statistics, train/step.py)}."""
    losses, metrics, sums = {}, {}, {}
    aux_loss = jnp.float32(0.0)
    ffn_aux = [{k: v for k, v in aux.items() if k != "attention"} for aux in layer_aux]
    groups = [(name, section, [ffn_aux[i] for i in config.layers_of(name)]) for name, section in config.sections]
    if config.moa is not None:  # the attention experts of every layer (nn/moa.py): reported as the section 'moa'
        groups.append(("moa", config.moa, [aux["attention"] for aux in layer_aux]))
    for name, section, section_aux in groups:
        if not section_aux:
            continue
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *section_aux)
        weights = section.loss_weights
        for loss_name, values in stacked["losses"].items():
            mean = jnp.mean(values.astype(jnp.float32))
            losses[f"{name}/{loss_name}"] = mean
            aux_loss = aux_loss + weights.get(loss_name, 0.0) * mean
        metrics.update({f"{name}/{k}": v for k, v in stacked["metrics"].items()})
        sums.update({f"{name}/{k}": v for k, v in stacked.get("sums", {}).items()})
    batch_stats = [{"mlp": aux.get("batch_stats", {}), "attention": aux.get("attention", {}).get("batch_stats", {})}
                   for aux in layer_aux]
    return {"aux_loss": aux_loss.astype(jnp.float32), "losses": losses, "metrics": metrics, "sums": sums,
            "batch_stats": batch_stats}


# ------------------------------------------------------------------------------------------- functional API
def _key(rng):
    return jax.random.key(rng) if isinstance(rng, int) else rng


# The model's variables in the functional API: its parameters and its running statistics (module docstring).
VARIABLES = (nnx.Param, nnx.BatchStat)


def split_variables(variables):
    """The model's variables -> (params: nnx.State of nnx.Param, model_state: nnx.State of nnx.BatchStat, empty
    (falsy) for a model without running statistics)."""
    return nnx.split_state(variables, nnx.Param, nnx.BatchStat)


def join_variables(params, model_state=None):
    """(params, model_state) -> the model's variables (params itself when model_state is None or empty)."""
    if not model_state:
        return params
    return nnx.merge_state(params, model_state)


def init(config: ModelConfig, rng=0):
    """Build the model; returns (graphdef, params) with params an nnx.State of the model's variables: its
    nnx.Param, plus its nnx.BatchStat running statistics when it has some (split_variables separates them; for a
    model without any, params holds exactly the nnx.Param). Logical names in each variable's metadata:
    nnx.get_partition_spec(params).

    Runs eagerly: every initialiser is compiled once per shape and cached for the rest of the process (a jitted
    init recompiles them for every new config, seconds on CPU). For sharded creation of a large model use
    `abstract_init` and jit the construction with out_shardings (a later sharding module)."""
    model = DecoderLM(config, rngs=nnx.Rngs(params=_key(rng)))
    return nnx.split(model, VARIABLES)


def abstract_init(config: ModelConfig):
    """(graphdef, the model's variables as ShapeDtypeStructs, as `init`): nothing is allocated (jax.eval_shape via
    nnx.eval_shape)."""
    model = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(params=0)))
    return nnx.split(model, VARIABLES)


def _merge(graphdef, variables):
    """The model from its variables. copy=True: new nnx.Variable objects, so that a training-mode forward updates
    the running statistics of this copy only (never the caller's state, which may live at another trace level)."""
    try:
        return nnx.merge(graphdef, variables, copy=True)
    except ValueError as error:
        if "number of leaves" not in str(error):
            raise
        raise ValueError(f"the variables do not match the model ({error}): a model with running statistics "
                         "(nnx.BatchStat, e.g. PEER's query BatchNorm) needs them with its parameters, "
                         "join_variables(params, model_state)") from None


def apply(graphdef, params, tokens_BS, *, training: bool = False, rng=None, positions_BS=None, segment_ids_BS=None,
          token_mask_BS=None):
    """Pure forward: (logits [B, S, V] float32, aux). params: the model's variables (init; running statistics
    included). training=True uses batch statistics, and their updates are dropped (apply_train returns them). Jit
    with `static_argnames=('graphdef', 'training')` or close over graphdef."""
    model = _merge(graphdef, params)
    return model(tokens_BS, training=training, rng=rng, positions_BS=positions_BS, segment_ids_BS=segment_ids_BS,
                 token_mask_BS=token_mask_BS)


def apply_train(graphdef, params, model_state, tokens_BS, *, rng=None, positions_BS=None, segment_ids_BS=None,
                token_mask_BS=None, row_sinks=None, batch_stats=None):
    """The training forward: (logits [B, S, V] float32, aux, the updated model_state). params: nnx.State of
    nnx.Param; model_state: the running statistics (split_variables; None or empty for a model without any). The
    running statistics come back updated from this batch's statistics over the tokens with a non-zero
    token_mask_BS (None: all); differentiate with respect to params only (and row_sinks: the row-sparse update,
    Model.forward). batch_stats: gradient accumulation's whole-step statistics (Model.forward)."""
    model = _merge(graphdef, join_variables(params, model_state))
    logits, aux, _ = model.forward(tokens_BS, training=True, rng=rng, positions_BS=positions_BS,
                                   segment_ids_BS=segment_ids_BS, token_mask_BS=token_mask_BS, row_sinks=row_sinks,
                                   batch_stats=batch_stats)
    new_state = nnx.state(model, nnx.BatchStat) if model_state else model_state
    return logits, aux, new_state


def row_sink_shapes(graphdef, params, tokens: int) -> dict:
    """{'layers.<i>.mlp.<table>': ShapeDtypeStruct} of the row-sparse update's sinks for a batch of `tokens` tokens:
    one per table of the FFN kinds that update theirs row-sparsely (their `row_sink_shapes(tokens)`, e.g. PEER with
    table_update='sparse'); {} for every other model (grin_jax/train/sparse_rows.py)."""
    model = _merge(graphdef, params)
    shapes = {}
    for i, block in enumerate(model.layers):
        if hasattr(block.mlp, "row_sink_shapes"):
            shapes.update({f"layers.{i}.mlp.{name}": s for name, s in block.mlp.row_sink_shapes(tokens).items()})
    return shapes


apply_jit = jax.jit(apply, static_argnames=("graphdef", "training"))
apply_jit.__doc__ = "`apply` under jax.jit (graphdef and training static)."


def apply_with_cache(graphdef, params, tokens_BS, cache, cache_index, *, positions_BS=None):
    """Inference forward with a KV cache (eval mode: running statistics from params, the model's variables):
    (logits [B, S, V], aux, new cache)."""
    model = _merge(graphdef, params)
    return model.forward(tokens_BS, training=False, cache=cache, cache_index=cache_index, positions_BS=positions_BS)


def init_cache(config: ModelConfig, batch: int, max_len: int | None = None, dtype=None) -> list:
    """A KV cache for all layers: a list of {'k', 'v'}: [B, max_len, num_kv_heads, head_dim] zeros."""
    max_len = config.max_seq_len if max_len is None else max_len
    if max_len > config.max_seq_len:
        raise ValueError(f"cache length {max_len} exceeds ModelConfig.max_seq_len={config.max_seq_len}")
    dtype = jnp.dtype(config.dtype) if dtype is None else dtype
    return [init_kv_cache(batch, max_len, config.num_kv_heads, config.resolved_head_dim, dtype)
            for _ in range(config.num_layers)]


def cross_entropy(logits_BSV: jax.Array, targets_BS: jax.Array, mask_BS=None) -> jax.Array:
    """Mean next-token cross-entropy in float32 (mask: 1 = counted)."""
    logp = jax.nn.log_softmax(logits_BSV.astype(jnp.float32), axis=-1)
    nll_BS = -jnp.take_along_axis(logp, targets_BS[..., None], axis=-1)[..., 0]
    if mask_BS is None:
        return jnp.mean(nll_BS)
    mask_BS = mask_BS.astype(jnp.float32)
    return jnp.sum(nll_BS * mask_BS) / jnp.maximum(jnp.sum(mask_BS), 1.0)


def flatten_params(params) -> dict:
    """nnx.State -> {'layers.0.attn.q.kernel': array, ...} (the checkpoint / conversion naming; the running
    statistics too when the state holds them, e.g. 'layers.1.mlp.query_norm.mean')."""
    flat = {}
    for path, leaf in nnx.to_flat_state(params):
        value = leaf.get_value() if hasattr(leaf, "get_value") else leaf
        flat[".".join(str(p) for p in path)] = value
    return flat


def unflatten_params(config: ModelConfig, flat: dict, *, dtype=None):
    """{'name': array} -> (graphdef, params) for `config` (the model's variables, running statistics included);
    checks names and shapes against the abstract model.
    Arrays are cast to the config's param_dtype (or `dtype`)."""
    graphdef, abstract = abstract_init(config)
    expected = flatten_params(abstract)
    missing, unexpected = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
    if missing or unexpected:
        raise ValueError(f"parameters do not match the model: missing {missing[:8]}{'...' if len(missing) > 8 else ''}"
                         f", unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    target_dtype = jnp.dtype(dtype or config.param_dtype)
    statistics = set(flatten_params(split_variables(abstract)[1]))  # running statistics keep their own dtype
    pure = {}
    for name, spec in expected.items():
        value = flat[name]
        if tuple(value.shape) != tuple(spec.shape):
            raise ValueError(f"parameter {name}: shape {tuple(value.shape)}, the model expects {tuple(spec.shape)}")
        node = pure
        keys = [int(k) if k.isdigit() else k for k in name.split(".")]
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = jnp.asarray(value, dtype=spec.dtype if name in statistics else target_dtype)
    nnx.replace_by_pure_dict(abstract, pure)
    return graphdef, abstract
