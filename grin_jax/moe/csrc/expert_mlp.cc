// Fused dropless expert MLP for CPU, as two XLA FFI handlers (forward, backward). Built and loaded by
// grin_jax/moe/cpu_kernel.py (g++ -O3 -march=native -fopenmp -fno-math-errno; OpenBLAS from the
// scipy-openblas32 wheel; glibc's libmvec for the vectorised expf / erff).
//
// Axes: T tokens, K slots per token, M = T*K token-slots, E experts, D model, F expert hidden,
// Fi = 2F (gated: pre-activations [gate | up]) or F, R rows of a chunk (<= kChunkRows).
//
//   y[t] = sum_k weights[t, k] * W_out[e] . act(W_in[e] . x[t]),   e = expert_ids[t, k]
//
// Every call counting-sorts the token-slots by expert (stable, slot order t*K + k): the rows of expert e are the
// sorted rows offset[e] .. offset[e+1]. Each expert's rows are cut into chunks of at most kChunkRows rows; a chunk
// is one sgemm per matmul (no padding, no dropping) on small per-thread scratch (nothing of size [M, D] is ever
// materialised):
//   forward   Xc = x[tokens of the chunk] [R, D];  pre = Xc W_in[e] [R, Fi] (saved, sorted rows);
//             Hc = act(pre) * weight [R, F];  y[tokens] += Hc W_out[e]
//   backward  Xc, dYc gathered;  Gc = dYc W_out[e]^T [R, F];  dweight = rowsum(Gc * act(pre));
//             dpre = act'(pre) . (Gc * weight) [R, Fi];  dW_out[e] += (act(pre) * weight)^T dYc;
//             dW_in[e] += Xc^T dpre;  dx[tokens] += dpre W_in[e]^T
// Threads: the chunks (in expert order) are split statically into contiguous ranges of about equal rows, one per
// OpenMP thread; every BLAS call is single-threaded (one thread pool, no oversubscription). Each thread adds y / dx
// into its own [T, D] accumulator; weight gradients of experts inside a range are written in place, those of the
// (at most two) experts a range shares with its neighbours go through per-thread partials. All sums are taken in a
// fixed order: results are bitwise repeatable for a given thread count (OMP_NUM_THREADS).
// Memory: the saved pre-activations [M, Fi] (an output); per thread kChunkRows (2 D + F + Fi) floats and two
// expert weight-gradient partials of scratch, kept between calls; per extra thread a [T, D] accumulator.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <omp.h>

#include "cblas.h"
#include "xla/ffi/api/ffi.h"

// glibc's libmvec vector variants (math.h declares them only under -ffast-math, which would also drop NaNs).
extern "C" {
__attribute__((__simd__("notinbranch"))) float expf(float) noexcept;
__attribute__((__simd__("notinbranch"))) float erff(float) noexcept;
}

namespace ffi = xla::ffi;

namespace {

enum Activation : int64_t { kSwiglu = 0, kGeglu = 1, kGelu = 2, kRelu = 3 };

constexpr int64_t kChunkRows = 512;  // measured within noise of 256 and 1024 at E = 8 and 64

// All parallelism is OpenMP's (over chunks); OpenBLAS (a private copy, used by nothing else) runs on the calling
// thread, so two thread pools never compete for the cores.
const int kSingleThreadedBlas = (scipy_openblas_set_num_threads(1), 1);

struct Silu {
  static float fn(float v) { return v / (1.0f + expf(-v)); }
  static float grad(float v) {
    const float s = 1.0f / (1.0f + expf(-v));
    return s * (1.0f + v * (1.0f - s));
  }
};
struct Gelu {  // exact (erf) GELU, as jax.nn.gelu(approximate=False)
  static float fn(float v) { return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); }
  static float grad(float v) {
    return 0.5f * (1.0f + erff(v * 0.70710678118654752f)) + v * 0.39894228040143268f * expf(-0.5f * v * v);
  }
};
struct Relu {  // gradient 0 at 0, as jax.nn.relu; NaN stays NaN
  static float fn(float v) { return v > 0.0f || v != v ? v : 0.0f; }
  static float grad(float v) { return v > 0.0f ? 1.0f : 0.0f; }
};

struct Shapes {
  int64_t tokens, top_k, slots, experts, d_model, d_in, d_hidden;
  bool gated;
};

// The sorted layout of the token-slots: slot_of_row[p] (slot m = t*K + k of sorted row p), offset[E + 1].
struct Layout {
  std::vector<int32_t> slot_of_row;
  std::vector<int64_t> offset;
};

// skip_zero: the slots' weights, when slots of weight exactly 0 are to be left out (a forward with no gradient to
// come: such a slot adds 0 * Expert(x) = 0 to y, so its rows need not be computed; DS-MoE's threshold inference
// zeroes the slots under its threshold). Null: every slot gets a row (training: the weight gradient needs them).
ffi::Error make_layout(const int32_t* ids, const Shapes& s, Layout* layout, const float* skip_zero = nullptr) {
  layout->offset.assign(s.experts + 1, 0);
  for (int64_t m = 0; m < s.slots; ++m) {
    const int32_t e = ids[m];
    if (e < 0 || e >= s.experts) {
      return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                        "expert_ids[" + std::to_string(m) + "] = " + std::to_string(e) +
                            " is out of range: accepted values are 0.." + std::to_string(s.experts - 1));
    }
    if (skip_zero && skip_zero[m] == 0.0f) continue;
    ++layout->offset[e + 1];
  }
  for (int64_t e = 0; e < s.experts; ++e) layout->offset[e + 1] += layout->offset[e];
  std::vector<int64_t> next(layout->offset.begin(), layout->offset.end() - 1);
  layout->slot_of_row.resize(layout->offset.back());
  for (int64_t m = 0; m < s.slots; ++m) {
    if (skip_zero && skip_zero[m] == 0.0f) continue;
    layout->slot_of_row[next[ids[m]]++] = static_cast<int32_t>(m);
  }
  return ffi::Error::Success();
}

// Per-thread scratch buffer `slot` (0..5), at least n floats, kept between calls (grown, never shrunk).
float* scratch(int slot, int64_t n) {
  thread_local std::vector<float> buffers[6];
  if (static_cast<int64_t>(buffers[slot].size()) < n) buffers[slot].resize(n);
  return buffers[slot].data();
}

// C = op(A) op(B) (+ C when accumulate), row-major.
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate = false) {
  scipy_cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                    static_cast<blasint>(m), static_cast<blasint>(n), static_cast<blasint>(k), 1.0f, a,
                    static_cast<blasint>(lda), b, static_cast<blasint>(ldb), accumulate ? 1.0f : 0.0f, c,
                    static_cast<blasint>(ldc));
}

// dst[i] = src[token of slots[i]], i < rows (rows of `width` floats).
void gather_rows(const int32_t* slots, int64_t rows, int64_t top_k, const float* src, int64_t width, float* dst) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    std::memcpy(dst + i * width, src + (slots[i] / top_k) * width, width * sizeof(float));
  }
}

