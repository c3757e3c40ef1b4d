"""Parity with an independent PyTorch + NumPy statement of the official ChildTuning-D rules.

The reference follows the official code (alibaba/AliceMind, ChildTuning): ``calculate_fisher``
(per-batch backward, ``clip_grad_norm_`` on each ``layer`` tensor, ``grad ** 2 / N`` accumulated,
``np.append`` of every tensor, ``np.percentile``, ``>=``) and ``ChildTuningAdamW`` (the gradient
times the mask, then Hugging Face's AdamW with bias correction and decoupled weight decay), after
global gradient clipping.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import childtuning_jax as ct

torch = pytest.importorskip("torch")

FISHER_MAX_GRAD_NORM = 0.05  # small enough that per-tensor clipping bites here
MAX_GRAD_NORM = 0.2  # global clipping in training, also biting
RESERVE_P = 0.3
LR, WEIGHT_DECAY, BETAS, EPS = 2e-2, 0.01, (0.9, 0.999), 1e-8


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings = torch.nn.Linear(6, 16)
        self.layer = torch.nn.ModuleList([torch.nn.Linear(16, 16) for _ in range(2)])
        self.classifier = torch.nn.Linear(16, 3)

    def forward(self, x):
        h = torch.tanh(self.embeddings(x))
        for layer in self.layer:
            h = torch.tanh(layer(h))
        return self.classifier(h)


def jax_forward(params, x):
    def linear(p, h):
        return h @ p["weight"].T + p["bias"]

    h = jnp.tanh(linear(params["embeddings"], x))
    for i in range(2):
        h = jnp.tanh(linear(params["layer"][str(i)], h))
    return linear(params["classifier"], h)


def jax_loss(params, batch):
    logp = jax.nn.log_softmax(jax_forward(params, batch["x"]))
    return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))


def to_tree(named):
    tree = {}
    for name, value in named.items():
        node = tree
        *parents, leaf = name.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def official_fisher_and_mask(model, batches):
    """calculate_fisher from the official run_glue.py, on this tiny model."""
    gradient_mask = {}
    for name, p in model.named_parameters():
        if "layer" in name:
            gradient_mask[name] = p.new_zeros(p.size())
    n = len(batches)
    for batch in batches:
        logits = model(torch.from_numpy(batch["x"]))
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(batch["y"]).long())
        loss.backward()
        for name, p in model.named_parameters():
            if "layer" in name:
                torch.nn.utils.clip_grad_norm_(p, FISHER_MAX_GRAD_NORM)
                gradient_mask[name] += (p.grad**2) / n
        model.zero_grad()
    fisher = {k: v.clone() for k, v in gradient_mask.items()}
    r = None
    for v in gradient_mask.values():
        v = v.view(-1).cpu().numpy()
        r = v if r is None else np.append(r, v)
    polar = np.percentile(r, (1 - RESERVE_P) * 100)
    masks = {k: (v >= polar) for k, v in gradient_mask.items()}
    return fisher, masks, polar


def official_adamw_step(model, masks, state, step):
    """ChildTuningAdamW.step (mode ChildTuning-D), Hugging Face AdamW with correct_bias."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            grad = p.grad
            if name in masks:
                grad = grad * masks[name]
            m, v = state.setdefault(name, (torch.zeros_like(p), torch.zeros_like(p)))
            m.mul_(BETAS[0]).add_(grad, alpha=1 - BETAS[0])
            v.mul_(BETAS[1]).addcmul_(grad, grad, value=1 - BETAS[1])
            denom = v.sqrt().add_(EPS)
            step_size = LR * math.sqrt(1 - BETAS[1] ** step) / (1 - BETAS[0] ** step)
            p.addcdiv_(m, denom, value=-step_size)
            if "bias" not in name:  # no_decay = ["bias", "LayerNorm.weight"]
                p.add_(p, alpha=-LR * WEIGHT_DECAY)


def _batches():
    rng = np.random.default_rng(0)
    return [
        {
            "x": rng.normal(size=(n, 6)).astype(np.float32) * 2,
            "y": rng.integers(0, 3, size=(n,)).astype(np.int32),
        }
        for n in (8, 8, 8, 5)
    ]


def test_fisher_mask_and_training_match_the_official_rules():
    torch.manual_seed(0)
    model = TorchNet()
    params = to_tree({k: jnp.asarray(v.detach().numpy()) for k, v in model.state_dict().items()})
    batches = _batches()
    initial = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}

    official_fisher, official_masks, polar = official_fisher_and_mask(model, batches)

    # Fisher information: the official values for every 'layer' tensor.
    fisher = ct.fisher_information(jax_loss, params, batches, max_grad_norm=FISHER_MAX_GRAD_NORM)
    named_fisher = dict(zip(ct.leaf_names(fisher), jax.tree.leaves(fisher), strict=True))
    for name, value in official_fisher.items():
        np.testing.assert_allclose(
            named_fisher[name.replace(".", "/")], value.numpy(), rtol=2e-5, atol=1e-12
        )
    # Per-tensor clipping bites here: without it the Fisher values differ.
    unclipped = ct.fisher_information(jax_loss, params, batches)
    assert not np.allclose(unclipped["layer"]["0"]["weight"], fisher["layer"]["0"]["weight"])

    # Mask: identical to the official one on the official Fisher values.
    official_values = to_tree(
        {
            name: jnp.asarray(official_fisher[name].numpy())
            if name in official_fisher
            else jnp.zeros(p.shape)
            for name, p in model.named_parameters()
        }
    )
    assert ct.percentile_threshold(official_values, RESERVE_P) == polar
    mask = ct.fisher_mask(official_values, RESERVE_P)
    named_mask = dict(zip(ct.leaf_names(mask), jax.tree.leaves(mask), strict=True))
    for name, _ in model.named_parameters():
        ours = np.asarray(named_mask[name.replace(".", "/")])
        if name in official_masks:
            np.testing.assert_array_equal(ours, official_masks[name].numpy())
        else:
            assert ours.all(), name  # embeddings and classifier always trained

    # Training: global clipping, then the mask, then AdamW with decoupled decay; 5 steps.
    decay_mask = ct.map_with_name(lambda name, _: "bias" not in name, params)
    tx = optax.chain(
        optax.clip_by_global_norm(MAX_GRAD_NORM),
        ct.child_tuning_d(mask),
        ct.hf_adamw(
            LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY, mask=decay_mask
        ),
    )
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, batch):
        grads = jax.grad(jax_loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    torch_state = {}
    torch_masks = {k: v.float() for k, v in official_masks.items()}
    for step in range(1, 6):
        batch = batches[step % len(batches)]
        params, opt_state = train_step(params, opt_state, batch)

        logits = model(torch.from_numpy(batch["x"]))
        torch.nn.functional.cross_entropy(logits, torch.from_numpy(batch["y"]).long()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        official_adamw_step(model, torch_masks, torch_state, step)
        model.zero_grad()

    named_params = dict(zip(ct.leaf_names(params), jax.tree.leaves(params), strict=True))
    for name, value in model.state_dict().items():
        np.testing.assert_allclose(
            named_params[name.replace(".", "/")], value.numpy(), rtol=1e-5, atol=2e-6
        )
    # Masked-out encoder weights moved only by decoupled weight decay, (1 - lr * wd) per step.
    frozen = ~official_masks["layer.0.weight"].numpy()
    assert frozen.any()
    np.testing.assert_allclose(
        np.asarray(named_params["layer/0/weight"])[frozen],
        initial["layer.0.weight"][frozen] * (1 - LR * WEIGHT_DECAY) ** 5,
        rtol=1e-5,
    )
