"""RTE fine-tuning; the authors' reserve_p for the chosen mode is used.

``childtuning-train --config=rte --config.mode=D --config.output_dir=runs/rte_D``
(The base configuration's defaults: batch 16, 3 epochs, max length 128, the packaged MiniLM.)
"""

import ml_collections

from childtuning_trainer.configs import glue


def get_config() -> ml_collections.ConfigDict:
    return glue.get_task_config("rte")
