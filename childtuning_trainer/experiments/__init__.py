"""The paper's experiments as resumable protocols (``sweep.py``) and their report (``report.py``).

* :mod:`.store`: where runs work (``runs/sweep/<run_id>``, git-ignored) and where their results
  accumulate (``experiments/runs/<run_id>.json``, one file per finished run).
* :mod:`.sweep`: runs a list of :class:`~.sweep.RunSpec` one after another, each a ``train.py``
  process sharing JAX's persistent compilation cache, skipping the finished ones.
* :mod:`.protocols`: the run lists of each protocol (seed sweep, few-shot, domain and task
  generalisation, pruning).
* :mod:`.probe`: the linear probe of task generalisation (a frozen encoder, a new linear head).
* :mod:`.report`: Markdown tables, JSON and plots from the accumulated results.
"""
