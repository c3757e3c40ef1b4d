"""The Child-Tuning fine-tuning trainer behind ``childtuning-train`` (the ``train`` extra).

One module per idea; imports run one way, from the library (``childtuning_jax``) into here:

* :mod:`~childtuning_trainer.settings` -- the config, checked once into frozen settings;
* :mod:`~childtuning_trainer.tasks` -- the task registry (GLUE is one family) and metrics;
* :mod:`~childtuning_trainer.input_pipeline`, :mod:`~childtuning_trainer.tokenization` -- data;
* :mod:`~childtuning_trainer.objective` -- the model call and the loss (the seam regularisers wrap);
* :mod:`~childtuning_trainer.optimizer_chain` -- the optimizer chain (mode, reserve_p, AdamW);
* :mod:`~childtuning_trainer.mask_rules` -- ChildTuning-D's mask rules and their Fisher pass;
* :mod:`~childtuning_trainer.regularization` -- the comparison regularisers, by name;
* :mod:`~childtuning_trainer.parallel` -- devices, axis, replication, per-host batch shares;
* :mod:`~childtuning_trainer.steps` -- the train, eval and (mapped) Fisher steps;
* :mod:`~childtuning_trainer.run_setup` -- a run's devices, data and model, ready to train;
* :mod:`~childtuning_trainer.progress` -- what the loop carries between steps and checkpoints;
* :mod:`~childtuning_trainer.checkpoints`, :mod:`~childtuning_trainer.outputs` -- what is saved;
* :mod:`~childtuning_trainer.loop` -- the run, ``train_and_evaluate(config)``;
* :mod:`~childtuning_trainer.data_location` -- ``data_dir``, else ``$CHILDTUNING_DATA_DIR``;
* :mod:`~childtuning_trainer.cli` -- the installed commands; ``configs/`` -- their configurations.
"""
