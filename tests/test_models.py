"""Flax BERT / RoBERTa (and ELECTRA / XLNet where noted): names, masks, dropout, gradients,
jit/pmap, checkpoint errors, the embedding hook (no torch)."""

import json
import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from childtuning_jax import official_eligibility
from childtuning_jax.models import (
    BertForSequenceClassification,
    RobertaForSequenceClassification,
    XLNetForSequenceClassification,
    from_config,
    from_pretrained,
    save_pretrained,
)
from childtuning_jax.paths import leaf_names

SMALL = dict(
    vocab_size=64,
    hidden_size=16,
    num_hidden_layers=1,  # one layer keeps compilation short; the parity tests use two
    num_attention_heads=4,
    intermediate_size=32,
    max_position_embeddings=24,
    type_vocab_size=2,
    initializer_range=0.2,  # larger than HF's 0.02 so that logits react visibly to inputs
)


def bert_config(**kw):
    return transformers.BertConfig(**{**SMALL, **kw})


def roberta_config(**kw):
    return transformers.RobertaConfig(**{**SMALL, "pad_token_id": 1, **kw})


def electra_config(**kw):
    return transformers.ElectraConfig(**{**SMALL, "embedding_size": 8, **kw})


def xlnet_config(**kw):
    small = dict(vocab_size=64, d_model=16, n_layer=1, n_head=4, d_inner=32, initializer_range=0.2)
    return transformers.XLNetConfig(**{**small, **kw})


CONFIGS = {"bert": bert_config, "roberta": roberta_config}
ALL_CONFIGS = {**CONFIGS, "electra": electra_config, "xlnet": xlnet_config}
# Where each architecture keeps its encoder layers, and its parameters outside them.
LAYER_PREFIX = {
    "bert": "bert/encoder/layer/",
    "roberta": "roberta/encoder/layer/",
    "electra": "electra/encoder/layer/",
    "xlnet": "transformer/layer/",
}
OUTSIDE_LAYERS = {
    "bert": [
        "bert/embeddings/LayerNorm/bias",
        "bert/embeddings/LayerNorm/scale",
        "bert/embeddings/position_embeddings/embedding",
        "bert/embeddings/token_type_embeddings/embedding",
        "bert/embeddings/word_embeddings/embedding",
        "bert/pooler/dense/bias",
        "bert/pooler/dense/kernel",
        "classifier/bias",
        "classifier/kernel",
    ],
    "roberta": [
        "classifier/dense/bias",
        "classifier/dense/kernel",
        "classifier/out_proj/bias",
        "classifier/out_proj/kernel",
        "roberta/embeddings/LayerNorm/bias",
        "roberta/embeddings/LayerNorm/scale",
        "roberta/embeddings/position_embeddings/embedding",
        "roberta/embeddings/token_type_embeddings/embedding",
        "roberta/embeddings/word_embeddings/embedding",
    ],
    "electra": [
        "classifier/dense/bias",
        "classifier/dense/kernel",
        "classifier/out_proj/bias",
        "classifier/out_proj/kernel",
        "electra/embeddings/LayerNorm/bias",
        "electra/embeddings/LayerNorm/scale",
        "electra/embeddings/position_embeddings/embedding",
        "electra/embeddings/token_type_embeddings/embedding",
        "electra/embeddings/word_embeddings/embedding",
        "electra/embeddings_project/bias",
        "electra/embeddings_project/kernel",
    ],
    "xlnet": [
        "logits_proj/bias",
        "logits_proj/kernel",
        "sequence_summary/summary/bias",
        "sequence_summary/summary/kernel",
        "transformer/mask_emb",
        "transformer/word_embedding/embedding",
    ],
}
# Parameters per encoder layer.
# XLNet: q, k, v, o, r, three biases, seg_embed, two LayerNorms, layer_1 and layer_2.
PER_LAYER = {"bert": 16, "roberta": 16, "electra": 16, "xlnet": 17}


@nnx.jit
def _forward(model, ids, mask, types, rng):
    return model(ids, mask, types, deterministic=rng is None, dropout_rng=rng)


def forward(model, ids, mask=None, types=None, rng=None):
    """``model(...)``, compiled once per config and shape (eager dispatch is slow on 2 cores)."""
    return _forward(model, ids, mask, types, rng)


