"""Multi-host runs with JAX's own runtime: start-up, and the few agreements hosts must reach.

Every host runs the same program on the same inputs: the mesh spans all devices, the sampler's outputs
are gathered to every host, so the host-side text work sees identical data everywhere. Only the costly
host work (running generated programs) is split across hosts, and only process 0 writes files.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import jax
import numpy as np


def initialize(cfg) -> None:
    """Starts jax.distributed where the run spans hosts; a no-op on one host.

    `cfg` is the config's `distributed` block. A coordinator address (config or the environment's
    JAX_COORDINATOR_ADDRESS) means an explicit cluster: CPU or GPU hosts, or a local multi-process test.
    On a TPU pod slice the workers find each other themselves.
    """
    address = cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        if cfg.cpu_collectives:
            jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
        num_processes = cfg.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0")) or None
        process_id = cfg.process_id if cfg.process_id is not None else \
            (int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None)
        jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                                   process_id=process_id)
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):  # a multi-host TPU slice
        jax.distributed.initialize()


def any_host(flag: bool) -> bool:
    """True on every host if `flag` is True on any (e.g. one host was sent SIGTERM)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(np.asarray(multihost_utils.process_allgather(np.array([flag]))).any())


def split_across_hosts(fn: Callable[[Sequence], np.ndarray], items: Sequence, width: int) -> np.ndarray:
    """`fn` applied to `items`, each host doing every `process_count`-th item; `[len(items), width]` on
    every host.

    `fn(items) -> [len(items), width]` floats. The results are combined with one all-gather, so each
    host ends with all of them, in order.
    """
    count, index = jax.process_count(), jax.process_index()
    mine = list(range(index, len(items), count))
    local = np.zeros((len(items), width), np.float64)
    if mine:
        local[mine] = fn([items[i] for i in mine])
    if count == 1:
        return local
    from jax.experimental import multihost_utils
    gathered = np.asarray(multihost_utils.process_allgather(local))  # [hosts, items, width]
    return gathered.sum(axis=0)  # each row is non-zero on its own host only