// acc[token of slots[i]] += src[i]. Serial over rows (a token may repeat); parallel over columns.
void scatter_add_rows(const int32_t* slots, int64_t rows, int64_t top_k, const float* src, int64_t width,
                      float* acc) {
  const int64_t blocks = (width + 127) / 128;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t lo = b * 128, hi = std::min(width, lo + 128);
    for (int64_t i = 0; i < rows; ++i) {
      const float* row = src + i * width;
      float* out = acc + (slots[i] / top_k) * width;
#pragma omp simd
      for (int64_t d = lo; d < hi; ++d) out[d] += row[d];
    }
  }
}

// H[i] = act(pre[i]) * weight (gated: act(gate) * up * weight).
template <typename Act>
void forward_hidden(const Shapes& s, const int32_t* slots, int64_t rows, const float* weights, const float* pre,
                    float* hidden) {
  const int64_t F = s.d_hidden, Fi = s.d_in;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    const float w = weights[slots[i]];
    const float* pr = pre + i * Fi;
    float* h = hidden + i * F;
    if (s.gated) {
#pragma omp simd
      for (int64_t f = 0; f < F; ++f) h[f] = Act::fn(pr[f]) * pr[F + f] * w;
    } else {
#pragma omp simd
      for (int64_t f = 0; f < F; ++f) h[f] = Act::fn(pr[f]) * w;
    }
  }
}

// From G = d loss / d(act(pre) * weight): dweight[slot], dpre [rows, Fi]; G is overwritten by act(pre) * weight.
template <typename Act>
void backward_hidden(const Shapes& s, const int32_t* slots, int64_t rows, const float* weights, const float* pre,
                     float* g, float* dpre, float* dweights) {
  const int64_t F = s.d_hidden, Fi = s.d_in;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    const float w = weights[slots[i]];
    const float* pr = pre + i * Fi;
    float* gr = g + i * F;
    float* dp = dpre + i * Fi;
    float dot = 0.0f;
    if (s.gated) {
#pragma omp simd reduction(+ : dot)
      for (int64_t f = 0; f < F; ++f) {
        const float a = Act::fn(pr[f]), up = pr[F + f], gw = gr[f] * w;
        dot += gr[f] * a * up;
        dp[f] = gw * up * Act::grad(pr[f]);
        dp[F + f] = gw * a;
        gr[f] = a * up * w;
      }
    } else {
#pragma omp simd reduction(+ : dot)
      for (int64_t f = 0; f < F; ++f) {
        const float a = Act::fn(pr[f]);
        dot += gr[f] * a;
        dp[f] = gr[f] * w * Act::grad(pr[f]);
        gr[f] = a * w;
      }
    }
    dweights[slots[i]] = dot;
  }
}

// A chunk of one expert's sorted rows.
struct Chunk {
  int64_t expert, lo, rows;
};

// The chunks in expert order, and a static split into contiguous ranges of about equal rows, one per OpenMP
// thread: thread t runs chunks[bounds[t] .. bounds[t+1]). Static (not dynamic) so that every sum is taken in the
// same order on every call: results are deterministic for a given thread count.
struct Plan {
  std::vector<Chunk> chunks;
  std::vector<int64_t> bounds;
  int threads;
};

Plan make_plan(const Layout& layout) {
  Plan plan;
  const int64_t num_experts = static_cast<int64_t>(layout.offset.size()) - 1;
  for (int64_t e = 0; e < num_experts; ++e) {
    for (int64_t lo = layout.offset[e]; lo < layout.offset[e + 1]; lo += kChunkRows) {
      plan.chunks.push_back({e, lo, std::min(kChunkRows, layout.offset[e + 1] - lo)});
    }
  }
  const int64_t count = static_cast<int64_t>(plan.chunks.size());
  plan.threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), count)));
  const int64_t total = layout.offset.back();
  plan.bounds.assign(plan.threads + 1, count);
  plan.bounds[0] = 0;
  int64_t rows = 0;
  int t = 1;
  for (int64_t i = 0; i < count && t < plan.threads; ++i) {
    rows += plan.chunks[i].rows;
    while (t < plan.threads && rows * plan.threads >= total * t) plan.bounds[t++] = i + 1;
  }
  return plan;
}

// Runs chunk_fn(i, acc, t) for every chunk i, thread t taking its range of the plan; `acc` is the thread's [T, D]
// accumulator: `out` (zeroed here) for thread 0, a buffer of its own for the others, added into `out` in thread
// order at the end. Each BLAS call is single-threaded (kSingleThreadedBlas).
template <typename Fn>
void run_plan(const Plan& plan, const Shapes& s, float* out, Fn chunk_fn) {
  const int64_t size = s.tokens * s.d_model;
  std::fill(out, out + size, 0.0f);
  std::vector<std::unique_ptr<float[]>> extra(plan.threads);
#pragma omp parallel num_threads(plan.threads)
  {
    const int t = omp_get_thread_num();
    float* acc = out;
    if (t > 0 && plan.bounds[t] < plan.bounds[t + 1]) {
      extra[t].reset(new float[size]());
      acc = extra[t].get();
    }
    for (int64_t i = plan.bounds[t]; i < plan.bounds[t + 1]; ++i) chunk_fn(i, acc, t);
  }
  for (int t = 1; t < plan.threads; ++t) {
    if (!extra[t]) continue;
    const float* src = extra[t].get();
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < size; ++i) out[i] += src[i];
  }
}

ffi::Error check_shapes(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& w_in, ffi::Buffer<ffi::F32>& w_out,
                        ffi::Buffer<ffi::S32>& ids, ffi::Buffer<ffi::F32>& weights, int64_t activation,
                        Shapes* s) {
  if (activation < kSwiglu || activation > kRelu) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "activation code " + std::to_string(activation) + " is unknown: accepted values are 0..3");
  }
  auto xd = x.dimensions(), wid = w_in.dimensions(), wod = w_out.dimensions(), idd = ids.dimensions();
  if (xd.size() != 2 || wid.size() != 3 || wod.size() != 3 || idd.size() != 2 || weights.dimensions().size() != 2) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "expected x [T, D], w_in [E, D, Fi], w_out [E, F, D], expert_ids and weights [T, K]");
  }
  s->tokens = xd[0];
  s->d_model = xd[1];
  s->top_k = idd[1];
  s->slots = s->tokens * s->top_k;
  s->experts = wid[0];
  s->d_in = wid[2];
  s->d_hidden = wod[1];
  s->gated = activation == kSwiglu || activation == kGeglu;
  const bool ok = idd[0] == s->tokens && weights.element_count() == static_cast<size_t>(s->slots) &&
                  wid[1] == s->d_model && wod[0] == s->experts && wod[2] == s->d_model &&
                  s->d_in == (s->gated ? 2 : 1) * s->d_hidden;
  if (!ok) return ffi::Error(ffi::ErrorCode::kInvalidArgument, "inconsistent expert MLP shapes");
  return ffi::Error::Success();
}

