"""``childtuning-train`` from a checkout: ``python train.py --config=rte --config.output_dir=...``
(:mod:`childtuning_trainer.cli.training`; ``--help`` lists every setting)."""

from childtuning_trainer.cli import training

if __name__ == "__main__":
    training.run()
