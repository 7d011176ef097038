"""grin-jax: GRIN, fine-grained MoE scaling laws, DS-MoE and PEER in JAX."""
from setuptools import find_packages, setup

setup(
    name="grin-jax",
    version="0.1.0",
    description="Mixture-of-Experts language models in JAX: GRIN (SparseMixer-v2), fine-grained MoE scaling laws, DS-MoE, PEER",
    packages=find_packages(include=["grin_jax", "grin_jax.*"]),
    package_data={"grin_jax.moe": ["csrc/*.cc"]},  # the CPU kernel's source, compiled on first use
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "numpy>=1.26",
        "scipy>=1.13",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "tensorflow-datasets>=4.9.10",  # builders and array_record data sources only: TensorFlow is never imported
        "grain>=0.2.18",
        "array-record>=0.8.6",
        "sentencepiece>=0.2.3",
        "absl-py>=2.1",
        "tensorboardX>=2.6",
        "scipy-openblas32>=0.3.29",  # the BLAS of the C++ CPU kernel (grin_jax/moe/cpu_kernel.py)
    ],
    extras_require={
        # torch is pinned: 2.13.0 is the CPU build available on the project's machines; an unpinned torch
        # pulls a multi-GB CUDA build.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "transformers>=5.0", "submitit>=1.5",
                 "peer-pytorch>=0.2.2"],
        "notebooks": ["nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"],
        "slurm": ["submitit>=1.5"],
    },
)