template <typename Act>
void forward(const Shapes& s, const Layout& layout, const float* x, const float* wi, const float* wo,
             const float* weights, float* y, float* saved_pre) {
  const int64_t D = s.d_model, Fi = s.d_in, F = s.d_hidden;
  const Plan plan = make_plan(layout);
  run_plan(plan, s, y, [&](int64_t i, float* acc, int) {
    const Chunk& c = plan.chunks[i];
    const int32_t* slots = layout.slot_of_row.data() + c.lo;
    float* xc = scratch(0, kChunkRows * D);
    float* pre = saved_pre ? saved_pre + c.lo * Fi : scratch(1, kChunkRows * Fi);
    float* hidden = scratch(2, kChunkRows * F);
    gather_rows(slots, c.rows, s.top_k, x, D, xc);
    gemm(false, false, c.rows, Fi, D, xc, D, wi + c.expert * D * Fi, Fi, pre, Fi);
    forward_hidden<Act>(s, slots, c.rows, weights, pre, hidden);
    gemm(false, false, c.rows, D, F, hidden, F, wo + c.expert * F * D, D, xc, D);
    scatter_add_rows(slots, c.rows, s.top_k, xc, D, acc);
  });
}

template <typename Act>
void backward(const Shapes& s, const Layout& layout, const float* x, const float* wi, const float* wo,
              const float* weights, const float* saved_pre, const float* dy, float* dx, float* dwi, float* dwo,
              float* dweights) {
  const int64_t D = s.d_model, Fi = s.d_in, F = s.d_hidden;
  const Plan plan = make_plan(layout);
  // An expert inside one thread's range gets its weight gradient written in place; the first and the last expert
  // of a range may be shared with the neighbouring threads: those sum into per-thread partials (scratch slots 4
  // and 5, [D*Fi | F*D] each; edge[2t]: thread t's first expert, edge[2t + 1]: its last), combined in thread order
  // afterwards.
  std::vector<float*> edge(2 * plan.threads, nullptr);
  auto edge_slot = [&](int t, int64_t expert) -> int {
    if (plan.chunks[plan.bounds[t]].expert == expert) return 2 * t;
    if (plan.chunks[plan.bounds[t + 1] - 1].expert == expert) return 2 * t + 1;
    return -1;
  };
  run_plan(plan, s, dx, [&](int64_t i, float* acc, int t) {
    const Chunk& c = plan.chunks[i];
    const int64_t e = c.expert;
    const bool first = i == plan.bounds[t] || plan.chunks[i - 1].expert != e;  // beta = 0: the sum starts
    float* dwi_e = dwi + e * D * Fi;
    float* dwo_e = dwo + e * F * D;
    if (const int slot = edge_slot(t, e); slot >= 0) {
      edge[slot] = scratch(4 + slot % 2, D * Fi + F * D);
      dwi_e = edge[slot];
      dwo_e = edge[slot] + D * Fi;
    }
    const int32_t* slots = layout.slot_of_row.data() + c.lo;
    float* xc = scratch(0, kChunkRows * D);
    float* dyc = scratch(1, kChunkRows * D);
    float* g = scratch(2, kChunkRows * F);
    float* dpre = scratch(3, kChunkRows * Fi);
    gather_rows(slots, c.rows, s.top_k, x, D, xc);
    gather_rows(slots, c.rows, s.top_k, dy, D, dyc);
    gemm(false, true, c.rows, F, D, dyc, D, wo + e * F * D, D, g, F);
    backward_hidden<Act>(s, slots, c.rows, weights, saved_pre + c.lo * Fi, g, dpre, dweights);
    gemm(true, false, F, D, c.rows, g, F, dyc, D, dwo_e, D, !first);
    gemm(true, false, D, Fi, c.rows, xc, D, dpre, Fi, dwi_e, Fi, !first);
    gemm(false, true, c.rows, D, Fi, dpre, Fi, wi + e * D * Fi, Fi, xc, D);
    scatter_add_rows(slots, c.rows, s.top_k, xc, D, acc);
  });
  std::vector<char> started(s.experts, 0);  // an edge expert's dW holds its first partial
  for (int t = 0; t < plan.threads; ++t) {
    for (int slot = 2 * t; slot < 2 * t + 2; ++slot) {
      if (edge[slot] == nullptr) continue;
      const int64_t e = plan.chunks[slot == 2 * t ? plan.bounds[t] : plan.bounds[t + 1] - 1].expert;
      float* di = dwi + e * D * Fi;
      float* dout = dwo + e * F * D;
      const float* pi = edge[slot];
      const float* po = edge[slot] + D * Fi;
      if (!started[e]) {
        std::copy(pi, pi + D * Fi, di);
        std::copy(po, po + F * D, dout);
        started[e] = 1;
        continue;
      }
#pragma omp parallel for simd schedule(static)
      for (int64_t j = 0; j < D * Fi; ++j) di[j] += pi[j];
#pragma omp parallel for simd schedule(static)
      for (int64_t j = 0; j < F * D; ++j) dout[j] += po[j];
    }
  }
  for (int64_t e = 0; e < s.experts; ++e) {  // experts with no rows: a zero gradient
    if (layout.offset[e + 1] == layout.offset[e]) {
      std::fill(dwi + e * D * Fi, dwi + (e + 1) * D * Fi, 0.0f);
      std::fill(dwo + e * F * D, dwo + (e + 1) * F * D, 0.0f);
    }
  }
}

template <typename Fn>
void dispatch_activation(int64_t activation, Fn fn) {
  if (activation == kSwiglu) {
    fn(Silu{});
  } else if (activation == kRelu) {
    fn(Relu{});
  } else {
    fn(Gelu{});
  }
}

ffi::Error ExpertMlpFwd(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_in, ffi::Buffer<ffi::F32> w_out,
                        ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::F32> weights, ffi::ResultBuffer<ffi::F32> y,
                        ffi::ResultBuffer<ffi::F32> pre_out, int64_t activation) {
  Shapes s;
  if (auto err = check_shapes(x, w_in, w_out, ids, weights, activation, &s); err.failure()) return err;
  // pre_out is [M, Fi] (saved for the backward) or [0, Fi] (no gradient needed: chunk scratch instead, and the
  // slots of weight 0 are skipped).
  float* saved_pre = pre_out->element_count() ? pre_out->typed_data() : nullptr;
  Layout layout;
  if (auto err = make_layout(ids.typed_data(), s, &layout, saved_pre ? nullptr : weights.typed_data());
      err.failure()) {
    return err;
  }
  dispatch_activation(activation, [&](auto act) {
    forward<decltype(act)>(s, layout, x.typed_data(), w_in.typed_data(), w_out.typed_data(), weights.typed_data(),
                           y->typed_data(), saved_pre);
  });
  return ffi::Error::Success();
}

