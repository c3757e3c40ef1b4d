"""The paper's experiments as resumable protocols (``sweep.py``) and their reports (``report.py``).

* :mod:`.store`: where runs work (``runs/sweep/<run_id>``, git-ignored) and where their results
  accumulate (``experiments/runs.jsonl`` and ``experiments/probes.jsonl``, a line a finished run
  or probe).
* :mod:`.runner`: runs a list of :class:`~.store.RunSpec` one after another, each a ``train.py``
  process sharing JAX's persistent compilation cache, skipping the finished ones.
* :mod:`.protocols`: the run lists of each protocol (seed sweep, few-shot, domain and task
  generalisation, pruning) and their ``protocol.json``.
* :mod:`.probe`: the linear probe of task generalisation (a frozen encoder, a new linear head).
* :mod:`.statistics`, :mod:`.tables`, :mod:`.figures`: the numbers, Markdown tables and PNG plots of
  the results; :mod:`.protocol_reports`: one report per protocol from them.
"""
