"""The installed commands (``pyproject.toml``'s ``[project.scripts]``), each a module with a
``run()`` entry: ``childtuning-train`` (:mod:`.training`), ``childtuning-sweep``
(:mod:`.sweeping`), ``childtuning-report`` (:mod:`.reporting`) and ``childtuning-launch``
(:mod:`.launching`). The repository's ``train.py``, ``sweep.py``, ``report.py`` and ``launch.py``
call the same entries."""