ffi::Error ExpertMlpBwd(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_in, ffi::Buffer<ffi::F32> w_out,
                        ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::F32> pre_in,
                        ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dw_in,
                        ffi::ResultBuffer<ffi::F32> dw_out, ffi::ResultBuffer<ffi::F32> dweights,
                        int64_t activation) {
  Shapes s;
  if (auto err = check_shapes(x, w_in, w_out, ids, weights, activation, &s); err.failure()) return err;
  if (pre_in.element_count() != static_cast<size_t>(s.slots * s.d_in) || dy.element_count() != x.element_count()) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "pre-activations must be [T*K, Fi] and dy [T, D]");
  }
  Layout layout;
  if (auto err = make_layout(ids.typed_data(), s, &layout); err.failure()) return err;
  dispatch_activation(activation, [&](auto act) {
    backward<decltype(act)>(s, layout, x.typed_data(), w_in.typed_data(), w_out.typed_data(), weights.typed_data(),
                            pre_in.typed_data(), dy.typed_data(), dx->typed_data(), dw_in->typed_data(),
                            dw_out->typed_data(), dweights->typed_data());
  });
  return ffi::Error::Success();
}


// ------------------------------------------------------------------------------------------------ PEER experts
// The expert part of a PEER layer (grin_jax/ffn/peer.py): single-neuron experts gathered by id, fused with their
// contraction (XLA's take-then-einsum materialises the gathered rows). Axes: T tokens, J = H*K retrieved experts
// per token, R table rows, D model.
//   forward   s[t, j] = u_r . x[t] (saved);  y[t] = sum_j g[t, j] act(s[t, j]) v_r,   r = ids[t, j]
//   backward  a = dy[t] . v_r;  dg[t, j] = a act(s);  ds = a g act'(s);  dx[t] = sum_j ds u_r;
//             rows mode:  du[t, j] = ds x[t],  dv[t, j] = g act(s) dy[t]   ([T, J, D]: the row-sparse update's)
//             dense mode: dW_in[r] += ds x[t],  dW_out[r] += g act(s) dy[t]  ([R, D], threads own column ranges)
// Threads: tokens split statically (forward, backward rows); in dense mode each thread adds into its own columns
// of the table gradients, in (t, j) order: results are bitwise repeatable for a given thread count.
enum PeerActivation : int64_t { kPeerGelu = 0, kPeerRelu = 1, kPeerSilu = 2 };

template <typename Fn>
void dispatch_peer_activation(int64_t activation, Fn fn) {
  if (activation == kPeerRelu) {
    fn(Relu{});
  } else if (activation == kPeerSilu) {
    fn(Silu{});
  } else {
    fn(Gelu{});
  }
}

ffi::Error check_peer(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::S32>& ids, ffi::Buffer<ffi::F32>& gates,
                      ffi::Buffer<ffi::F32>& w_in, ffi::Buffer<ffi::F32>& w_out, int64_t* T, int64_t* J,
                      int64_t* R, int64_t* D) {
  if (x.dimensions().size() != 2 || ids.dimensions().size() != 2 || w_in.dimensions().size() != 2) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "PEER kernel: x [T, D], ids [T, J], tables [R, D]");
  }
  *T = x.dimensions()[0];
  *D = x.dimensions()[1];
  *J = ids.dimensions()[1];
  *R = w_in.dimensions()[0];
  if (ids.dimensions()[0] != *T || gates.element_count() != ids.element_count() ||
      w_in.dimensions()[1] != *D || w_out.element_count() != w_in.element_count()) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "PEER kernel: inconsistent shapes");
  }
  const int32_t* id = ids.typed_data();
  for (int64_t m = 0; m < *T * *J; ++m) {
    if (id[m] < 0 || id[m] >= *R) {
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, "PEER kernel: an expert id is outside the table");
    }
  }
  return ffi::Error::Success();
}

template <typename Act>
void peer_forward(int64_t T, int64_t J, int64_t D, const float* x, const int32_t* ids, const float* g,
                  const float* w_in, const float* w_out, float* y, float* s_out) {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x + t * D;
    float* yt = y + t * D;
    std::fill(yt, yt + D, 0.0f);
    for (int64_t j = 0; j < J; ++j) {
      const int64_t m = t * J + j;
      const float* u = w_in + static_cast<int64_t>(ids[m]) * D;
      const float* v = w_out + static_cast<int64_t>(ids[m]) * D;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += u[d] * xt[d];
      s_out[m] = dot;
      const float c = g[m] * Act::fn(dot);
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) yt[d] += c * v[d];
    }
  }
}

template <typename Act>
void peer_backward(int64_t T, int64_t J, int64_t R, int64_t D, bool rows, const float* x, const int32_t* ids,
                   const float* g, const float* w_in, const float* w_out, const float* s, const float* dy,
                   float* dx, float* dg, float* d_in, float* d_out) {
  std::vector<float> ds(rows ? 0 : T * J), c(rows ? 0 : T * J);
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x + t * D;
    const float* dyt = dy + t * D;
    float* dxt = dx + t * D;
    std::fill(dxt, dxt + D, 0.0f);
    for (int64_t j = 0; j < J; ++j) {
      const int64_t m = t * J + j;
      const float* u = w_in + static_cast<int64_t>(ids[m]) * D;
      const float* v = w_out + static_cast<int64_t>(ids[m]) * D;
      float a = 0.0f;
#pragma omp simd reduction(+ : a)
      for (int64_t d = 0; d < D; ++d) a += dy[t * D + d] * v[d];
      const float act = Act::fn(s[m]);
      dg[m] = a * act;
      const float dsm = a * g[m] * Act::grad(s[m]);
      const float cm = g[m] * act;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) dxt[d] += dsm * u[d];
      if (rows) {
        float* du = d_in + m * D;
        float* dv = d_out + m * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          du[d] = dsm * xt[d];
          dv[d] = cm * dyt[d];
        }
      } else {
        ds[m] = dsm;
        c[m] = cm;
      }
    }
  }
  if (rows) return;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < R; ++r) {  // contiguous rows per thread
    std::fill(d_in + r * D, d_in + (r + 1) * D, 0.0f);
    std::fill(d_out + r * D, d_out + (r + 1) * D, 0.0f);
  }
#pragma omp parallel
  {
    const int threads = omp_get_num_threads(), me = omp_get_thread_num();
    const int64_t lo = D * me / threads, hi = D * (me + 1) / threads;
    for (int64_t m = 0; m < T * J; ++m) {
      const int64_t t = m / J;
      float* di = d_in + static_cast<int64_t>(ids[m]) * D;
      float* dov = d_out + static_cast<int64_t>(ids[m]) * D;
      const float dsm = ds[m], cm = c[m];
#pragma omp simd
      for (int64_t d = lo; d < hi; ++d) {
        di[d] += dsm * x[t * D + d];
        dov[d] += cm * dy[t * D + d];
      }
    }
  }
}

ffi::Error PeerFwd(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::F32> gates,
                   ffi::Buffer<ffi::F32> w_in, ffi::Buffer<ffi::F32> w_out, ffi::ResultBuffer<ffi::F32> y,
                   ffi::ResultBuffer<ffi::F32> s_out, int64_t activation) {
  int64_t T, J, R, D;
  if (auto err = check_peer(x, ids, gates, w_in, w_out, &T, &J, &R, &D); err.failure()) return err;
  dispatch_peer_activation(activation, [&](auto act) {
    peer_forward<decltype(act)>(T, J, D, x.typed_data(), ids.typed_data(), gates.typed_data(), w_in.typed_data(),
                                w_out.typed_data(), y->typed_data(), s_out->typed_data());
  });
  return ffi::Error::Success();
}

