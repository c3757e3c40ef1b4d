"""childtuning-jax: Child-Tuning (Xu et al., EMNLP 2021) for JAX, Flax and Optax.

Fine-tuning that updates only a child network of a pretrained model by masking gradients before
the optimizer:

* :func:`child_tuning_f` -- ChildTuning-F, a fresh Bernoulli mask each step (task-free).
* :func:`child_tuning_d` -- ChildTuning-D, a fixed mask from Fisher information (task-driven),
  built with :func:`fisher_information` and :func:`fisher_mask`.
"""

from childtuning_jax.fisher import fisher_information
from childtuning_jax.optim import HFAdamWState, hf_adamw
from childtuning_jax.paths import keypath_to_str, leaf_names, map_with_name
from childtuning_jax.selection import fisher_mask, official_eligibility, percentile_threshold
from childtuning_jax.transforms import (
    ChildTuningDState,
    ChildTuningFState,
    child_tuning_d,
    child_tuning_f,
)

__all__ = [
    "ChildTuningDState",
    "ChildTuningFState",
    "HFAdamWState",
    "child_tuning_d",
    "child_tuning_f",
    "fisher_information",
    "fisher_mask",
    "hf_adamw",
    "keypath_to_str",
    "leaf_names",
    "map_with_name",
    "official_eligibility",
    "percentile_threshold",
]

__version__ = "0.1.0"
