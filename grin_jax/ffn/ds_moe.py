"""The DS-MoE FFN kind: dense training, sparse inference (Pan et al., "Dense Training, Sparse Inference: Rethinking
Training of Mixture-of-Experts Language Models", arXiv 2404.05567). Method, choices and what is not built:
docs/ds_moe.md.

Axes: B batch, S sequence, T = B*S tokens, D model, N experts, F expert hidden (d_hidden), K inference slots.

    router:     S = softmax(x W_router) in float32                               [T, N]
    expert i:   e_i(x) = (act(x W_gate[i]) * x W_up[i]) W_down[i]  (gated)  or  act(x W_up[i]) W_down[i]
    training (and inference='dense'):  y = sum_i S_i e_i(x)  for every expert on every token, full gradient.
        Computed at dense-FFN cost as ONE matmul pair of width N*F: h = act(x W_gate_all) * (x W_up_all) [T, N*F],
        block i of the hidden units scaled by S_i, then h W_down_all (contracting N and F). No gather.
    sparse inference (training=False, inference != 'dense'), the same checkpoint:
        top_k:      the K = inference_top_k largest S_i, weights S_i (NOT renormalised)
        threshold:  expert i kept when N * S_i > inference_threshold, weight S_i; at most K = inference_top_k slots
                    (static shapes): the top-K are taken and those at or under the threshold get weight 0. Exact
                    when no token passes the threshold with more than K experts; metric 'threshold_overflow' is the
                    fraction of tokens for which it was not. inference_top_k = num_experts makes it exact always.
        only the K selected experts per token are computed, through grin_jax.moe.dispatch.moe_ffn (`backend`).
    aux loss:   'mutual_information' L_MI = -H(mean_t S_t) + mean_t H(S_t) (moe.losses.mutual_information_loss),
                weighted by mi_coef. In [-log N, 0]. The means are over the real tokens (token_mask_BS, the
                batch's loss mask: takes_token_mask) of the whole batch: under jit on a data-sharded batch, the
                global batch.

Parameters (the `moe` kind's layout, so dispatch takes them as they are):
    router [D, N] ('embed', 'experts'); w_gate, w_up [N, D, F] ('experts', 'embed', 'mlp'); w_down [N, F, D]
    ('experts', 'mlp', 'embed'). Fan-in scaled normal init (experts.init_expert_params; router N(0, 1/D)).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grin_jax import sections as _sections
from grin_jax.ffn import register_ffn
from grin_jax.moe import dispatch as _dispatch
from grin_jax.moe import experts as _experts
from grin_jax.moe import losses as _losses
from grin_jax.nn.layers import normal_init, param

INFERENCE_MODES = ("dense", "top_k", "threshold")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DSMoEConfig:
    """DS-MoE options.

    num_experts: N (paper: 32 MLP experts).
    d_hidden: F, each expert's width; None = 4 * d_model / N (the experts together are parameter-matched to a dense
      FFN of width 4 * d_model, the `dense` kind's default), which must then divide evenly.
    activation: experts.ACTIVATIONS ('swiglu' default, as the dense kind).
    mi_coef: alpha, the weight of the mutual-information loss (paper 2e-4 .. 6.3e-4 at 1-6B; tiny models need more).
    inference: what the layer computes when training=False: 'dense' (every expert, as in training), 'top_k' or
      'threshold' (see the module docstring). Chosen at apply time: change it on a trained model's config.
    inference_top_k: K, the slots per token of the sparse modes (1..N).
    inference_threshold: epsilon of 'threshold' (keep expert i when N * S_i > epsilon; >= 0).
    backend: the dispatch backend of the sparse modes (grin_jax.moe.dispatch.BACKENDS; 'auto' by platform).
    """

    d_model: int
    num_experts: int = 8
    d_hidden: int | None = None
    activation: str = "swiglu"
    mi_coef: float = 5e-4
    inference: str = "dense"
    inference_top_k: int = 2
    inference_threshold: float = 1.0
    backend: str = "auto"

    def __post_init__(self):
        def fail(name, accepted):
            raise ValueError(f"ds_moe.{name}={getattr(self, name)!r} is invalid: accepted values are {accepted}")

        N = self.num_experts
        if not _is_int(N) or N < 1:
            fail("num_experts", "integers >= 1")
        if self.d_hidden is None:
            if (4 * self.d_model) % N:
                raise ValueError(f"ds_moe.d_hidden=None needs num_experts={N} to divide 4 * d_model = "
                                 f"{4 * self.d_model}: set ds_moe.d_hidden (integers >= 1)")
            object.__setattr__(self, "d_hidden", 4 * self.d_model // N)
        if not _is_int(self.d_hidden) or self.d_hidden < 1:
            fail("d_hidden", "None (4 * d_model / num_experts) or integers >= 1")
        if self.activation not in _experts.ACTIVATIONS:
            fail("activation", sorted(_experts.ACTIVATIONS))
        if (isinstance(self.mi_coef, bool) or not isinstance(self.mi_coef, (int, float))
                or not 0 <= self.mi_coef < math.inf):
            fail("mi_coef", "finite numbers >= 0")
        if self.inference not in INFERENCE_MODES:
            fail("inference", list(INFERENCE_MODES))
        if not _is_int(self.inference_top_k) or not 1 <= self.inference_top_k <= N:
            fail("inference_top_k", f"integers 1..num_experts={N}")
        if (isinstance(self.inference_threshold, bool) or not isinstance(self.inference_threshold, (int, float))
                or not 0 <= self.inference_threshold < math.inf):
            fail("inference_threshold", "finite numbers >= 0")
        if self.backend not in _dispatch.BACKENDS:
            fail("backend", list(_dispatch.BACKENDS))

    @classmethod
    def from_section(cls, values, *, d_model: int) -> "DSMoEConfig":
        return _sections.from_section(cls, values, d_model=d_model, section="ds_moe")

    def to_section(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "d_model"}

    @property
    def loss_weights(self) -> dict:
        return {"mutual_information": self.mi_coef}


# ------------------------------------------------------------------------------------------------ computation
def dense_mixture(experts: dict, x_TD: jax.Array, scores_TN: jax.Array, *, activation: str) -> jax.Array:
    """sum_i S_i e_i(x) [T, D] as one dense FFN of width N*F whose hidden block i is scaled by S_i: the expert
    matrices flattened to [D, N*F] (w_gate, w_up) and [N*F, D] (w_down), so each product is one plain matmul (XLA
    on CPU runs the [T, N, F] einsum form ~1.5x slower in fwd+bwd); no gather, no [N, T, D] intermediate."""
    act = _experts.get_activation(activation)
    num_tokens = x_TD.shape[0]
    num_experts, d_model, d_hidden = experts["w_up"].shape

    def flat_in(w_NDF):
        return w_NDF.transpose(1, 0, 2).reshape(d_model, num_experts * d_hidden)

    up_TH = x_TD @ flat_in(experts["w_up"])
    h_TH = act.fn(x_TD @ flat_in(experts["w_gate"])) * up_TH if act.gated else act.fn(up_TH)
    h_TNF = h_TH.reshape(num_tokens, num_experts, d_hidden) * scores_TN.astype(h_TH.dtype)[:, :, None]
    return h_TNF.reshape(num_tokens, num_experts * d_hidden) @ experts["w_down"].reshape(-1, d_model)


def sparse_selection(scores_TN: jax.Array, *, mode: str, top_k: int, threshold: float):
    """(expert ids [T, K] int32, weights [T, K] float32 = the selected S_i, not renormalised; 0 for the slots
    a threshold dropped)."""
    num_experts = scores_TN.shape[-1]
    values, ids = jax.lax.top_k(scores_TN, top_k)
    if mode == "threshold":
        values = jnp.where(num_experts * values > threshold, values, 0.0)
    elif mode != "top_k":
        raise ValueError(f"ds_moe.inference={mode!r} has no sparse selection: accepted values are "
                         "['top_k', 'threshold']")
    return ids.astype(jnp.int32), values


def routing_metrics(scores_TN: jax.Array, weights_TK: jax.Array | None, *, threshold: float,
                    slots: int, mask_T: jax.Array | None = None) -> dict:
    """Means over the real tokens (mask_T [T] > 0; every token when mask_T is None; 0 when every token is masked,
    but for the dense mode's constant active_fraction), no gradient:
    active_fraction: the mean of (experts with nonzero weight) / N (1 in the dense mode, weights_TK None);
    router_entropy: mean_t H(S_t); expert_load [N]: mean_t S_t (the p of H(e), the soft load: every expert runs on
    every token in training; named expert_load so the trainer logs it per layer and plots it, as the moe kind's);
    threshold_active: the mean count of experts with N * S_i > inference_threshold (what threshold-top-K would use
    as K, in every mode); threshold_overflow: the fraction of tokens with more such experts than the `slots` of the
    sparse modes (the tokens on which 'threshold' is not exact)."""
    s = jax.lax.stop_gradient(scores_TN.astype(jnp.float32))
    num_tokens, num_experts = s.shape
    if mask_T is None:
        w_T = jnp.ones((num_tokens,), jnp.float32)
    else:
        w_T = (mask_T.reshape(num_tokens) > 0).astype(jnp.float32)
    count = jnp.maximum(jnp.sum(w_T), 1.0)

    def mean(x_T):  # over the real tokens, along the first axis (elementwise: no matmul precision)
        return jnp.sum(w_T.reshape((num_tokens,) + (1,) * (x_T.ndim - 1)) * x_T, axis=0) / count

    entropy = -jnp.sum(s * jnp.log(jnp.clip(s, 1e-30, 1.0)), axis=-1)
    passing = jnp.sum((num_experts * s > threshold).astype(jnp.float32), axis=-1)
    if weights_TK is None:
        active = jnp.float32(1.0)
    else:
        active = mean(jnp.sum((weights_TK != 0).astype(jnp.float32), axis=-1)) / num_experts
    return {"active_fraction": active, "router_entropy": mean(entropy), "expert_load": mean(s),
            "threshold_active": mean(passing), "threshold_overflow": mean((passing > slots).astype(jnp.float32))}


def routing_sums(scores_TN: jax.Array, weights_TK: jax.Array | None, *, threshold: float,
                 mask_T: jax.Array | None = None) -> dict:
    """Per-batch totals over the real tokens that evaluation adds up over the evaluation set (aux['sums'],
    grin_jax.ffn): 'tokens', 'active_experts' (the experts with a nonzero weight, N per token in the dense mode),
    'threshold_experts' (the experts with N * S_i > threshold), 'score_mass' [N] (sum of S_t)."""
    s = jax.lax.stop_gradient(scores_TN.astype(jnp.float32))
    num_tokens, num_experts = s.shape
    w_T = jnp.ones((num_tokens,), jnp.float32) if mask_T is None else (mask_T.reshape(num_tokens) > 0).astype(
        jnp.float32)
    if weights_TK is None:
        active_T = jnp.full((num_tokens,), float(num_experts), jnp.float32)
    else:
        active_T = jnp.sum((weights_TK != 0).astype(jnp.float32), axis=-1)
    passing_T = jnp.sum((num_experts * s > threshold).astype(jnp.float32), axis=-1)
    return {"tokens": jnp.sum(w_T), "active_experts": jnp.sum(w_T * active_T),
            "threshold_experts": jnp.sum(w_T * passing_T), "score_mass": jnp.sum(w_T[:, None] * s, axis=0)}


def eval_metrics_from_sums(sums: dict) -> dict:
    """The evaluation metrics of a section's layers from routing_sums added up over the evaluation set (each
    [L, ...], stacked over the section's L layers): 'active_fraction' and 'threshold_active' (mean over the
    layers) and their '_per_layer' lists (layer order; None where no real token was evaluated)."""
    tokens = np.asarray(sums["tokens"], np.float64)
    num_experts = np.asarray(sums["score_mass"]).shape[-1]
    out = {}
    for name, key, scale in (("active_fraction", "active_experts", num_experts),
                             ("threshold_active", "threshold_experts", 1)):
        values = [float(v / (t * scale)) if t > 0 else None
                  for v, t in zip(np.asarray(sums[key], np.float64), tokens)]
        known = [v for v in values if v is not None]
        out[name] = float(np.mean(known)) if known else None
        out[f"{name}_per_layer"] = values
    return out


# ------------------------------------------------------------------------------------------------ the kind
@register_ffn("ds_moe")
class DSMoEFFN(nnx.Module):
    Config = DSMoEConfig
    takes_token_mask = True  # __call__ accepts token_mask_BS: the MI loss and the metrics skip padding
    takes_batch_stats = True  # the MI loss's batch-mean usage over a whole accumulated step (grin_jax.ffn)

    def __init__(self, config: DSMoEConfig, *, norm: str = "layernorm", norm_eps: float = 1e-5,
                 param_dtype=jnp.float32, dtype=jnp.float32, rngs: nnx.Rngs):
        del norm, norm_eps  # no norm of its own
        c = config
        self.config = c
        self.router = param(normal_init(rngs.params(), (c.d_model, c.num_experts), param_dtype, c.d_model ** -0.5),
                            ("embed", "experts"))
        p = _experts.init_expert_params(rngs.params(), num_experts=c.num_experts, d_model=c.d_model,
                                        d_hidden=c.d_hidden, activation=c.activation, dtype=param_dtype)
        self.w_up = param(p["w_up"], ("experts", "embed", "mlp"))
        self.w_gate = param(p["w_gate"], ("experts", "embed", "mlp")) if "w_gate" in p else None
        self.w_down = param(p["w_down"], ("experts", "mlp", "embed"))
        self.dtype = dtype

    def expert_params(self) -> dict:
        experts = {"w_up": self.w_up[...].astype(self.dtype), "w_down": self.w_down[...].astype(self.dtype)}
        if self.w_gate is not None:
            experts["w_gate"] = self.w_gate[...].astype(self.dtype)
        return experts

    def scores(self, x_TD: jax.Array) -> jax.Array:
        """S = softmax(x W_router) [T, N], float32."""
        logits = jnp.dot(x_TD.astype(jnp.float32), self.router[...].astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
        return jax.nn.softmax(logits, axis=-1)

    def __call__(self, x_BSD: jax.Array, *, training: bool = False, rng=None, token_mask_BS=None,
                 batch_stats: dict | None = None):
        """(y [B, S, D], aux {'losses': {'mutual_information'}, 'metrics': {'active_fraction', 'router_entropy',
        'expert_load' [N], 'threshold_active', 'threshold_overflow'}}).
        token_mask_BS [B, S]: non-zero (> 0) for the real tokens, 0 for padding (None: every token is real); the
        model passes the batch's loss mask (the train and eval steps). Only the real tokens count in the MI loss
        (value and gradient) and in the metrics; y is computed for every token (per token, so padding changes no
        real token's output). batch_stats: the whole step's MI statistics under gradient accumulation
        (moe.losses.mutual_information_loss), else None; aux['batch_stats'] holds this batch's."""
        del rng
        c = self.config
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D).astype(self.dtype)
        mask_T = None if token_mask_BS is None else token_mask_BS.reshape(B * S)
        s_TN = self.scores(x_TD)
        if training or c.inference == "dense":
            y_TD = dense_mixture(self.expert_params(), x_TD, s_TN, activation=c.activation)
            weights = None
        else:
            ids, weights = sparse_selection(s_TN, mode=c.inference, top_k=c.inference_top_k,
                                            threshold=c.inference_threshold)
            y_TD, _ = _dispatch.moe_ffn(self.expert_params(), x_TD, ids, weights.astype(self.dtype),
                                        activation=c.activation, backend=c.backend)
        metrics = routing_metrics(s_TN, weights, threshold=c.inference_threshold, slots=c.inference_top_k,
                                  mask_T=mask_T)
        losses = {"mutual_information": _losses.mutual_information_loss(s_TN, mask_T, batch_stats)}
        sums = routing_sums(s_TN, weights, threshold=c.inference_threshold, mask_T=mask_T)
        return y_TD.reshape(B, S, D).astype(x_BSD.dtype), {
            "losses": losses, "metrics": metrics, "sums": sums,
            "batch_stats": _losses.mutual_information_statistics(s_TN, mask_T)}

    eval_metrics = staticmethod(eval_metrics_from_sums)

    @staticmethod
    def param_counts(config: DSMoEConfig) -> dict:
        """experts: all N experts, total = active per token, since training runs every expert on every token (the
        FLOP accounting is that of training). At inference the active expert parameters depend on the sparsity
        setting (top-K: K / N of them; threshold: the data-dependent 'active_fraction' metric); not counted here.
        router: D * N, all active."""
        matrices = 3 if _experts.get_activation(config.activation).gated else 2
        experts = config.num_experts * matrices * config.d_model * config.d_hidden
        router = config.d_model * config.num_experts
        return {"experts": (experts, experts), "router": (router, router)}

    @staticmethod
    def check_mesh(config: DSMoEConfig, sizes: dict) -> None:
        """The experts are sharded over the 'expert' axis (N) and their width over 'model' (F), per the logical
        axis rules; both must divide."""
        expert, model = sizes.get("expert", 1), sizes.get("model", 1)
        if config.num_experts % expert:
            raise ValueError(f"ds_moe.num_experts={config.num_experts} is not divisible by mesh.expert={expert}: "
                             "the experts are sharded over the expert axis")
        if config.d_hidden % model:
            raise ValueError(f"ds_moe.d_hidden={config.d_hidden} is not divisible by mesh.model={model}: the "
                             "expert width is sharded over the model axis")
