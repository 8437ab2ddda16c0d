"""``python -m sqlm_jax.plots WORKDIR ...``: see ``sqlm_jax.plots.main``."""

from sqlm_jax.plots import main

if __name__ == "__main__":  # importing this module (a tool listing the package) draws nothing
    main()
