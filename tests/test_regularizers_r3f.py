"""R3F against a direct two-pass computation and fairseq's loss (examples/rxf) restated in torch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

import childtuning_jax as ct

EPS = 1e-2  # larger than fairseq's 1e-5 so the two passes differ visibly


def toy_params(num_labels=3, seed=0):
    rng = np.random.default_rng(seed)

    def r(*shape):
        return jnp.asarray(rng.normal(size=shape).astype(np.float32))

    return {
        "embeddings": {"word_embeddings": {"embedding": r(11, 6)}},
        "layer": {"kernel": r(6, 6), "bias": r(6)},
        "classifier": {"kernel": r(6, num_labels), "bias": r(num_labels)},
    }


def toy_apply(params, batch, rng, perturb_embeddings=None):
    """Embedding lookup (+ perturbation), mean-pool, dropout(0.1), tanh layer, linear head."""
    e = params["embeddings"]["word_embeddings"]["embedding"][batch["ids"]]
    if perturb_embeddings is not None:
        e = perturb_embeddings(e)
    x = e.mean(axis=1)
    keep = jax.random.bernoulli(rng, 0.9, x.shape)
    x = jnp.where(keep, x / 0.9, 0.0)
    h = jnp.tanh(x @ params["layer"]["kernel"] + params["layer"]["bias"])
    return h @ params["classifier"]["kernel"] + params["classifier"]["bias"]


def cross_entropy(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])


BATCH = {
    "ids": jnp.asarray(np.random.default_rng(1).integers(0, 11, size=(4, 5))),
    "labels": jnp.asarray([0, 2, 1, 2]),
}


def direct(params, batch, rng, *, lambda_=1.0, noise_type="uniform", detach=True):
    """The two passes written out: keys from split(rng, 3) = (clean, noisy, noise)."""
    clean_key, noisy_key, noise_key = jax.random.split(rng, 3)
    clean = toy_apply(params, batch, clean_key)

    def perturb(e):
        noise = ct.r3f_noise(noise_key, e.shape, EPS, noise_type)
        return (jax.lax.stop_gradient(e) if detach else e) + noise

    noisy = toy_apply(params, batch, noisy_key, perturb)
    log_c, log_n = jax.nn.log_softmax(clean), jax.nn.log_softmax(noisy)
    sym = jnp.sum(jnp.exp(log_c) * (log_c - log_n) + jnp.exp(log_n) * (log_n - log_c), -1)
    return cross_entropy(clean, batch) + lambda_ * sym, clean, noisy


@pytest.mark.parametrize("noise_type", ["uniform", "normal"])
def test_loss_equals_direct_two_pass_and_fairseq(noise_type):
    params, rng = toy_params(), jax.random.key(4)
    loss_fn = ct.r3f_loss(toy_apply, cross_entropy, eps=EPS, lambda_=0.7, noise_type=noise_type)
    ours = loss_fn(params, BATCH, rng)
    expected, clean, noisy = direct(params, BATCH, rng, lambda_=0.7, noise_type=noise_type)
    assert ours.shape == (4,)
    np.testing.assert_allclose(ours, expected, rtol=1e-6)
    # fairseq's batch loss: sum of NLL + lambda * (symmetric KL sum / B) * B.
    c, n = torch.tensor(np.asarray(clean)), torch.tensor(np.asarray(noisy))
    symm_kl = (
        F.kl_div(
            F.log_softmax(n, -1, dtype=torch.float32),
            F.softmax(c, -1, dtype=torch.float32),
            None,
            None,
            "sum",
        )
        + F.kl_div(
            F.log_softmax(c, -1, dtype=torch.float32),
            F.softmax(n, -1, dtype=torch.float32),
            None,
            None,
            "sum",
        )
    ) / n.size(0)
    labels = torch.tensor(np.asarray(BATCH["labels"]), dtype=torch.long)
    nll = F.nll_loss(F.log_softmax(c, -1, dtype=torch.float32), labels, reduction="sum")
    fairseq = nll + 0.7 * symm_kl * labels.numel()
    np.testing.assert_allclose(float(ours.sum()), float(fairseq), rtol=1e-5)
    assert float(symm_kl) > 1e-8  # the noisy pass differs


@pytest.mark.parametrize("detach", [True, False])
def test_gradients_through_both_passes(detach):
    params, rng = toy_params(), jax.random.key(2)
    loss_fn = ct.r3f_loss(toy_apply, cross_entropy, eps=EPS, detach_noisy_embeddings=detach)
    grads = jax.jit(jax.grad(lambda p: loss_fn(p, BATCH, rng).mean()))(params)
    expected = jax.jit(jax.grad(lambda p: direct(p, BATCH, rng, detach=detach)[0].mean()))(params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, expected
    )
    clean_only = jax.grad(
        lambda p: cross_entropy(toy_apply(p, BATCH, jax.random.split(rng, 3)[0]), BATCH).mean()
    )(params)
    diff = np.abs(grads["layer"]["kernel"] - clean_only["layer"]["kernel"]).max()
    assert diff > 1e-6  # the penalty contributes


def test_detach_changes_only_the_embedding_gradient():
    params, rng = toy_params(), jax.random.key(2)
    detached = jax.grad(
        lambda p: ct.r3f_loss(toy_apply, cross_entropy, eps=EPS)(p, BATCH, rng).sum()
    )(params)
    attached = jax.grad(
        lambda p: ct.r3f_loss(toy_apply, cross_entropy, eps=EPS, detach_noisy_embeddings=False)(
            p, BATCH, rng
        ).sum()
    )(params)
    np.testing.assert_allclose(detached["layer"]["kernel"], attached["layer"]["kernel"], rtol=1e-6)
    table_d = detached["embeddings"]["word_embeddings"]["embedding"]
    table_a = attached["embeddings"]["word_embeddings"]["embedding"]
    assert np.abs(table_d - table_a).max() > 1e-7


def test_regression_penalty_is_squared_difference():
    params, rng = toy_params(num_labels=1), jax.random.key(9)
    targets = jnp.asarray([0.5, -1.0, 2.0, 0.0])

    def mse(logits, batch):
        return jnp.square(logits[:, 0] - targets)

    ours = ct.r3f_loss(toy_apply, mse, eps=EPS, lambda_=2.0, regression=True)(params, BATCH, rng)
    _, clean, noisy = direct(params, BATCH, rng)
    expected = mse(clean, BATCH) + 2.0 * jnp.square(noisy[:, 0] - clean[:, 0])
    np.testing.assert_allclose(ours, expected, rtol=1e-6)


def test_noise_within_eps_and_distribution():
    key = jax.random.key(0)
    uniform = np.asarray(ct.r3f_noise(key, (200_000,), eps=1e-5))
    assert np.abs(uniform).max() <= 1e-5
    np.testing.assert_allclose(uniform.std(), 1e-5 / np.sqrt(3), rtol=0.01)
    assert abs(uniform.mean()) < 1e-7
    normal = np.asarray(ct.r3f_noise(key, (200_000,), eps=1e-5, noise_type="normal"))
    np.testing.assert_allclose(normal.std(), 1e-5, rtol=0.01)
    assert abs(normal.mean()) < 1e-7
    assert ct.r3f_noise(key, (2, 3), dtype=jnp.bfloat16).dtype == jnp.bfloat16

    # The perturbation the loss applies: e + noise with |noise| <= eps, in e's shape.
    seen = []

    def spy_apply(params, batch, rng, perturb_embeddings):
        if perturb_embeddings is not None:
            seen.append(np.asarray(perturb_embeddings(jnp.zeros((4, 5, 6)))))
        return toy_apply(params, batch, rng, None)

    ct.r3f_loss(spy_apply, cross_entropy, eps=EPS)(toy_params(), BATCH, key)
    assert len(seen) == 1 and seen[0].shape == (4, 5, 6)
    assert 0 < np.abs(seen[0]).max() <= EPS


def test_symmetric_kl_properties():
    a = jnp.asarray([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]])
    b = jnp.asarray([[0.5, 2.5, 0.0], [0.0, 0.0, 0.0]])
    out = ct.symmetric_kl(a, b)
    assert out.shape == (2,) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, ct.symmetric_kl(b, a), rtol=1e-6)
    assert out[1] == 0.0 and out[0] > 0
    assert ct.symmetric_kl(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)).dtype == jnp.float32


def test_errors():
    loss_fn = ct.r3f_loss(toy_apply, cross_entropy)
    with pytest.raises(ValueError, match="rng"):
        loss_fn(toy_params(), BATCH, None)
    with pytest.raises(ValueError, match="noise_type"):
        ct.r3f_loss(toy_apply, cross_entropy, noise_type="gaussian")
    with pytest.raises(ValueError, match="eps"):
        ct.r3f_loss(toy_apply, cross_entropy, eps=0.0)
    with pytest.raises(ValueError, match="eps"):
        ct.r3f_noise(jax.random.key(0), (2,), eps=-1.0)
