"""Fine-tuning regularisers to compare with (and combine with) Child-Tuning.

* :func:`decay_to_pretrained` -- L2-SP: decay towards the pretrained weights (optax transform).
* :func:`top_k_layers_mask` -- a ChildTuning-D mask training only the top K encoder layers.
* :func:`mixout` -- Mixout (Lee et al., ICLR 2020): params for a training forward pass.
* :func:`recadam` -- RecAdam (Chen et al., EMNLP 2020): Adam with annealed recall of the
  pretrained weights (optax transform).
* :func:`r3f_loss`, :func:`r3f_noise`, :func:`symmetric_kl` -- R3F (Aghajanyan et al., ICLR 2021).
"""

from childtuning_jax.regularizers.decay import DecayToPretrainedState, decay_to_pretrained
from childtuning_jax.regularizers.mixout import linear_kernels, mixout
from childtuning_jax.regularizers.r3f import r3f_loss, r3f_noise, symmetric_kl
from childtuning_jax.regularizers.recadam import (
    RecAdamState,
    anneal_lambda,
    default_anchor_mask,
    recadam,
)
from childtuning_jax.regularizers.top_k import top_k_layers_mask

__all__ = [
    "DecayToPretrainedState",
    "RecAdamState",
    "anneal_lambda",
    "decay_to_pretrained",
    "default_anchor_mask",
    "linear_kernels",
    "mixout",
    "r3f_loss",
    "r3f_noise",
    "recadam",
    "symmetric_kl",
    "top_k_layers_mask",
]
