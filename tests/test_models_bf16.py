"""bfloat16 compute with float32 parameters: the embeddings' gradients stay float32 (no bfloat16
scatter-add, no cast of a whole table), and the lookups give the values of ``nnx.Embed``."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models
from flax import nnx

from childtuning_jax.models import from_config
from childtuning_jax.models.blocks import lookup


def _grad_program(dtype) -> str:
    config = tiny_models.tiny_bert_config(num_layers=1)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.1
    module = from_config(config, seed=0, dtype=dtype)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 50, (4, 8)), jnp.int32)
    types = jnp.asarray(np.arange(8) % 2)[None].repeat(4, 0)

    def loss(p):
        model = nnx.merge(graphdef, p, rest)
        out = model(
            ids, jnp.ones_like(ids), types, deterministic=False, dropout_rng=jax.random.key(0)
        )
        return jnp.sum(out.astype(jnp.float32))

    return jax.jit(jax.grad(loss)).lower(params).as_text()


def test_bfloat16_gradient_has_no_bfloat16_scatter_or_table_cast():
    text = _grad_program(jnp.bfloat16)
    scatters = re.findall(r"stablehlo.scatter.*?\) -> tensor<([^>]*)>", text, re.S)
    assert not [t for t in scatters if t.endswith("bf16")], scatters
    table_casts = re.findall(r"convert %\S+ : \(tensor<50x16xf32>\) -> tensor<50x16xbf16>", text)
    assert table_casts == []  # the word table (50 x 16) is read in float32, rows cast after


@pytest.mark.parametrize("rows", [2, 50])
def test_lookup_gives_embed_values_and_float32_gradient(rows):
    embed = nnx.Embed(rows, 8, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, rows, (3, 5)), jnp.int32)
    got = lookup(embed, ids)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(embed(ids), np.float32))
    graphdef, state = nnx.split(embed)
    weights = jnp.asarray(np.random.default_rng(2).normal(size=(3, 5, 8)), jnp.bfloat16)

    def total(state):
        rows = lookup(nnx.merge(graphdef, state), ids)
        return jnp.sum((rows * weights).astype(jnp.float32))

    (grad,) = jax.tree.leaves(jax.grad(total)(state))
    want = np.zeros((rows, 8), np.float32)
    np.add.at(want, np.asarray(ids), np.asarray(weights, np.float32))
    assert grad.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-6, atol=1e-6)
