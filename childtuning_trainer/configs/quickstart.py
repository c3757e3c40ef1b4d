"""The quick start: ChildTuning-D on STS-B with the packaged MiniLM, sized for a two-core CPU
(the README quotes its measured time).

``childtuning-train --config=quickstart --config.output_dir=runs/quickstart``
(``make quickstart``). A seeded 2,000-example subset of the
training set for the Fisher pass and two epochs of training, the whole dev set for evaluation;
every other setting is the base configuration's (batch 16, learning rate 2e-5, bucketed padding).
"""

import ml_collections

from childtuning_trainer.configs import glue


def get_config() -> ml_collections.ConfigDict:
    config = glue.get_task_config("stsb")
    config.mode = "D"
    config.max_train_samples = 2000
    config.num_train_epochs = 2
    return config
