"""``childtuning-sweep`` from a checkout: ``python sweep.py --protocol=fewshot ...``
(:mod:`childtuning_trainer.cli.sweeping`)."""

from childtuning_trainer.cli import sweeping

if __name__ == "__main__":
    sweeping.run()