def batch(pad_id: int, seed: int = 0):
    """Two pairs of segments; the second row ends with three padding tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 64, size=(2, 10))
    mask = np.ones((2, 10), np.int32)
    ids[1, 7:], mask[1, 7:] = pad_id, 0
    types = np.zeros((2, 10), np.int32)
    types[0, 5:], types[1, 4:7] = 1, 1
    return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_param_names_mirror_hf_and_eligibility_selects_encoder_layers(kind):
    model = from_config(CONFIGS[kind](num_hidden_layers=2), num_labels=3)
    names = leaf_names(nnx.state(model, nnx.Param))
    assert f"{kind}/embeddings/word_embeddings/embedding" in names
    assert f"{kind}/embeddings/LayerNorm/scale" in names
    assert f"{kind}/encoder/layer/1/attention/self/query/kernel" in names
    assert f"{kind}/encoder/layer/0/output/LayerNorm/bias" in names
    if kind == "bert":
        assert {"bert/pooler/dense/kernel", "classifier/kernel", "classifier/bias"} <= set(names)
    else:
        assert {"classifier/dense/kernel", "classifier/out_proj/kernel"} <= set(names)
        assert not any("pooler" in n for n in names)
    # Child-Tuning-D's default rule: the name contains "layer".
    eligible = [n for n in names if "layer" in n]
    under_layers = [n for n in names if n.startswith(f"{kind}/encoder/layer/")]
    assert eligible == under_layers
    # 16 tensors per layer: q, k, v, attention output dense + LN, intermediate, output dense + LN.
    assert len(under_layers) == 16 * 2
    params = nnx.state(model, nnx.Param)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


@pytest.mark.parametrize("kind", sorted(ALL_CONFIGS))
def test_official_eligibility_selects_exactly_the_encoder_layers(kind):
    """ChildTuning-D's default rule ("layer" in the name, a substring match) on all four models."""
    model = from_config(ALL_CONFIGS[kind](), num_labels=3)
    names = leaf_names(nnx.state(model, nnx.Param))
    eligible = [n for n in names if official_eligibility(n)]
    assert eligible == [n for n in names if n.startswith(LAYER_PREFIX[kind])]
    assert len(eligible) == PER_LAYER[kind] * model.config.num_hidden_layers
    assert sorted(n for n in names if not official_eligibility(n)) == OUTSIDE_LAYERS[kind]


def _word_embeddings(model) -> nnx.Embed:
    if isinstance(model, XLNetForSequenceClassification):
        return model.transformer.word_embedding
    base = getattr(model, model.config.model_type)
    return base.embeddings.word_embeddings


@pytest.mark.parametrize("kind", sorted(ALL_CONFIGS))
def test_perturb_embeddings_acts_on_the_word_embedding_lookup(kind):
    config = ALL_CONFIGS[kind]()
    model = from_config(config, num_labels=2, seed=11)
    ids, mask, types = batch(config.pad_token_id)
    call = lambda hook: nnx.jit(lambda m: m(ids, mask, types, perturb_embeddings=hook))(model)
    plain = forward(model, ids, mask, types)
    np.testing.assert_allclose(call(None), plain, atol=1e-6)  # another compilation
    np.testing.assert_array_equal(call(lambda e: e), call(None))
    # The hook sees the word embeddings alone: (batch, seq, embedding width), before positions,
    # token types, LayerNorm (and ELECTRA's projection) are applied.
    table = _word_embeddings(model).embedding
    seen = []
    record = lambda e: seen.append(e) or e
    jax.eval_shape(lambda: model(ids, mask, types, perturb_embeddings=record))
    assert seen[0].shape == (*ids.shape, table.shape[1])
    # Adding delta to every lookup is the same as adding it to every row of the table.
    delta = jax.random.normal(jax.random.key(0), (table.shape[1],))
    perturbed = call(lambda e: e + delta)
    assert not np.allclose(perturbed, plain, atol=1e-3)
    shifted = from_config(config, num_labels=2, seed=11)
    _word_embeddings(shifted).embedding[...] = table[...] + delta
    np.testing.assert_allclose(perturbed, forward(shifted, ids, mask, types), atol=1e-5)


