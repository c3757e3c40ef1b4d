"""``childtuning-launch`` from a checkout: ``python launch.py --num_processes=2 -- --config=rte``
(:mod:`childtuning_trainer.cli.launching`)."""

from childtuning_trainer.cli import launching

if __name__ == "__main__":
    launching.run()
