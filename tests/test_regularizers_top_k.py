"""top_k_layers_mask: which leaves each k trains, errors, and use with child_tuning_d."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

import childtuning_jax as ct
from childtuning_jax.models import from_config


def _named_tree(names):
    """A nested dict with a (2, 3) float leaf at each ``/``-joined name."""
    tree = {}
    for name in names:
        node = tree
        *parents, last = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = np.zeros((2, 3), np.float32)
    return tree


BERT = [
    "bert/embeddings/word_embeddings/embedding",
    "bert/embeddings/position_embeddings/embedding",
    "bert/embeddings/LayerNorm/scale",
    *[
        f"bert/encoder/layer/{i}/{part}"
        for i in range(3)
        for part in ("attention/self/query/kernel", "output/LayerNorm/bias")
    ],
    "bert/pooler/dense/kernel",
    "classifier/kernel",
    "classifier/bias",
]
XLNET = [
    "transformer/word_embedding/embedding",
    "transformer/mask_emb",
    *[f"transformer/layer/{i}/rel_attn/q" for i in range(2)],
    *[f"transformer/layer/{i}/ff/layer_1/kernel" for i in range(2)],
    "sequence_summary/summary/kernel",
    "logits_proj/kernel",
]
ELECTRA = [
    "electra/embeddings/word_embeddings/embedding",
    "electra/embeddings_project/kernel",
    *[f"electra/encoder/layer/{i}/intermediate/dense/kernel" for i in range(2)],
    "classifier/dense/kernel",
    "classifier/out_proj/kernel",
]


def _expected(name, k, num_layers):
    index = ct.regularizers.top_k.layer_index(name)
    if index is not None:
        return index >= num_layers - k
    return not any(e in name for e in ("embed", "mask_emb"))


@pytest.mark.parametrize(("names", "num_layers"), [(BERT, 3), (XLNET, 2), (ELECTRA, 2)])
def test_each_k_trains_top_layers_and_head_only(names, num_layers):
    params = _named_tree(names)
    for k in range(1, num_layers + 1):
        mask = ct.top_k_layers_mask(params, k)
        assert jax.tree.structure(mask) == jax.tree.structure(params)
        for name, leaf in zip(ct.leaf_names(mask), jax.tree.leaves(mask), strict=True):
            assert leaf.dtype == jnp.bool_ and leaf.shape == (2, 3)
            assert bool(leaf.all()) == _expected(name, k, num_layers), (name, k)
            assert bool(leaf.all()) or not bool(leaf.any())


def test_expected_sets_spelled_out():
    mask = ct.top_k_layers_mask(_named_tree(BERT), 1)
    trained = {
        n for n, m in zip(ct.leaf_names(mask), jax.tree.leaves(mask), strict=True) if m.all()
    }
    assert trained == {
        "bert/encoder/layer/2/attention/self/query/kernel",
        "bert/encoder/layer/2/output/LayerNorm/bias",
        "bert/pooler/dense/kernel",
        "classifier/kernel",
        "classifier/bias",
    }
    mask = ct.top_k_layers_mask(_named_tree(XLNET), 2)
    frozen = {
        n for n, m in zip(ct.leaf_names(mask), jax.tree.leaves(mask), strict=True) if not m.any()
    }
    assert frozen == {"transformer/word_embedding/embedding", "transformer/mask_emb"}
    mask = ct.top_k_layers_mask(_named_tree(ELECTRA), 2)
    frozen = {
        n for n, m in zip(ct.leaf_names(mask), jax.tree.leaves(mask), strict=True) if not m.any()
    }
    assert frozen == {
        "electra/embeddings/word_embeddings/embedding",
        "electra/embeddings_project/kernel",
    }


@pytest.mark.parametrize("k", [0, -1, 4])
def test_k_out_of_range(k):
    with pytest.raises(ValueError, match=rf"num_layers=3, got k={k}"):
        ct.top_k_layers_mask(_named_tree(BERT), k)


def test_no_layers_and_bad_types():
    with pytest.raises(ValueError, match=r"k=1 but num_layers=0"):
        ct.top_k_layers_mask({"classifier": {"kernel": np.zeros(3)}}, 1)
    for bad in (1.0, True, "2"):
        with pytest.raises(TypeError, match="k must be an integer"):
            ct.top_k_layers_mask(_named_tree(BERT), bad)
    assert ct.top_k_layers_mask(_named_tree(BERT), np.int64(2)) is not None


def test_child_tuning_d_trains_exactly_the_mask_on_a_real_model():
    config = transformers.BertConfig(
        vocab_size=32,
        hidden_size=8,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=8,
    )
    params = nnx.state(from_config(config, num_labels=2), nnx.Param)
    mask = ct.top_k_layers_mask(params, 2)
    tx = ct.child_tuning_d(mask)
    grads = jax.tree.map(jnp.ones_like, params)
    out, _ = jax.jit(tx.update)(grads, tx.init(params))
    by_name = dict(zip(ct.leaf_names(out), jax.tree.leaves(out), strict=True))
    masks = dict(zip(ct.leaf_names(mask), jax.tree.leaves(mask), strict=True))
    assert by_name.keys() == masks.keys()
    for name, update in by_name.items():
        np.testing.assert_array_equal(np.asarray(update) != 0, np.asarray(masks[name]), name)
    trained = {n for n, m in masks.items() if m.all()}
    assert "bert/encoder/layer/0/attention/self/query/kernel" not in trained
    assert "bert/encoder/layer/1/attention/self/query/kernel" in trained
    assert {"bert/pooler/dense/kernel", "classifier/kernel", "classifier/bias"} <= trained
    assert not any("embeddings" in n for n in trained)