def test_hf_initialisation():
    config = roberta_config(initializer_range=0.5)
    model = from_config(config, num_labels=2, seed=3)
    emb = model.roberta.embeddings
    np.testing.assert_array_equal(emb.word_embeddings.embedding[1], 0.0)  # padding row
    np.testing.assert_array_equal(emb.position_embeddings.embedding[1], 0.0)
    assert abs(float(jnp.std(emb.word_embeddings.embedding[3:])) - 0.5) < 0.05
    np.testing.assert_array_equal(emb.LayerNorm.scale, 1.0)
    np.testing.assert_array_equal(model.classifier.out_proj.bias, 0.0)
    assert model.config.problem_type == "single_label_classification"
    assert from_config(config, num_labels=1).config.problem_type == "regression"
    assert config.num_labels == 2 and config.problem_type is None  # the caller's is untouched


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_attention_mask_token_types_and_defaults(kind):
    config = CONFIGS[kind]()
    model = from_config(config, num_labels=2, seed=1)
    ids, mask, types = batch(config.pad_token_id)
    logits = forward(model, ids, mask, types)
    assert logits.shape == (2, 2) and logits.dtype == jnp.float32
    # Masked positions are invisible: other tokens there change nothing.
    other = forward(model, ids.at[1, 7:].set(9), mask, types)
    np.testing.assert_allclose(other, logits, atol=1e-5)
    # Token types and the mask are used: changing either changes the padded row's logits.
    zero_types = forward(model, ids, mask, jnp.zeros_like(types))
    assert not np.allclose(zero_types[1], logits[1], atol=1e-3)
    assert not np.allclose(forward(model, ids, jnp.ones_like(mask), types)[1], logits[1], atol=1e-3)
    # Defaults: no mask attends everywhere, no token types are all type 0.
    np.testing.assert_allclose(
        forward(model, ids),
        forward(model, ids, jnp.ones_like(mask), jnp.zeros_like(types)),
        atol=1e-6,
    )


def test_sequence_longer_than_positions_is_an_error():
    model = from_config(roberta_config(), num_labels=2)
    ids = jnp.full((1, 23), 5)  # positions 2..24, but only 24 position embeddings
    with pytest.raises(ValueError, match="max_position_embeddings=24"):
        jax.eval_shape(lambda: model(ids))


# "rbg" keys compile far faster than threefry ones on CPU; the model takes either.
def rbg_key(seed: int) -> jax.Array:
    return jax.random.key(seed, impl="rbg")


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_dropout_only_in_training_and_driven_by_the_key(kind):
    model = from_config(CONFIGS[kind](), num_labels=2, seed=1)
    assert model.config.hidden_dropout_prob == 0.1
    ids, mask, types = batch(model.config.pad_token_id)
    evaluation = forward(model, ids, mask, types)
    # deterministic=True (the default) ignores a key.
    call = nnx.jit(lambda m, k: m(ids, mask, types, dropout_rng=k))
    np.testing.assert_allclose(evaluation, call(model, rbg_key(0)), atol=1e-6)
    train = lambda seed: forward(model, ids, mask, types, rbg_key(seed))
    np.testing.assert_array_equal(train(1), train(1))
    assert not np.allclose(train(1), train(2))
    assert not np.allclose(train(1), evaluation)
    with pytest.raises(ValueError, match="dropout_rng"):
        jax.eval_shape(lambda: model(ids, mask, types, deterministic=False))


