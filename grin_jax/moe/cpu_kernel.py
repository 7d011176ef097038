"""The dispatch backend 'kernel': the fused dropless expert MLP as a C++ XLA FFI custom call for CPU.

Axes: T tokens, K slots per token, M = T*K token-slots, E experts, D model, F expert hidden, Fi = 2F (gated) or F.

`kernel_expert_mlp` has the contract of `gmm.tiled_expert_mlp` (and of every dispatch backend):
    y[t] = sum_k weights[t, k] * Expert_{expert_ids[t, k]}(x[t]),  exact and dropless,
differentiable in x, the expert weights and the combine weights (a `jax.custom_vjp` over two FFI calls).
The kernel (csrc/expert_mlp.cc) counting-sorts the token-slots by expert and runs every expert's matmuls as one
OpenBLAS sgemm over its rows (no padding, no tiles), with OpenMP loops for the gathers, the activation and the
combine. Memory: the forward saves the pre-activations [M, Fi] (as the dense FFN saves [T, Fi]); scratch is
2 M D + M F floats forward and 3 M D + M F + M Fi backward. A forward with no gradient to come (inference) leaves
out the token-slots of weight exactly 0, whose term is 0 (DS-MoE's threshold mode zeroes the slots under its
threshold, so its compute falls with the active fraction); under jax.grad every slot is computed, since the
combine weights' gradient needs each slot's expert output.

What it supports (`supports(activation, dtype)`: None, else the reason): the activations of `ACTIVATION_CODES`
(swiglu, geglu, gelu, relu; an activation added to `experts.ACTIVATIONS` has no C++ code until one is written) and
the compute dtype float32 only, i.e. `jnp.result_type(x, expert weights) == float32` (the combine weights may be
any float dtype). The kernel computes in float32; running it on bfloat16 / float16 / float64 models would silently
change their numerics, so those are refused: `kernel_expert_mlp` raises ValueError, and the dispatch backend
'auto' runs the pure-XLA 'tiled' backend instead, which computes in the model's own dtype.

Build: the source is compiled with the system C++ compiler ($CXX, else g++ / c++; -O3 -march=native -fopenmp)
against jaxlib's FFI headers and the OpenBLAS of the `scipy-openblas32` wheel, into a cache folder
($GRIN_JAX_KERNEL_CACHE, default ~/.cache/grin_jax/kernels) keyed by a hash of the source, the flags, the
compiler, jaxlib and the CPU; later processes load the cached library (about 4 s to compile, milliseconds to load).
`ensure_built()` does this once per process and caches the outcome (None, or the reason it failed); it does not
raise for a missing or failing compiler (only ValueError for an invalid $GRIN_JAX_KERNEL_BUILD_TIMEOUT). The compiler runs in a subprocess of its own process group under a timeout ($GRIN_JAX_KERNEL_BUILD_TIMEOUT
seconds, default 300; on expiry the whole group is killed and nothing is left in the cache). `available()`,
`unavailable_reason()` and `load()` (raises KernelUnavailable) all go through `ensure_built()`.

When the build happens. `dispatch.resolve_backend` calls `ensure_built()` the first time a backend is resolved to
(or asked to be) 'kernel' on CPU, i.e. at the first trace of an MoE layer, synchronously. We chose this over a
build started in the background at import: importing grin_jax then costs nothing (GPU / TPU processes and
processes that never run an MoE layer never start a compiler), and the outcome cannot depend on timing (with a
background build, a trace that came before the build finished would pick 'tiled' and a later one 'kernel', so one
process could compile the same function two ways). The price is that the first trace waits for the compiler once,
bounded by the timeout; a program may call `cpu_kernel.ensure_built()` eagerly before tracing to take that cost
up front. A failed or timed-out build is not retried in the same process ('auto' then uses 'tiled').

Environment:
  GRIN_JAX_KERNEL=0 (or off / false / no)  disable the kernel entirely (for debugging): nothing is compiled or
                                          loaded, 'auto' uses 'tiled' and backend='kernel' raises KernelUnavailable.
                                          Read at every resolution, so it may be set after import.
  GRIN_JAX_KERNEL_CACHE=DIR               where compiled kernels are cached.
  GRIN_JAX_KERNEL_BUILD_TIMEOUT=SECONDS   the compile timeout (default 300).
  CXX=COMPILER                            the C++ compiler (default: g++, else c++, from $PATH).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import signal
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np

from grin_jax.moe import experts as _experts

SOURCE = pathlib.Path(__file__).with_name("csrc") / "expert_mlp.cc"
ACTIVATION_CODES = {"swiglu": 0, "geglu": 1, "gelu": 2, "relu": 3}  # as the enum in csrc/expert_mlp.cc
SUPPORTED_DTYPES = ("float32",)  # the compute dtype: jnp.result_type(x, expert weights)
FWD_TARGET, BWD_TARGET = "grin_expert_mlp_fwd", "grin_expert_mlp_bwd"
PEER_FWD_TARGET, PEER_BWD_TARGET = "grin_peer_fwd", "grin_peer_bwd"  # the PEER experts (grin_jax/ffn/peer.py)
PEER_RETRIEVE_TARGET = "grin_product_key_retrieve"                    # PEER's product-key top-k
PEER_KEYS_BWD_TARGET = "grin_product_key_scores_bwd"                  # the gradient of its selected scores
ATTENTION_FWD_TARGET, ATTENTION_BWD_TARGET = "grin_attention_fwd", "grin_attention_bwd"  # nn/attention.py
CXX_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC")
ENV_DISABLE, ENV_CACHE, ENV_TIMEOUT = "GRIN_JAX_KERNEL", "GRIN_JAX_KERNEL_CACHE", "GRIN_JAX_KERNEL_BUILD_TIMEOUT"
DEFAULT_BUILD_TIMEOUT = 300.0  # seconds; a build takes ~4 s on 2 idle cores
VERSION_TIMEOUT = 30.0         # seconds for `$CXX --version`


class KernelUnavailable(RuntimeError):
    """The CPU kernel could not be built or loaded here, or is disabled (the message says why)."""


def supports(activation: str | None, dtype=None) -> str | None:
    """None when the kernel computes `activation` in `dtype` as the other backends do, else the reason it does not.
    dtype: the compute dtype, `jnp.result_type(x, expert weights)`. None (either) = not checked.
    This says nothing about whether the kernel can be built here (`unavailable_reason()` does)."""
    if activation is not None and activation not in ACTIVATION_CODES:
        return (f"activation={activation!r} has no C++ implementation: the kernel accepts activation in "
                f"{list(ACTIVATION_CODES)}")
    if dtype is not None:
        name = jnp.dtype(dtype).name
        if name not in SUPPORTED_DTYPES:
            return (f"dtype={name} is not computed by the kernel: it computes in float32 only (accepted dtypes: "
                    f"{list(SUPPORTED_DTYPES)}, the result type of x and the expert weights)")
    return None


def check_supported(activation: str | None, dtype=None) -> None:
    """Raise ValueError (naming the backend, the activation / dtype and what is accepted) unless `supports`."""
    reason = supports(activation, dtype)
    if reason is not None:
        raise ValueError(f"backend='kernel' cannot run this MoE layer: {reason}; use backend='tiled' (or 'auto', "
                         "which picks 'tiled' for it)")


def disabled_reason() -> str | None:
    """The reason when $GRIN_JAX_KERNEL disables the kernel (0 / off / false / no), else None."""
    value = os.environ.get(ENV_DISABLE, "").strip().lower()
    if value in ("0", "off", "false", "no"):
        return f"disabled by ${ENV_DISABLE}={os.environ[ENV_DISABLE]}"
    return None


def build_timeout() -> float:
    """The compile timeout in seconds: $GRIN_JAX_KERNEL_BUILD_TIMEOUT, default 300."""
    value = os.environ.get(ENV_TIMEOUT, "").strip()
    if not value:
        return DEFAULT_BUILD_TIMEOUT
    try:
        timeout = float(value)
    except ValueError:
        timeout = -1.0
    if not timeout > 0:
        raise ValueError(f"${ENV_TIMEOUT}={value!r} is invalid: accepted values are positive numbers of seconds")
    return timeout


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get(ENV_CACHE) or pathlib.Path.home() / ".cache" / "grin_jax" / "kernels")


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise KernelUnavailable("no C++ compiler found: install g++ or set $CXX")


def _openblas():
    try:
        import scipy_openblas32
    except ImportError as e:
        raise KernelUnavailable("the scipy-openblas32 package is not installed (pip install scipy-openblas32)") from e
    return scipy_openblas32.get_include_dir(), scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library()


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build_command(cxx: str, output: str) -> list[str]:
    include, libdir, libname = _openblas()
    return [cxx, *CXX_FLAGS, "-I", jax.ffi.include_dir(), "-I", include, str(SOURCE), "-o", output,
            "-L", libdir, f"-l{libname}", f"-Wl,-rpath,{libdir}", "-lmvec"]


def _run(command: list[str], timeout: float, what: str) -> subprocess.CompletedProcess:
    """Run `command` in its own process group; on timeout kill the whole group (the compiler driver and its cc1plus
    / ld children) and raise KernelUnavailable."""
    try:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    except OSError as e:
        raise KernelUnavailable(f"{what} could not start: {e}") from e
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise KernelUnavailable(f"{what} timed out after {timeout:g} s (${ENV_TIMEOUT} sets the limit)") from None
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def library_path() -> pathlib.Path:
    """Where the compiled kernel for this source, compiler, jaxlib and CPU lives (built by `ensure_built`)."""
    cxx = _compiler()
    version = _run([cxx, "--version"], VERSION_TIMEOUT, f"`{cxx} --version`").stdout
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(_build_command(cxx, "")).encode(), version.encode(),
                 jax.__version__.encode(), _cpu_signature().encode()):
        key.update(part)
    return cache_dir() / f"expert_mlp-{key.hexdigest()[:16]}.so"


def _build(target: pathlib.Path, timeout: float | None = None) -> None:
    """Compile into `target` (via a temporary file and an atomic rename: safe across processes), or raise
    KernelUnavailable (compiler error, or no result within `timeout` seconds, default `build_timeout()`)."""
    timeout = build_timeout() if timeout is None else timeout
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = os.path.join(tmp, target.name)
        proc = _run(_build_command(_compiler(), partial), timeout, f"compiling {SOURCE.name}")
        if proc.returncode != 0:
            raise KernelUnavailable(f"compiling {SOURCE.name} failed:\n{proc.stderr[-4000:]}")
        if not os.path.isfile(partial):
            raise KernelUnavailable(f"compiling {SOURCE.name} failed: the compiler exited with status 0 but wrote "
                                    f"no library\n{proc.stderr[-4000:]}")
        os.replace(partial, target)


def _build_and_register(timeout: float | None) -> str | None:
    try:
        path = library_path()
        if not path.exists():
            _build(path, timeout)
        lib = ctypes.CDLL(str(path))
        jax.ffi.register_ffi_target(FWD_TARGET, jax.ffi.pycapsule(lib.GrinExpertMlpFwd), platform="cpu")
        jax.ffi.register_ffi_target(BWD_TARGET, jax.ffi.pycapsule(lib.GrinExpertMlpBwd), platform="cpu")
        jax.ffi.register_ffi_target(PEER_FWD_TARGET, jax.ffi.pycapsule(lib.GrinPeerFwd), platform="cpu")
        jax.ffi.register_ffi_target(PEER_BWD_TARGET, jax.ffi.pycapsule(lib.GrinPeerBwd), platform="cpu")
        jax.ffi.register_ffi_target(PEER_RETRIEVE_TARGET, jax.ffi.pycapsule(lib.GrinProductKeyRetrieve),
                                    platform="cpu")
        jax.ffi.register_ffi_target(PEER_KEYS_BWD_TARGET, jax.ffi.pycapsule(lib.GrinProductKeyScoresBwd),
                                    platform="cpu")
        jax.ffi.register_ffi_target(ATTENTION_FWD_TARGET, jax.ffi.pycapsule(lib.GrinAttentionFwd), platform="cpu")
        jax.ffi.register_ffi_target(ATTENTION_BWD_TARGET, jax.ffi.pycapsule(lib.GrinAttentionBwd), platform="cpu")
    except (KernelUnavailable, OSError, AttributeError) as e:
        return str(e)
    return None


_BUILD_LOCK = threading.Lock()
_OUTCOME: list = []  # [] before the first attempt, then [None or the reason]


def ensure_built(timeout: float | None = None) -> str | None:
    """Build (unless cached on disk), load and register the kernel, once per process; None when it is ready,
    else the reason it is not (raises only ValueError, for an invalid $GRIN_JAX_KERNEL_BUILD_TIMEOUT). The first
    call does the work synchronously (the compile bounded by `timeout` seconds, default `build_timeout()`); later
    calls return the cached outcome (a failure is not retried). $GRIN_JAX_KERNEL=0 is checked at every call and
    wins."""
    disabled = disabled_reason()
    if disabled is not None:
        return disabled
    with _BUILD_LOCK:
        if not _OUTCOME:
            _OUTCOME.append(_build_and_register(timeout))
        return _OUTCOME[0]


def unavailable_reason() -> str | None:
    """None when the kernel is built and registered, else the reason it is not (builds on the first call)."""
    return ensure_built()


def available() -> bool:
    return ensure_built() is None


def load() -> None:
    """Build, load and register the kernel, or raise KernelUnavailable saying why."""
    reason = ensure_built()
    if reason is not None:
        raise KernelUnavailable(f"the CPU expert-MLP kernel (backend 'kernel') is unavailable: {reason}")


CHUNK_ROWS = 512  # kChunkRows in csrc/expert_mlp.cc


def auto_unavailable(dtype) -> str | None:
    """None when a layer's backend 'auto' runs it on this library (the attention, the dense FFN, PEER), else the
    reason it does not: the platform, the compute dtype, a mesh of more than one device (the custom calls are one
    device's; XLA partitions the plain path) or the library not building here ($GRIN_JAX_KERNEL=0 included)."""
    if jax.default_backend() != "cpu":
        return f"the platform is {jax.default_backend()}, the kernel is CPU-only"
    if jnp.dtype(dtype) != jnp.float32:
        return f"the compute dtype is {jnp.dtype(dtype).name}, the kernel computes in float32"
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and not mesh.empty and mesh.size > 1:
        return f"a mesh of {mesh.size} devices"
    return ensure_built()


def num_threads() -> int:
    """OpenMP threads the kernel uses: $OMP_NUM_THREADS, else the CPUs this process may run on."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def scratch_bytes(tokens: int, top_k: int, d_model: int, d_hidden: int, *, gated: bool = True,
                  threads: int | None = None) -> int:
    """Upper bound of the kernel's own memory beyond its XLA inputs and outputs (which XLA's memory analysis does
    not see), forward or backward: per thread CHUNK_ROWS (2 D + F + Fi) floats and two expert weight-gradient
    partials (kept between calls); per extra thread a [T, D] accumulator; the [T*K] sorted layout."""
    threads = threads or num_threads()
    d_in = 2 * d_hidden if gated else d_hidden
    per_thread = CHUNK_ROWS * (d_model + max(d_model, d_in) + d_hidden + d_in) + 2 * (d_model * d_in + d_hidden * d_model)
    floats = threads * per_thread + (threads - 1) * tokens * d_model
    return 4 * floats + 4 * tokens * top_k


def _fwd_call(x_TD, w_in, w_out, ids_TK, weights_TK, activation_code, save: bool):
    num_slots = ids_TK.size if save else 0
    out_types = (jax.ShapeDtypeStruct(x_TD.shape, jnp.float32),
                 jax.ShapeDtypeStruct((num_slots, w_in.shape[-1]), jnp.float32))
    return jax.ffi.ffi_call(FWD_TARGET, out_types, vmap_method="sequential")(
        x_TD, w_in, w_out, ids_TK, weights_TK, activation=np.int64(activation_code))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _kernel_mlp(x_TD, w_in, w_out, ids_TK, weights_TK, activation_code):
    return _fwd_call(x_TD, w_in, w_out, ids_TK, weights_TK, activation_code, save=False)[0]


def _kernel_mlp_fwd(x_TD, w_in, w_out, ids_TK, weights_TK, activation_code):
    y_TD, pre_MF = _fwd_call(x_TD, w_in, w_out, ids_TK, weights_TK, activation_code, save=True)
    return y_TD, (x_TD, w_in, w_out, ids_TK, weights_TK, pre_MF)


def _kernel_mlp_bwd(activation_code, res, dy_TD):
    x_TD, w_in, w_out, ids_TK, weights_TK, pre_MF = res
    out_types = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (x_TD, w_in, w_out, weights_TK))
    dx, dw_in, dw_out, dweights = jax.ffi.ffi_call(BWD_TARGET, out_types, vmap_method="sequential")(
        x_TD, w_in, w_out, ids_TK, weights_TK, pre_MF, dy_TD.astype(jnp.float32),
        activation=np.int64(activation_code))
    return dx, dw_in, dw_out, None, dweights


_kernel_mlp.defvjp(_kernel_mlp_fwd, _kernel_mlp_bwd)


def kernel_expert_mlp(expert_params: dict, x_TD: jax.Array, expert_ids_TK: jax.Array, weights_TK: jax.Array, *,
                      activation: str = "swiglu") -> jax.Array:
    """y[t] = sum_k weights[t, k] * Expert_{expert_ids[t, k]}(x[t]) by the C++ kernel (CPU only, float32).

    Gated activations pass [w_gate | w_up] as one [E, D, 2F] weight (the parameter pytree is unchanged).
    Raises ValueError unless `supports(activation, result_type(x, expert weights))`, KernelUnavailable when the
    kernel cannot be built here. Expert ids outside [0, E) fail at run time."""
    act = _experts.get_activation(activation)
    check_supported(activation, jnp.result_type(x_TD, *expert_params.values()))
    load()
    f32 = lambda a: a.astype(jnp.float32)
    w_in = (jnp.concatenate([expert_params["w_gate"], expert_params["w_up"]], axis=-1) if act.gated
            else expert_params["w_up"])
    y_TD = _kernel_mlp(f32(x_TD), f32(w_in), f32(expert_params["w_down"]), expert_ids_TK.astype(jnp.int32),
                       f32(weights_TK), ACTIVATION_CODES[activation])
    return y_TD.astype(jnp.result_type(x_TD, *expert_params.values()))
