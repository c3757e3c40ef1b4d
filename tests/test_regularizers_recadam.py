"""RecAdam against the reference optimizer (Sanyuan-Chen/RecAdam, RecAdam.py) restated in torch
(:func:`benchmarks.reference.reference_recadam`)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import childtuning_jax as ct
from benchmarks.reference import reference_recadam
from childtuning_jax.paths import map_with_name


def _tree(seed):
    rng = np.random.default_rng(seed)

    def r(*shape):
        return rng.normal(size=shape).astype(np.float32)

    return {
        "bert": {
            "embeddings": {"word_embeddings": {"embedding": r(5, 3)}},
            "encoder": {"layer": {"0": {"kernel": r(3, 4), "bias": r(4)}}},
        },
        "classifier": {"kernel": r(4, 2), "bias": r(2)},
    }


def _is_bias(name):
    return name.endswith("bias")


def _run_both(
    *,
    steps=8,
    lr=1e-2,
    weight_decay=0.0,
    anneal_fun="sigmoid",
    anneal_k=1.0,
    anneal_t0=3,
    anneal_w=1.0,
    pretrain_cof=20.0,
    eps=1e-6,
    grad_mask=None,
    schedule=False,
    jit=False,
):
    """Runs the reference (torch) and ``ct.recadam`` (optionally after child_tuning_d) on the same
    gradients; returns the two final param trees as flat name -> array dicts."""
    pretrained = _tree(0)
    start = jax.tree.map(lambda a, b: a + 0.1 * b, pretrained, _tree(1))
    names = ct.leaf_names(start)
    rng = np.random.default_rng(2)
    grads = [
        [rng.normal(size=leaf.shape).astype(np.float32) for leaf in jax.tree.leaves(start)]
        for _ in range(steps)
    ]
    masks = jax.tree.leaves(grad_mask) if grad_mask is not None else None

    # Reference: four groups as run_glue_with_RecAdam.py (decay x anchored).
    torch_params = [torch.tensor(np.array(x), requires_grad=True) for x in jax.tree.leaves(start)]
    torch_pre = [torch.tensor(np.array(x)) for x in jax.tree.leaves(pretrained)]
    groups = []
    for anchored in (True, False):
        for decayed in (True, False):
            idx = [
                i
                for i, n in enumerate(names)
                if ("classifier" not in n) == anchored and (not _is_bias(n)) == decayed
            ]
            groups.append(
                {
                    "params": [torch_params[i] for i in idx],
                    "pretrain_params": [torch_pre[i] for i in idx],
                    "weight_decay": weight_decay if decayed else 0.0,
                    "anneal_w": anneal_w if anchored else 0.0,
                }
            )
    # The settings both optimizers take under the same names.
    shared = dict(
        eps=eps,
        anneal_fun=anneal_fun,
        anneal_k=anneal_k,
        anneal_t0=anneal_t0,
        pretrain_cof=pretrain_cof,
    )
    opt = reference_recadam(groups, lr=lr, **shared)
    sched = (
        torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / steps))
        if schedule
        else None
    )
    for step_grads in grads:
        for i, (p, g) in enumerate(zip(torch_params, step_grads, strict=True)):
            g = g * masks[i] if masks is not None else g
            p.grad = torch.tensor(g)
        opt.step()
        if sched is not None:
            sched.step()

    learning_rate = optax.linear_schedule(lr, 0.0, steps) if schedule else lr
    tx = ct.recadam(
        learning_rate,
        pretrained,
        weight_decay=weight_decay,
        anneal_w=anneal_w,
        weight_decay_mask=lambda p: map_with_name(lambda n, _: not _is_bias(n), p),
        **shared,
    )
    if grad_mask is not None:
        tx = optax.chain(ct.child_tuning_d(grad_mask), tx)
    params = jax.tree.map(jnp.asarray, start)
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    treedef = jax.tree.structure(start)
    for step_grads in grads:
        updates, state = update(jax.tree.unflatten(treedef, step_grads), state, params)
        params = optax.apply_updates(params, updates)

    ours = dict(zip(names, (np.asarray(x) for x in jax.tree.leaves(params)), strict=True))
    ref = dict(zip(names, (p.detach().numpy() for p in torch_params), strict=True))
    moved = max(
        float(np.abs(ref[n] - np.asarray(x)).max())
        for n, x in zip(names, jax.tree.leaves(start), strict=True)
    )
    assert moved > 1e-3  # the test would be vacuous if nothing moved
    return ours, ref


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_reference_across_the_annealing_midpoint(weight_decay):
    ours, ref = _run_both(weight_decay=weight_decay)
    for name in ref:
        np.testing.assert_allclose(ours[name], ref[name], rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("anneal_fun", ["linear", "constant"])
def test_matches_reference_other_schedules(anneal_fun):
    ours, ref = _run_both(anneal_fun=anneal_fun, anneal_t0=5, weight_decay=0.05)
    for name in ref:
        np.testing.assert_allclose(ours[name], ref[name], rtol=0, atol=1e-6, err_msg=name)


def test_matches_reference_with_lr_schedule_and_default_strength_under_jit():
    ours, ref = _run_both(lr=2e-4, pretrain_cof=5000.0, schedule=True, weight_decay=0.01, jit=True)
    for name in ref:
        np.testing.assert_allclose(ours[name], ref[name], rtol=0, atol=1e-6, err_msg=name)


def test_anneal_w_zero_is_plain_adam_everywhere():
    ours, ref = _run_both(anneal_w=0.0, weight_decay=0.1)
    for name in ref:
        np.testing.assert_allclose(ours[name], ref[name], rtol=0, atol=1e-6, err_msg=name)


def test_chained_after_child_tuning_d_matches_reference_on_masked_grads():
    rng = np.random.default_rng(5)
    mask = jax.tree.map(lambda x: rng.random(x.shape) < 0.5, _tree(0))
    ours, ref = _run_both(grad_mask=mask, weight_decay=0.1, jit=True)
    for name in ref:
        np.testing.assert_allclose(ours[name], ref[name], rtol=0, atol=1e-6, err_msg=name)


def test_unanchored_leaf_is_plain_adam_and_anchor_term_pulls_back():
    pretrained = {"a": jnp.zeros(3), "classifier": jnp.zeros(3)}
    params = {"a": jnp.ones(3), "classifier": jnp.ones(3)}
    grads = {"a": jnp.zeros(3), "classifier": jnp.zeros(3)}
    # Before the midpoint lambda ~ 0: with zero gradients only the recall term moves "a".
    tx = ct.recadam(0.01, pretrained, anneal_k=1.0, anneal_t0=100, pretrain_cof=10.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    lam = 1 / (1 + math.exp(99))
    np.testing.assert_allclose(updates["a"], -0.01 * (1 - lam) * 10.0, rtol=1e-6)
    np.testing.assert_array_equal(updates["classifier"], 0.0)


def test_anchor_mask_forms_agree():
    pretrained = _tree(0)
    params = jax.tree.map(lambda x: x + 1.0, pretrained)
    grads = jax.tree.map(jnp.ones_like, params)
    default = ct.recadam(0.01, pretrained, pretrain_cof=3.0, anneal_t0=1)
    as_tree = ct.recadam(
        0.01,
        pretrained,
        pretrain_cof=3.0,
        anneal_t0=1,
        anchor_mask=map_with_name(lambda n, _: "classifier" not in n, params),
    )
    as_arrays = ct.recadam(
        0.01,
        pretrained,
        pretrain_cof=3.0,
        anneal_t0=1,
        anchor_mask=map_with_name(lambda n, x: np.full(x.shape, "classifier" not in n), params),
    )
    expected, _ = default.update(grads, default.init(params), params)
    for tx in (as_tree, as_arrays):
        got, _ = tx.update(grads, tx.init(params), params)
        jax.tree.map(np.testing.assert_allclose, got, expected)
    # step 1, lambda = 0.5: Adam -0.005, then recall -0.01 * 0.5 * 3 * (1 - 0.005); head: -0.01.
    kernel = expected["bert"]["encoder"]["layer"]["0"]["kernel"]
    np.testing.assert_allclose(kernel, -0.005 - 0.015 * 0.995, rtol=1e-4)
    np.testing.assert_allclose(expected["classifier"]["kernel"], -0.01, rtol=1e-4)


def test_errors():
    params = _tree(0)
    with pytest.raises(ValueError, match="anneal_fun"):
        ct.recadam(0.01, params, anneal_fun="cosine")
    with pytest.raises(ValueError, match="anneal_t0"):
        ct.recadam(0.01, params, anneal_fun="linear", anneal_t0=0)
    tx = ct.recadam(0.01, params)
    state = tx.init(params)
    with pytest.raises(ValueError, match="needs the params"):
        tx.update(params, state)
    bad = jax.tree.map(lambda x: x, params)
    bad["classifier"]["kernel"] = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"classifier/kernel.*\(4, 3\)"):
        ct.recadam(0.01, bad).init(params)


def test_anchor_mask_true_anchors_the_head_too():
    pretrained = {"a": jnp.zeros(3), "classifier": jnp.zeros(3)}
    params = {"a": jnp.ones(3), "classifier": jnp.ones(3)}
    grads = jax.tree.map(jnp.zeros_like, params)
    tx = ct.recadam(0.01, pretrained, anneal_t0=100, pretrain_cof=10.0, anchor_mask=True)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["classifier"], updates["a"])
    assert float(updates["classifier"][0]) < -0.09