ffi::Error PeerBwd(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::F32> gates,
                   ffi::Buffer<ffi::F32> w_in, ffi::Buffer<ffi::F32> w_out, ffi::Buffer<ffi::F32> s,
                   ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dg,
                   ffi::ResultBuffer<ffi::F32> d_in, ffi::ResultBuffer<ffi::F32> d_out, int64_t activation) {
  int64_t T, J, R, D;
  if (auto err = check_peer(x, ids, gates, w_in, w_out, &T, &J, &R, &D); err.failure()) return err;
  const bool rows = d_in->element_count() == static_cast<size_t>(T * J * D);
  if (!rows && d_in->element_count() != static_cast<size_t>(R * D)) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "PEER kernel: table gradients must be [T*J, D] or [R, D]");
  }
  dispatch_peer_activation(activation, [&](auto act) {
    peer_backward<decltype(act)>(T, J, R, D, rows, x.typed_data(), ids.typed_data(), gates.typed_data(),
                                 w_in.typed_data(), w_out.typed_data(), s.typed_data(), dy.typed_data(),
                                 dx->typed_data(), dg->typed_data(), d_in->typed_data(), d_out->typed_data());
  });
  return ffi::Error::Success();
}


// Product-key retrieval (grin_jax/ffn/peer.py product_key_topk with kernel=True): per query row p, the half scores
// s1 = keys1[g] q1[p], s2 = keys2[g] q2[p] [n] (g = p % G: G = 1 shared sub-keys, G = H one pair per head, rows
// p = t * H + h), the top-k of each half, then the top-k of the k^2 sums s1[i1] + s2[i2] by (sum descending, flat
// index i1 * n + i2 ascending): lax.top_k's order over the full n^2 vector (topk_from_half_scores).
// Rows are taken kRetrieveRows tokens x one group at a time: two sgemms into per-thread scratch [rows, n] (the half
// scores never leave the cache), then per row:
//   each half (n a multiple of 16, k <= 16): a threshold first: the k-th largest of the maxima of the 16 strided
//     groups i = j mod 16 (vectorised; at least k values are >= it, so every member of the top-k is); only the
//     values >= it are inserted, in index order, into a sorted list of k (~k to 2k of the n values). Other shapes,
//     and a row where fewer than k values pass (NaNs: the comparisons are false), are scanned in full.
//   the sums: row x of the candidates h1[x] + h2[y] is non-increasing in y (both lists are sorted descending and
//     float addition is monotonic), so a row stops at its first sum strictly below the current k-th best, and the
//     rows stop at the first whose best sum is (equal sums are inserted: the flat index decides).
// Threads: the (token block, group) items split statically.
constexpr int64_t kRetrieveRows = 64;

struct Ranked {
  float value;
  int32_t id;
};

// Insert (value, id) into best[0..count) kept by (value desc, id asc), at most k entries.
inline void insert_ranked(Ranked* best, int64_t* count, int64_t k, float value, int32_t id) {
  int64_t pos = *count;
  if (pos == k) {
    const Ranked& worst = best[k - 1];
    if (!(value > worst.value || (value == worst.value && id < worst.id))) return;
    pos = k - 1;
  } else {
    ++*count;
  }
  while (pos > 0 && (value > best[pos - 1].value || (value == best[pos - 1].value && id < best[pos - 1].id))) {
    best[pos] = best[pos - 1];
    --pos;
  }
  best[pos] = Ranked{value, id};
}

constexpr int kLanes = 16;  // the threshold's groups: one vector of float32 lanes

// The top-k of row[0..n) into best[0..k) by (value desc, index asc).
void top_k_of_row(const float* row, int64_t n, int64_t k, Ranked* best) {
  int64_t count = 0;
  if (n % kLanes == 0 && k <= kLanes) {
    float lane_max[kLanes];  // lane j: the maximum of row[i], i = j mod kLanes
    for (int j = 0; j < kLanes; ++j) lane_max[j] = row[j];
    for (int64_t base = kLanes; base < n; base += kLanes) {
      for (int j = 0; j < kLanes; ++j) lane_max[j] = row[base + j] > lane_max[j] ? row[base + j] : lane_max[j];
    }
    int32_t above[kLanes] = {0};  // lanes whose maximum is strictly above lane j's
    for (int i = 0; i < kLanes; ++i) {
      for (int j = 0; j < kLanes; ++j) above[j] += lane_max[i] > lane_max[j] ? 1 : 0;
    }
    float threshold = INFINITY;  // the k-th largest lane maximum: at least k values are >= it
    for (int j = 0; j < kLanes; ++j) {
      const float candidate = above[j] < k ? lane_max[j] : INFINITY;
      threshold = candidate < threshold ? candidate : threshold;
    }
    for (int64_t base = 0; base < n; base += kLanes) {
      uint32_t passing = 0;
      for (int j = 0; j < kLanes; ++j) passing |= (row[base + j] >= threshold ? 1u : 0u) << j;
      while (passing != 0) {
        const int j = __builtin_ctz(passing);
        passing &= passing - 1;
        insert_ranked(best, &count, k, row[base + j], static_cast<int32_t>(base + j));
      }
    }
    if (count == k) return;
    count = 0;
  }
  for (int64_t i = 0; i < n; ++i) insert_ranked(best, &count, k, row[i], static_cast<int32_t>(i));
}

// The top-k of the sums h1[x].value + h2[y].value (h1, h2 sorted) into best[0..k), ids h1[x].id * n + h2[y].id.
void top_k_of_sums(const Ranked* h1, const Ranked* h2, int64_t n, int64_t k, Ranked* best) {
  int64_t count = 0;
  for (int64_t x = 0; x < k; ++x) {
    if (count == k && h1[x].value + h2[0].value < best[k - 1].value) break;
    for (int64_t y = 0; y < k; ++y) {
      const float sum = h1[x].value + h2[y].value;
      if (count == k && sum < best[k - 1].value) break;
      insert_ranked(best, &count, k, sum, static_cast<int32_t>(h1[x].id * n + h2[y].id));
    }
  }
}

