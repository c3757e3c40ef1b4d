"""``childtuning-report`` from a checkout: ``python report.py [NAME ...]``
(:mod:`childtuning_trainer.cli.reporting`)."""

from childtuning_trainer.cli import reporting

if __name__ == "__main__":
    reporting.run()
