"""sqlm_jax: Self-Questioning Language Models (arXiv 2508.03682) in JAX."""
from setuptools import find_packages, setup

setup(
    name="sqlm_jax",
    version="0.1.0",
    description="Self-play RL for language models (SQLM) in JAX / Flax NNX",
    python_requires=">=3.11",
    packages=find_packages(include=["sqlm_jax", "sqlm_jax.*"]),
    package_data={"sqlm_jax": ["assets/**/*", "tasks/data/*"]},
    include_package_data=True,
    # Lower bounds are the versions this project was built and tested with.
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "transformers>=5.24",
        "tokenizers>=0.23",
        "sentencepiece>=0.2.3",
        "ml-collections>=1.1.0",
        "safetensors>=0.8.0",
        "huggingface-hub>=2.4",
        "absl-py>=2.5",
        "numpy>=2.0",
        "tqdm>=4.70",
        "tensorboardX>=2.6.5",
        "matplotlib>=3.11",
    ],
    extras_require={
        # torch is only the reference the tests compare against (transformers' PyTorch models).
        # 2.13.0 is the CPU wheel on this project's machines.
        "test": ["pytest>=9.0", "torch==2.13.0", "ipython>=8"],
        "bench": ["torch==2.13.0", "trl>=1.16"],
        "data": ["datasets>=5.2"],
    },
)
