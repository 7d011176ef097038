"""The dispatch backend 'kernel': the fused dropless expert MLP as a C++ XLA FFI custom call for CPU.

Axes: T tokens, K slots per token, M = T*K token-slots, E experts, D model, F expert hidden, Fi = 2F (gated) or F.

`kernel_expert_mlp` has the contract of `gmm.tiled_expert_mlp` (and of every dispatch backend):
    y[t] = sum_k weights[t, k] * Expert_{expert_ids[t, k]}(x[t]),  exact and dropless,
differentiable in x, the expert weights and the combine weights (a `jax.custom_vjp` over two FFI calls).
The kernel (csrc/expert_mlp.cc) counting-sorts the token-slots by expert and runs every expert's matmuls as one
OpenBLAS sgemm over its rows (no padding, no tiles), with OpenMP loops for the gathers, the activation and the
combine. Computation is float32 (other dtypes are cast in and out). Memory: the forward saves the pre-activations
[M, Fi] (as the dense FFN saves [T, Fi]); scratch is 2 M D + M F floats forward and 3 M D + M F + M Fi backward.

Build: on first use the source is compiled with the system C++ compiler ($CXX, else g++ / c++; -O3 -march=native
-fopenmp) against jaxlib's FFI headers and the OpenBLAS of the `scipy-openblas32` wheel, into a cache folder
($GRIN_JAX_KERNEL_CACHE, default ~/.cache/grin_jax/kernels) keyed by a hash of the source, the flags, the
compiler, jaxlib and the CPU; later processes load the cached library. `available()` says whether this worked
(`unavailable_reason()` says why not); 'auto' then falls back to 'tiled'.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from grin_jax.moe import experts as _experts

SOURCE = pathlib.Path(__file__).with_name("csrc") / "expert_mlp.cc"
ACTIVATION_CODES = {"swiglu": 0, "geglu": 1, "gelu": 2, "relu": 3}  # as the enum in csrc/expert_mlp.cc
FWD_TARGET, BWD_TARGET = "grin_expert_mlp_fwd", "grin_expert_mlp_bwd"
CXX_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC")


class KernelUnavailable(RuntimeError):
    """The CPU kernel could not be built or loaded here (the message says why)."""


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("GRIN_JAX_KERNEL_CACHE") or
                        pathlib.Path.home() / ".cache" / "grin_jax" / "kernels")


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


def library_path() -> pathlib.Path:
    """Where the compiled kernel for this source, compiler, jaxlib and CPU lives (built by `load`)."""
    cxx = _compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(_build_command(cxx, "")).encode(), version.encode(),
                 jax.__version__.encode(), _cpu_signature().encode()):
        key.update(part)
    return cache_dir() / f"expert_mlp-{key.hexdigest()[:16]}.so"


def _build(target: pathlib.Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # then an atomic rename: safe across processes
        partial = os.path.join(tmp, target.name)
        proc = subprocess.run(_build_command(_compiler(), partial), capture_output=True, text=True)
        if proc.returncode != 0:
            raise KernelUnavailable(f"compiling {SOURCE.name} failed:\n{proc.stderr[-4000:]}")
        os.replace(partial, target)


@functools.cache
def _load_or_error() -> str | None:
    """Build (if needed), load and register the FFI targets once per process; None on success, else why not."""
    try:
        path = library_path()
        if not path.exists():
            _build(path)
        lib = ctypes.CDLL(str(path))
        jax.ffi.register_ffi_target(FWD_TARGET, jax.ffi.pycapsule(lib.GrinExpertMlpFwd), platform="cpu")
        jax.ffi.register_ffi_target(BWD_TARGET, jax.ffi.pycapsule(lib.GrinExpertMlpBwd), platform="cpu")
    except (KernelUnavailable, OSError, AttributeError) as e:
        return str(e)
    return None


def unavailable_reason() -> str | None:
    """None when the kernel is built and registered, else the reason it is not."""
    return _load_or_error()


def available() -> bool:
    return _load_or_error() is None


def load() -> None:
    """Build, load and register the kernel, or raise KernelUnavailable saying why."""
    reason = _load_or_error()
    if reason is not None:
        raise KernelUnavailable(f"the CPU expert-MLP kernel (backend 'kernel') is unavailable: {reason}")


CHUNK_ROWS = 512  # kChunkRows in csrc/expert_mlp.cc


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
    """y[t] = sum_k weights[t, k] * Expert_{expert_ids[t, k]}(x[t]) by the C++ kernel (CPU only; float32 inside).

    Gated activations pass [w_gate | w_up] as one [E, D, 2F] weight (the parameter pytree is unchanged).
    Raises KernelUnavailable when the kernel cannot be built here. Expert ids outside [0, E) fail at run time."""
    load()
    act = _experts.get_activation(activation)
    f32 = lambda a: a.astype(jnp.float32)
    w_in = (jnp.concatenate([expert_params["w_gate"], expert_params["w_up"]], axis=-1) if act.gated
            else expert_params["w_up"])
    y_TD = _kernel_mlp(f32(x_TD), f32(w_in), f32(expert_params["w_down"]), expert_ids_TK.astype(jnp.int32),
                       f32(weights_TK), ACTIVATION_CODES[activation])
    return y_TD.astype(jnp.result_type(x_TD, expert_params["w_up"]))
