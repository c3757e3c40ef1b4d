"""Our chain as the benchmarks build it: the trainer's (``optimizer_chain.make_optimizer``, with
:mod:`benchmarks.workloads`' settings) per leaf, flat, or flat on params held flat as the trainer
holds them (:mod:`childtuning_trainer.held_flat`), where this checkout has each form."""

from __future__ import annotations

import inspect
from typing import Any

import jax

from benchmarks import workloads
from childtuning_trainer import optimizer_chain


def flat_available() -> bool:
    """Whether this checkout's trainer chain has the flat form (the flat-update change)."""
    return "flat" in inspect.signature(optimizer_chain.make_optimizer).parameters


def uses_flat(flat: bool | None) -> bool:
    """``flat`` where available; ``None``: the trainer's default (flat on accelerators)."""
    if not flat_available():
        return False
    if flat is None:
        settings = optimizer_chain.OptimizerSettings()
        default = getattr(optimizer_chain, "uses_flat_update", None)
        return bool(default(settings)) if default else jax.default_backend() != "cpu"
    return flat


def make_tx(mode: str, params: Any, mask: Any, flat: bool, **held: bool) -> Any:
    """The trainer's chain for ``mode`` (``benchmarks.workloads``' settings), flat or per leaf;
    ``held=True``: ``(chain, layout)`` for params held flat (``make_optimizer(held=True)``)."""
    if not flat:
        return workloads.make_tx(mode, params, mask)

    def child(layout):
        key = jax.random.key(1)
        kwargs = dict(reserve_p=workloads.RESERVE_P, key=key, mask=mask, layout=layout)
        return optimizer_chain.child_transform(mode, **kwargs)

    return optimizer_chain.make_optimizer(child, params, workloads.SETTINGS, flat=True, **held)


def held_available() -> bool:
    """Whether this checkout's trainer holds the params flat with the flat chain."""
    return "held" in inspect.signature(optimizer_chain.make_optimizer).parameters


def ours(mode: str, params: Any, mask: Any, flat: bool) -> tuple[Any, Any, Any]:
    """The trainer's chain, the layout its params are held in (``None``: a tree) and the params
    in that form: with the flat chain, held flat where this checkout holds them so."""
    if not (flat and held_available()):
        return make_tx(mode, params, mask, flat), None, params
    tx, layout = make_tx(mode, params, mask, True, held=True)
    return tx, layout, layout.flatten(params)
