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
    # Every package the code imports, or that a transformers feature it uses needs (jinja2: chat
    # templates). Lower bounds are the versions this project was built and tested with; upper bounds
    # stop before the next release line of the packages whose minor releases break their users
    # (jax 0.11.1 removed a class flax <= 0.12.8 uses). tpu/setup.sh and the notebook install the TPU
    # build of the same jax (JAX_VERSION there; tests/test_tpu_scripts.py checks they agree).
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "etils[epath]>=1.15",
        "transformers>=5.24,<6",
        "tokenizers>=0.23",
        "jinja2>=3.1",
        "sentencepiece>=0.2.3",
        "ml-collections>=1.1.0",
        "safetensors>=0.8.0",
        "huggingface-hub>=2.4",
        "absl-py>=2.5",
        "numpy>=2.0,<3",
        "tqdm>=4.70",
        "tensorboardX>=2.6.5",
        "matplotlib>=3.11",
    ],
    extras_require={
        # torch is only the reference the tests compare against (transformers' PyTorch models).
        # 2.13.0 is the CPU wheel on this project's machines.
        # jax[tpu] brings libtpu, XLA's TPU compiler, for tests/test_aot.py's deviceless compile; a
        # CPU run does not load it (tests set JAX_PLATFORMS=cpu).
        "test": ["pytest>=9.0", "pytest-xdist>=3.8", "torch==2.13.0", "ipython>=8", "hypothesis>=6.150", "wandb>=0.31",
                 "jax[tpu]>=0.10.2,<0.11"],
        # `python -m sqlm_jax.plan --compile`: the TPU compiler on any host, no TPU needed (sqlm_jax/aot.py).
        "aot": ["jax[tpu]>=0.10.2,<0.11"],
        "bench": ["torch==2.13.0", "trl>=1.16"],
        "data": ["datasets>=5.2"],
        "wandb": ["wandb>=0.31"],  # log.wandb_project
    },
)