ffi::Error ProductKeyRetrieve(ffi::Buffer<ffi::F32> q1, ffi::Buffer<ffi::F32> q2, ffi::Buffer<ffi::F32> keys1,
                              ffi::Buffer<ffi::F32> keys2, ffi::ResultBuffer<ffi::S32> out_ids,
                              ffi::ResultBuffer<ffi::F32> out_values, int64_t k) {
  const auto kd1 = keys1.dimensions(), kd2 = keys2.dimensions();
  if (q1.dimensions().size() != 2 || q2.dimensions().size() != 2 || kd1.size() != 3 || kd2.size() != 3) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "product-key retrieval: q1 [P, A], q2 [P, B], keys1 [G, n, A], keys2 [G, n, B]");
  }
  const int64_t P = q1.dimensions()[0], A = q1.dimensions()[1], B = q2.dimensions()[1];
  const int64_t G = kd1[0], n = kd1[1];
  if (q2.dimensions()[0] != P || kd1[2] != A || kd2[0] != G || kd2[1] != n || kd2[2] != B || G < 1 ||
      P % G != 0 || k < 1 || k > n || out_ids->element_count() != static_cast<size_t>(P * k)) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "product-key retrieval: inconsistent shapes (P a multiple of G, 1 <= k <= n)");
  }
  const int64_t tokens = P / G, blocks = (tokens + kRetrieveRows - 1) / kRetrieveRows;
  const float *a1 = q1.typed_data(), *a2 = q2.typed_data(), *c1 = keys1.typed_data(), *c2 = keys2.typed_data();
  int32_t* ids = out_ids->typed_data();
  float* values = out_values->typed_data();
#pragma omp parallel
  {
    std::vector<Ranked> h1(k), h2(k), best(k);
    float* s1 = scratch(0, kRetrieveRows * n);
    float* s2 = scratch(1, kRetrieveRows * n);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < blocks * G; ++item) {
      const int64_t g = item % G, t0 = item / G * kRetrieveRows;
      const int64_t rows = std::min(kRetrieveRows, tokens - t0);
      gemm(false, true, rows, n, A, a1 + (t0 * G + g) * A, G * A, c1 + g * n * A, A, s1, n);
      gemm(false, true, rows, n, B, a2 + (t0 * G + g) * B, G * B, c2 + g * n * B, B, s2, n);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t p = (t0 + r) * G + g;
        top_k_of_row(s1 + r * n, n, k, h1.data());
        top_k_of_row(s2 + r * n, n, k, h2.data());
        top_k_of_sums(h1.data(), h2.data(), n, k, best.data());
        for (int64_t j = 0; j < k; ++j) {
          ids[p * k + j] = best[j].id;
          values[p * k + j] = best[j].value;
        }
      }
    }
  }
  return ffi::Error::Success();
}

// The gradient of the selected product-key scores (grin_jax/ffn/peer.py product_key_topk with kernel=True):
//   v[p, j] = q1[p] . keys1[g, i1] + q2[p] . keys2[g, i2],   i = ids[p, j] = i1 * n + i2,  g = p % G
// (G = 1: one pair of sub-key sets; G = H: one per head, rows p = t * H + h). Given dv [P, k]:
//   dq1[p] = sum_j dv[p, j] keys1[g, i1],   dkeys1[g, i1] += dv[p, j] q1[p]   (and the same for the second half)
// O(P k (A + B)) instead of the dense half scores' O(P n (A + B)). Threads: rows split statically; each thread adds
// its sub-key gradients into its own partial, the partials are summed in thread order (bitwise repeatable for a
// given thread count).
ffi::Error ProductKeyScoresBwd(ffi::Buffer<ffi::F32> q1, ffi::Buffer<ffi::F32> q2, ffi::Buffer<ffi::F32> keys1,
                               ffi::Buffer<ffi::F32> keys2, ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::F32> dv,
                               ffi::ResultBuffer<ffi::F32> dq1, ffi::ResultBuffer<ffi::F32> dq2,
                               ffi::ResultBuffer<ffi::F32> dkeys1, ffi::ResultBuffer<ffi::F32> dkeys2) {
  const auto kd1 = keys1.dimensions(), kd2 = keys2.dimensions();
  if (q1.dimensions().size() != 2 || q2.dimensions().size() != 2 || kd1.size() != 3 || kd2.size() != 3 ||
      ids.dimensions().size() != 2) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "product-key scores: q1 [P, A], q2 [P, B], keys1 [G, n, A], keys2 [G, n, B], ids [P, k]");
  }
  const int64_t P = q1.dimensions()[0], A = q1.dimensions()[1], B = q2.dimensions()[1];
  const int64_t G = kd1[0], n = kd1[1], k = ids.dimensions()[1];
  if (q2.dimensions()[0] != P || ids.dimensions()[0] != P || kd1[2] != A || kd2[0] != G || kd2[1] != n ||
      kd2[2] != B || dv.element_count() != ids.element_count() || G < 1 || P % G != 0) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "product-key scores: inconsistent shapes");
  }
  const int32_t* id = ids.typed_data();
  for (int64_t m = 0; m < P * k; ++m) {
    if (id[m] < 0 || id[m] >= n * n) {
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, "product-key scores: an expert id is outside n^2");
    }
  }
  const float *a1 = q1.typed_data(), *a2 = q2.typed_data(), *c1 = keys1.typed_data(), *c2 = keys2.typed_data();
  const float* d = dv.typed_data();
  float *g1 = dq1->typed_data(), *g2 = dq2->typed_data();
  const int64_t keys_size = G * n * (A + B);  // a thread's partial: [G, n, A] then [G, n, B]
  const int threads = omp_get_max_threads();
  std::vector<float> partials(static_cast<size_t>(threads) * keys_size, 0.0f);
#pragma omp parallel num_threads(threads)
  {
    float* part1 = partials.data() + omp_get_thread_num() * keys_size;
    float* part2 = part1 + G * n * A;
#pragma omp for schedule(static)
    for (int64_t p = 0; p < P; ++p) {
      const int64_t g = p % G;
      float* r1 = g1 + p * A;
      float* r2 = g2 + p * B;
      std::fill(r1, r1 + A, 0.0f);
      std::fill(r2, r2 + B, 0.0f);
      for (int64_t j = 0; j < k; ++j) {
        const float dvj = d[p * k + j];
        const int64_t i1 = id[p * k + j] / n, i2 = id[p * k + j] % n;
        const float* key1 = c1 + (g * n + i1) * A;
        const float* key2 = c2 + (g * n + i2) * B;
        float* dk1 = part1 + (g * n + i1) * A;
        float* dk2 = part2 + (g * n + i2) * B;
#pragma omp simd
        for (int64_t e = 0; e < A; ++e) {
          r1[e] += dvj * key1[e];
          dk1[e] += dvj * a1[p * A + e];
        }
#pragma omp simd
        for (int64_t e = 0; e < B; ++e) {
          r2[e] += dvj * key2[e];
          dk2[e] += dvj * a2[p * B + e];
        }
      }
    }
  }
  float *out1 = dkeys1->typed_data(), *out2 = dkeys2->typed_data();
