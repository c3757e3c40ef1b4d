"""RTE fine-tuning; the authors' reserve_p for the chosen mode is used.

``python train.py --config=configs/rte.py --config.mode=D --config.data_dir=../shared/glue``
(The base configuration's defaults: batch 16, 3 epochs, max length 128, the packaged MiniLM.)
"""

import ml_collections

from configs import glue


def get_config() -> ml_collections.ConfigDict:
    return glue.get_task_config("rte")
