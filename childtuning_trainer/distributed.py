"""Multi-process runs on JAX's own multi-controller runtime (``jax.distributed``).

A run is one Python process per host, each driving its local devices. ``initialize(settings)``
joins the processes before JAX starts its backend: ``config.coordinator_address``,
``config.num_processes`` and ``config.process_id`` (checked by ``settings.parallelism_settings``)
go to ``jax.distributed.initialize``; left unset, a cluster JAX detects by itself (a Cloud TPU pod
slice, Slurm, Open MPI) is joined with no arguments, and anywhere else the run is a single
process. On CPU the processes reduce over
gloo (``jax_cpu_collectives_implementation``).

Process 0 is the writer: it alone writes logs, TensorBoard, JSON results and the saved model
(:func:`is_writer`); every process takes part in checkpoints (orbax coordinates them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
from jax.experimental import multihost_utils

if TYPE_CHECKING:
    from childtuning_trainer.settings import ParallelismSettings


def cluster_detected() -> bool:
    """Whether JAX's cluster detection finds an environment (TPU pod slice, Slurm, Open MPI)."""
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:  # the detection moved: ask for the keys instead
        return False
    return any(
        not env.opt_in_only_method and env.is_env_present() for env in ClusterEnv._cluster_types
    )


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:
        return False
    return xla_bridge.backends_are_initialized()


def initialize(settings: ParallelismSettings) -> None:
    """Joins this process to the run's processes (once per process), or does nothing.

    Raises:
      ValueError: JAX already started in this process (set the keys before any JAX work, as
        ``train.py`` does), or a process already joined with other settings.
    """
    explicit = settings.explicit
    address, num_processes, process_id = (
        settings.coordinator_address,
        settings.num_processes,
        settings.process_id,
    )
    if jax.distributed.is_initialized():
        if explicit and (jax.process_count(), jax.process_index()) != (num_processes, process_id):
            raise ValueError(
                f"This process already runs as process {jax.process_index()} of "
                f"{jax.process_count()}; config asks for {process_id} of {num_processes}."
            )
        return
    if not explicit and (_backend_started() or not cluster_detected()):
        return  # a single process
    if _backend_started():
        raise ValueError(
            "config.coordinator_address is set, but JAX has already started in this process; "
            "a multi-process run must set it before any JAX work (train.py or launch.py)."
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(address, num_processes, process_id)
    else:
        jax.distributed.initialize()


def is_writer() -> bool:
    """True in the process that writes the run's files (process 0)."""
    return jax.process_index() == 0


def broadcast(tree: Any) -> Any:
    """Process 0's value of ``tree`` (host arrays) in every process; ``tree`` itself if alone."""
    if jax.process_count() == 1:
        return tree
    return multihost_utils.broadcast_one_to_all(tree)
