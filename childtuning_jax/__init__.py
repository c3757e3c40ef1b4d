"""childtuning-jax: Child-Tuning (Xu et al., EMNLP 2021) for JAX, Flax and Optax.

Fine-tuning that updates only a child network of a pretrained model by masking gradients before
the optimizer:

* :func:`child_tuning_f` -- ChildTuning-F, a fresh Bernoulli mask each step (task-free).
* :func:`child_tuning_d` -- ChildTuning-D, a fixed mask from Fisher information (task-driven),
  built with :func:`fisher_information` and :func:`fisher_mask`.

The forward pass still uses the whole model. The mask acts on the gradient before the optimizer,
so Adam's moments see masked gradients and decoupled weight decay still applies to every decayed
parameter. The official recipe's order is::

  optax.chain(
      optax.clip_by_global_norm(max_grad_norm),
      child_tuning_d(mask),          # or child_tuning_f(reserve_p, key)
      optax.adamw(learning_rate, weight_decay=0.01, mask=decay_mask),
  )

:func:`flat_update` runs such a chain on a few contiguous buffers (one per dtype and group of
per-leaf flags, built by :func:`flat_layout`) instead of one loop per leaf, with the same results:
:func:`flat_child_tuning_f` and :func:`flat_child_tuning_d` are F and D in that view, and
:meth:`FlatLayout.buffer_flags` turns per-leaf masks (weight decay, anchors) into per-buffer ones,
and :meth:`FlatLayout.view` lets a training loop hold its params as the buffers.
"""

from childtuning_jax.fisher import fisher_information, fisher_mean, fisher_step
from childtuning_jax.flat_update import (
    FlatLayout,
    flat_child_tuning_d,
    flat_child_tuning_f,
    flat_layout,
    flat_update,
    in_leaf_view,
)
from childtuning_jax.optim import HFAdamWState, hf_adamw
from childtuning_jax.paths import keypath_to_str, leaf_names, map_with_name
from childtuning_jax.regularizers import (
    DecayToPretrainedState,
    RecAdamState,
    decay_to_pretrained,
    mixout,
    r3f_loss,
    r3f_noise,
    recadam,
    symmetric_kl,
    top_k_layers_mask,
)
from childtuning_jax.selection import fisher_mask, official_eligibility, percentile_threshold
from childtuning_jax.task_driven import (
    ChildTuningDState,
    child_tuning_d,
    template_child_mask,
    uniform_leaf_names,
)
from childtuning_jax.task_free import ChildTuningFState, check_reserve_p, child_tuning_f

__all__ = [
    "ChildTuningDState",
    "ChildTuningFState",
    "DecayToPretrainedState",
    "FlatLayout",
    "HFAdamWState",
    "RecAdamState",
    "check_reserve_p",
    "child_tuning_d",
    "child_tuning_f",
    "decay_to_pretrained",
    "fisher_information",
    "fisher_mask",
    "fisher_mean",
    "fisher_step",
    "flat_child_tuning_d",
    "flat_child_tuning_f",
    "flat_layout",
    "flat_update",
    "hf_adamw",
    "in_leaf_view",
    "keypath_to_str",
    "leaf_names",
    "map_with_name",
    "mixout",
    "official_eligibility",
    "percentile_threshold",
    "r3f_loss",
    "r3f_noise",
    "recadam",
    "symmetric_kl",
    "template_child_mask",
    "top_k_layers_mask",
    "uniform_leaf_names",
]

__version__ = "0.1.0"
