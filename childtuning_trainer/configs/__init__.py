"""The task configurations of ``childtuning-train`` (ml_collections ConfigDicts, one file per
setting): ``--config=NAME`` names one of them, ``glue`` being the base every other extends."""