#pragma omp parallel for schedule(static)
  for (int64_t e = 0; e < keys_size; ++e) {
    float sum = 0.0f;
    for (int th = 0; th < threads; ++th) sum += partials[th * keys_size + e];
    if (e < G * n * A) {
      out1[e] = sum;
    } else {
      out2[e - G * n * A] = sum;
    }
  }
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------------------------ attention
// Fused masked softmax attention for CPU (grin_jax/nn/attention.py dot_product_attention): the scores of a block of
// query rows exist only in per-thread scratch, never as a [B, H, S, L] array. Layout (that of the XLA path): queries
// q [B, G, M, K] with M = R*S rows m = r*S + s (R query heads per KV head), keys and values [B, G, L, K], the mask
// [B, S, L] (true: the query at s may attend to the key at l), out [B, G, M, K], lse [B, G, M] (the rows' log-sum-exp
// of the scaled scores, saved for the backward).
//   forward   per block of up to kAttnRows rows of one head: Sc = scale Q Kc^T [rows, W] over the key range
//             [lo, hi) that holds every allowed key of the block (causal and sliding-window masks skip the rest);
//             P = softmax over the allowed keys (masked: exactly 0, as exp(finfo.min - max) is in the XLA path);
//             O = P Vc.
//   backward  Sc and P recomputed from lse;  dP = dO Vc^T;  dS = P (dP - rowsum(dO * O));  dQ = scale dS Kc;
//             dK[lo:hi] += scale dS^T Q;  dV[lo:hi] += P^T dO.
// A row with no allowed key is uniform over all L keys with no gradient to its scores (the XLA path's softmax over
// L equal finfo.min scores); its lse is +inf as a marker. Threads: the forward splits (b, g, block) items, the
// backward (b, g) pairs (each owns its dK, dV: no races; sums in a fixed order).
constexpr int64_t kAttnRows = 64;

struct AttnShapes {
  int64_t B, G, M, L, K, S, R;
};

// Per (b, s): the first and one past the last allowed key (first = L, last = 0 when none), and whether every key in
// between is allowed (causal, sliding-window and packed-segment masks: block_probs then reads no mask).
void allowed_ranges(const bool* mask, const AttnShapes& a, std::vector<int32_t>* first, std::vector<int32_t>* end,
                    std::vector<uint8_t>* contiguous) {
  first->assign(a.B * a.S, static_cast<int32_t>(a.L));
  end->assign(a.B * a.S, 0);
  contiguous->assign(a.B * a.S, 0);
#pragma omp parallel for schedule(static)
  for (int64_t bs = 0; bs < a.B * a.S; ++bs) {
    const bool* row = mask + bs * a.L;
    const int64_t lo = std::find(row, row + a.L, true) - row;
    if (lo == a.L) continue;
    int64_t hi = a.L;
    while (!row[hi - 1]) --hi;
    (*first)[bs] = static_cast<int32_t>(lo);
    (*end)[bs] = static_cast<int32_t>(hi);
    (*contiguous)[bs] = std::count(row + lo, row + hi, true) == hi - lo;
  }
}

// The key range [lo, hi) of the rows s0 .. s0 + rows of batch b (the whole [0, L) if a row has no allowed key).
inline void block_range(const AttnShapes& a, const std::vector<int32_t>& first, const std::vector<int32_t>& end,
                        int64_t b, int64_t s0, int64_t rows, int64_t* lo, int64_t* hi) {
  *lo = a.L;
  *hi = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t f = first[b * a.S + s0 + i], e = end[b * a.S + s0 + i];
    if (e == 0) {
      *lo = 0;
      *hi = a.L;
      return;
    }
    *lo = std::min(*lo, f);
    *hi = std::max(*hi, e);
  }
}

// The probabilities of a block in place: sc [rows, W] holds the unscaled scores q . k of keys lo .. lo + W; with
// lse_in (backward) P = exp(scale s - lse), else the softmax (lse_out written). Masked entries 0; a row with no
// allowed key 1/L. A row whose allowed keys are one run [first, end) (`contiguous`) is computed on that run alone,
// without reading the mask; other rows branch-free over j (vectorised, libmvec's expf). Both give the same bits:
// the masked entries add exact zeros to the sum in the same order.
void block_probs(const bool* mask, const AttnShapes& a, const std::vector<int32_t>& first,
                 const std::vector<int32_t>& end, const std::vector<uint8_t>& contiguous, int64_t b, int64_t s0,
                 int64_t rows, int64_t lo, int64_t W, float scale, float* sc, const float* lse_in, float* lse_out) {
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t bs = b * a.S + s0 + i;
    float* row = sc + i * W;
    if (contiguous[bs]) {
      const int64_t f = first[bs] - lo, e = end[bs] - lo;
      std::fill(row, row + f, 0.0f);
      std::fill(row + e, row + W, 0.0f);
      float peak = -INFINITY;
      for (int64_t j = f; j < e; ++j) {
        row[j] *= scale;
        peak = row[j] > peak ? row[j] : peak;
      }
      const float shift = lse_in ? lse_in[i] : peak;
#pragma omp simd
      for (int64_t j = f; j < e; ++j) row[j] = expf(row[j] - shift);
      if (lse_in) continue;
      float total = 0.0f;
      for (int64_t j = f; j < e; ++j) total += row[j];
      const float inv = 1.0f / total;
      for (int64_t j = f; j < e; ++j) row[j] *= inv;
      lse_out[i] = peak + logf(total);
      continue;
    }
    const bool* allowed = mask + bs * a.L + lo;
    float peak = -INFINITY;
    int32_t count = 0;
    for (int64_t j = 0; j < W; ++j) {
      row[j] *= scale;
      const float masked = allowed[j] ? row[j] : -INFINITY;
      peak = masked > peak ? masked : peak;
      count += allowed[j] ? 1 : 0;
    }
    if (count == 0) {  // W = L here (block_range)
      std::fill(row, row + W, 1.0f / static_cast<float>(a.L));
      if (lse_out) lse_out[i] = INFINITY;
      continue;
    }
    const float shift = lse_in ? lse_in[i] : peak;
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) row[j] = expf(row[j] - shift);
    float total = 0.0f;
    for (int64_t j = 0; j < W; ++j) {
      row[j] = allowed[j] ? row[j] : 0.0f;
      total += row[j];
    }
    if (lse_in) continue;
    const float inv = 1.0f / total;
    for (int64_t j = 0; j < W; ++j) row[j] *= inv;
    lse_out[i] = peak + logf(total);
  }
}

ffi::Error attn_shapes(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::F32>& v,
                       ffi::Buffer<ffi::PRED>& mask, AttnShapes* a) {
  const auto qd = q.dimensions(), kd = k.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || md.size() != 3 || v.dimensions().size() != 4) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "attention kernel: q [B, G, M, K], k, v [B, G, L, K], "
                      "mask [B, S, L]");
  }
  *a = AttnShapes{qd[0], qd[1], qd[2], kd[2], qd[3], md[1], 0};
  if (kd[0] != a->B || kd[1] != a->G || kd[3] != a->K || v.element_count() != k.element_count() ||
      md[0] != a->B || md[2] != a->L || a->S < 1 || a->M % a->S != 0) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "attention kernel: inconsistent shapes");
  }
  a->R = a->M / a->S;
  return ffi::Error::Success();
}