def test_training_without_dropout_equals_evaluation():
    # An attention-dropout rate too small to drop anything runs the explicit attention path
    # (softmax + dropout) in training; it must agree with jax.nn.dot_product_attention.
    config = bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=1e-12)
    model = from_config(config, num_labels=2, seed=2)
    ids, mask, types = batch(config.pad_token_id)
    train = forward(model, ids, mask, types, rbg_key(0))
    np.testing.assert_allclose(train, forward(model, ids, mask, types), atol=1e-5)
    # With every rate zero, training mode needs no key.
    no_dropout = from_config(config, num_labels=2, attention_probs_dropout_prob=0.0)
    jax.eval_shape(lambda: no_dropout(ids, mask, types, deterministic=False))


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_gradients_reach_every_parameter(kind):
    # Dropout off (it is tested above) keeps this test's compilation small.
    config = CONFIGS[kind](hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = from_config(config, num_labels=3, seed=4)
    ids, mask, types = batch(model.config.pad_token_id)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        logits = nnx.merge(graphdef, p, rest)(ids, mask, types, deterministic=False)
        return jnp.mean(jax.nn.log_softmax(logits)[:, 0])

    grads = jax.jit(jax.grad(loss))(params)
    for name, g in zip(leaf_names(grads), jax.tree.leaves(grads), strict=True):
        assert np.all(np.isfinite(g)), name
        assert np.any(g != 0), name


def test_split_merge_under_jit_and_pmap():
    model = from_config(bert_config(), num_labels=2, seed=5)
    ids, mask, types = batch(0)
    expected = forward(model, ids, mask, types)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    apply = lambda p, i, m, t: nnx.merge(graphdef, p, rest)(i, m, t)
    np.testing.assert_allclose(jax.jit(apply)(params, ids, mask, types), expected, atol=1e-5)

    n = 2
    assert jax.local_device_count() >= n
    replicated = jax.tree.map(lambda x: jnp.stack([x] * n), params)
    shard = lambda x: x.reshape(n, 1, *x.shape[1:])
    out = jax.pmap(apply, devices=jax.local_devices()[:n])(
        replicated, shard(ids), shard(mask), shard(types)
    )
    np.testing.assert_allclose(out.reshape(2, 2), expected, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params():
    config = bert_config()
    full = from_config(config, num_labels=2, seed=6)
    half = from_config(config, num_labels=2, seed=6, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(half, nnx.Param)))
    ids, mask, types = batch(0)
    out = forward(half, ids, mask, types)
    assert out.dtype == jnp.float32
    ref = forward(full, ids, mask, types)
    # Same parameters, bfloat16 arithmetic: close but (with 8-bit mantissas) not equal.
    np.testing.assert_allclose(out, ref, atol=0.05 * float(jnp.abs(ref).max()))
    assert not np.array_equal(out, ref)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_save_and_load_round_trip(kind, tmp_path):
    # BERT as regression (one output), RoBERTa as classification.
    model = from_config(CONFIGS[kind](), num_labels=1 if kind == "bert" else 3, seed=7)
    save_pretrained(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert len(saved["id2label"]) == model.config.num_labels
    expected = "regression" if kind == "bert" else "single_label_classification"
    assert saved["problem_type"] == expected
    # No head is missing, so loading warns about nothing; num_labels comes from the config.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = from_pretrained(tmp_path)
    assert isinstance(loaded, type(model))
    assert loaded.config.num_labels == model.config.num_labels
    ids, mask, types = batch(model.config.pad_token_id)
    np.testing.assert_array_equal(
        forward(loaded, ids, mask, types), forward(model, ids, mask, types)
    )


def _save_bert(tmp_path):
    model = from_config(bert_config(), num_labels=2, seed=8)
    save_pretrained(model, tmp_path)
    return tmp_path


def test_bare_encoder_checkpoint_gets_a_fresh_head_with_a_warning(tmp_path):
    path = _save_bert(tmp_path)
    weights = load_file(path / "model.safetensors")
    # As a bare BertModel saves it: no "bert." prefix, no pooler, no classifier.
    bare = {
        k[len("bert.") :]: v
        for k, v in weights.items()
        if k.startswith("bert.") and ".pooler." not in k
    }
    save_file(bare, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="classifier.weight") as record:
        model = from_pretrained(path, num_labels=3, seed=1)
    message = str(record[0].message)
    assert "bert.pooler.dense.weight" in message and "classifier.bias" in message
    name = "encoder.layer.0.attention.self.query.weight"
    np.testing.assert_array_equal(
        model.bert.encoder.layer[0].attention.self.query.kernel, bare[name].T
    )
    assert model.classifier.kernel.shape == (16, 3)
    assert abs(float(jnp.std(model.classifier.kernel)) - 0.2) < 0.1
    np.testing.assert_array_equal(model.classifier.bias, 0.0)


def test_config_overrides(tmp_path):
    path = _save_bert(tmp_path)
    model = from_pretrained(path, num_labels=2, hidden_dropout_prob=0.0)
    assert model.config.hidden_dropout_prob == 0.0
    with pytest.raises(ValueError, match="not_a_field"):
        from_pretrained(path, num_labels=2, not_a_field=1)


def test_missing_checkpoint_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        from_pretrained(tmp_path / "does-not-exist", num_labels=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="Cannot load the config of .*empty"):
        from_pretrained(tmp_path / "empty", num_labels=2)
    bert_config().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape("model.safetensors")):
        from_pretrained(tmp_path, num_labels=2)


def test_wrong_shapes_name_the_tensor(tmp_path):
    path = _save_bert(tmp_path)
    weights = load_file(path / "model.safetensors")
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    weights[name] = np.zeros((31, 16), np.float32)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(name) + r".*\(31, 16\).*\(32, 16\)"):
        from_pretrained(path, num_labels=2)


def test_head_with_other_num_labels(tmp_path):
    path = _save_bert(tmp_path)
    with pytest.raises(ValueError, match=r"'classifier\.(weight|bias)'.*ignore_mismatched_sizes"):
        from_pretrained(path, num_labels=5)
    with pytest.warns(UserWarning, match="re-initialised.*classifier.bias, classifier.weight"):
        model = from_pretrained(path, num_labels=5, ignore_mismatched_sizes=True)
    assert model.classifier.kernel.shape == (16, 5)


def test_missing_encoder_tensor_is_an_error(tmp_path):
    path = _save_bert(tmp_path)
    weights = load_file(path / "model.safetensors")
    del weights["bert.encoder.layer.0.output.LayerNorm.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KeyError, match=re.escape("bert.encoder.layer.0.output.LayerNorm.weight")):
        from_pretrained(path, num_labels=2)


def test_unsupported_model_type(tmp_path):
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Unsupported model type 'gpt2'"):
        from_pretrained(tmp_path, num_labels=2)
    with pytest.raises(ValueError, match="gpt2"):
        from_config(transformers.GPT2Config(), num_labels=2)


def test_unsupported_configs_are_rejected():
    with pytest.raises(ValueError, match="hidden_act"):
        BertForSequenceClassification(bert_config(hidden_act="mish"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_attention_heads"):
        RobertaForSequenceClassification(roberta_config(hidden_size=18), rngs=nnx.Rngs(0))


def test_sharded_safetensors_checkpoint(tmp_path):
    model = from_config(roberta_config(), num_labels=2, seed=9)
    save_pretrained(model, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    os.remove(tmp_path / "model.safetensors")
    names = sorted(weights)
    shards = {
        "model-00001-of-00002.safetensors": names[:10],
        "model-00002-of-00002.safetensors": names[10:],
    }
    for file, keys in shards.items():
        save_file({k: weights[k] for k in keys}, tmp_path / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = from_pretrained(tmp_path)
    for a, b in zip(
        jax.tree.leaves(nnx.state(loaded, nnx.Param)),
        jax.tree.leaves(nnx.state(model, nnx.Param)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("rate", [0.1, 0.5])
@pytest.mark.parametrize("seq_len", [None, 512])  # hashed by position in a (64, 512, 96) layout
def test_dropout_drops_at_its_rate_independently_and_rescales(rate, seq_len):
    from childtuning_jax.models.blocks import dropout

    x = jnp.ones((64, 128, 96))
    drop = jax.jit(lambda k: dropout(x, rate, k, (1,), seq_len))
    out = np.asarray(drop(jax.random.key(3)))
    kept = out != 0
    n = kept.size
    # Six sigma of a Binomial(n, 1 - rate) fraction.
    assert abs(kept.mean() - (1 - rate)) < 6 * np.sqrt(rate * (1 - rate) / n)
    np.testing.assert_allclose(out[kept], 1 / (1 - rate), rtol=1e-6)
    # Neighbours along each axis and another key are uncorrelated (|r| within six sigma of 0).
    flat = kept.astype(np.float64)
    for a, b in [
        (flat[:, :, 1:], flat[:, :, :-1]),
        (flat[:, 1:], flat[:, :-1]),
        (flat[1:], flat[:-1]),
        (flat, np.asarray(drop(jax.random.key(4))) != 0),
    ]:
        r = np.corrcoef(a.ravel(), np.asarray(b, np.float64).ravel())[0, 1]
        assert abs(r) < 6 / np.sqrt(a.size), r


@pytest.mark.parametrize("shape, seq_axes", [((3, 5, 8), (1,)), ((3, 2, 5, 5), (2, 3))])
def test_dropout_mask_of_a_position_does_not_depend_on_padding(shape, seq_axes):
    from childtuning_jax.models.blocks import dropout

    key, rate, seq_len = jax.random.key(5), 0.5, 16
    x = jax.random.normal(jax.random.key(0), shape)
    padded = jnp.pad(x, [(0, 7) if a in seq_axes else (0, 0) for a in range(x.ndim)])
    drop = jax.jit(dropout, static_argnums=(1, 3, 4))
    out = np.asarray(drop(x, rate, key, seq_axes, seq_len))
    out_padded = np.asarray(drop(padded, rate, key, seq_axes, seq_len))
    np.testing.assert_array_equal(out_padded[tuple(slice(0, n) for n in shape)], out)
    assert 0 < (out != 0).mean() < 1
    # Without a fixed length the mask follows the padded layout.
    plain = np.asarray(drop(padded, rate, key, (), None))
    assert (plain[tuple(slice(0, n) for n in shape)] != out).any()
    # Every element's index is distinct: no two positions share a hash word.
    from childtuning_jax import hash_random

    index_shape = tuple(seq_len if a in seq_axes else n for a, n in enumerate(padded.shape))
    index = np.asarray(hash_random.flat_index(padded.shape, index_shape))
    assert len(np.unique(index)) == index.size and index.max() < np.prod(index_shape)