ffi::Error AttentionFwd(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                        ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> out,
                        ffi::ResultBuffer<ffi::F32> lse, float scale) {
  AttnShapes a;
  if (auto err = attn_shapes(q, k, v, mask, &a); err.failure()) return err;
  std::vector<int32_t> first, end;
  std::vector<uint8_t> contiguous;
  allowed_ranges(mask.typed_data(), a, &first, &end, &contiguous);
  const int64_t blocks = (a.S + kAttnRows - 1) / kAttnRows;  // per head
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
#pragma omp parallel
  {
    float* sc = scratch(0, kAttnRows * a.L);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < a.B * a.G * a.R * blocks; ++item) {
      const int64_t bg = item / (a.R * blocks), r = item / blocks % a.R, s0 = item % blocks * kAttnRows;
      const int64_t b = bg / a.G, rows = std::min(kAttnRows, a.S - s0);
      const int64_t m0 = bg * a.M + r * a.S + s0;  // the block's first row of [B*G*M]
      int64_t lo, hi;
      block_range(a, first, end, b, s0, rows, &lo, &hi);
      const int64_t W = hi - lo;
      const float* kc = kp + (bg * a.L + lo) * a.K;
      const float* vc = vp + (bg * a.L + lo) * a.K;
      gemm(false, true, rows, W, a.K, qp + m0 * a.K, a.K, kc, a.K, sc, W);
      block_probs(mask.typed_data(), a, first, end, contiguous, b, s0, rows, lo, W, scale, sc, nullptr, lp + m0);
      gemm(false, false, rows, a.K, W, sc, W, vc, a.K, op + m0 * a.K, a.K);
    }
  }
  return ffi::Error::Success();
}

ffi::Error AttentionBwd(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                        ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                        ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                        ffi::ResultBuffer<ffi::F32> dv, float scale) {
  AttnShapes a;
  if (auto err = attn_shapes(q, k, v, mask, &a); err.failure()) return err;
  std::vector<int32_t> first, end;
  std::vector<uint8_t> contiguous;
  allowed_ranges(mask.typed_data(), a, &first, &end, &contiguous);
  const int64_t blocks = (a.S + kAttnRows - 1) / kAttnRows;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(), *op = out.typed_data();
  const float *lp = lse.typed_data(), *gp = dout.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
#pragma omp parallel
  {
    float* p = scratch(0, kAttnRows * a.L);
    float* dp = scratch(1, kAttnRows * a.L);
    float* delta = scratch(2, kAttnRows);
#pragma omp for schedule(static)
    for (int64_t bg = 0; bg < a.B * a.G; ++bg) {
      const int64_t b = bg / a.G;
      std::fill(dkp + bg * a.L * a.K, dkp + (bg + 1) * a.L * a.K, 0.0f);
      std::fill(dvp + bg * a.L * a.K, dvp + (bg + 1) * a.L * a.K, 0.0f);
      for (int64_t rb = 0; rb < a.R * blocks; ++rb) {
        const int64_t r = rb / blocks, s0 = rb % blocks * kAttnRows, rows = std::min(kAttnRows, a.S - s0);
        const int64_t m0 = bg * a.M + r * a.S + s0;
        int64_t lo, hi;
        block_range(a, first, end, b, s0, rows, &lo, &hi);
        const int64_t W = hi - lo;
        const float* kc = kp + (bg * a.L + lo) * a.K;
        const float* vc = vp + (bg * a.L + lo) * a.K;
        const float* qb = qp + m0 * a.K;
        const float* gb = gp + m0 * a.K;
        gemm(false, true, rows, W, a.K, qb, a.K, kc, a.K, p, W);
        block_probs(mask.typed_data(), a, first, end, contiguous, b, s0, rows, lo, W, scale, p, lp + m0, nullptr);
        gemm(false, true, rows, W, a.K, gb, a.K, vc, a.K, dp, W);  // dP = dO Vc^T
        for (int64_t i = 0; i < rows; ++i) {
          float d = 0.0f;
          for (int64_t e = 0; e < a.K; ++e) d += gb[i * a.K + e] * op[(m0 + i) * a.K + e];
          delta[i] = d;
        }
        for (int64_t i = 0; i < rows; ++i) {
          const float factor = std::isinf(lp[m0 + i]) ? 0.0f : scale;  // a uniform row: no gradient to its scores
          for (int64_t j = 0; j < W; ++j) dp[i * W + j] = p[i * W + j] * (dp[i * W + j] - delta[i]) * factor;
        }
        gemm(false, false, rows, a.K, W, dp, W, kc, a.K, dqp + m0 * a.K, a.K);             // dQ = scale dS Kc
        gemm(true, false, W, a.K, rows, dp, W, qb, a.K, dkp + (bg * a.L + lo) * a.K, a.K, true);  // dK += ..
        gemm(true, false, W, a.K, rows, p, W, gb, a.K, dvp + (bg * a.L + lo) * a.K, a.K, true);   // dV += P^T dO
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrinExpertMlpFwd, ExpertMlpFwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [T, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_in [E, D, Fi]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_out [E, F, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // expert_ids [T, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weights [T, K]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [T, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // pre-activations [T*K or 0, Fi], sorted rows
                                  .Attr<int64_t>("activation"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrinExpertMlpBwd, ExpertMlpBwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [T, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_in [E, D, Fi]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_out [E, F, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // expert_ids [T, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weights [T, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // pre-activations [T*K, Fi], sorted rows
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy [T, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx [T, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw_in [E, D, Fi]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw_out [E, F, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dweights [T, K]
                                  .Attr<int64_t>("activation"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrinPeerFwd, PeerFwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [T, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // ids [T, J]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gates [T, J]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_in [R, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_out [R, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [T, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // s [T, J] (u . x, saved)
                                  .Attr<int64_t>("activation"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrinPeerBwd, PeerBwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [T, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // ids [T, J]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gates [T, J]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_in [R, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_out [R, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // s [T, J]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy [T, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx [T, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dg [T, J]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_in [T*J, D] (rows) or [R, D] (dense)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_out, as d_in
                                  .Attr<int64_t>("activation"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrinProductKeyRetrieve, ProductKeyRetrieve,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q1 [P, A]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q2 [P, B]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // keys1 [G, n, A]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // keys2 [G, n, B]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // flat ids [P, k]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // their scores s1[i1] + s2[i2] [P, k]
                                  .Attr<int64_t>("k"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrinProductKeyScoresBwd, ProductKeyScoresBwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q1 [P, A]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q2 [P, B]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // keys1 [G, n, A]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // keys2 [G, n, B]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // flat ids [P, k]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dv [P, k]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dq1 [P, A]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dq2 [P, B]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dkeys1 [G, n, A]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dkeys2 [G, n, B]

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrinAttentionFwd, AttentionFwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q [B, G, M, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k [B, G, L, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v [B, G, L, K]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask [B, S, L]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out [B, G, M, K]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // lse [B, G, M]
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrinAttentionBwd, AttentionBwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q [B, G, M, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k [B, G, L, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v [B, G, L, K]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask [B, S, L]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // out [B, G, M, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // lse [B, G, M]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dout [B, G, M, K]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dq [B, G, M, K]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dk [B, G, L, K]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dv [B, G, L, K]
                                  .Attr<float>("scale"));
