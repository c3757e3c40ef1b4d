"""Flax XLNet against ``transformers``' PyTorch XLNet: logits, padding, checkpoints, dropout."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from childtuning_jax.models import (
    XLNetForSequenceClassification,
    from_config,
    from_pretrained,
    save_pretrained,
)
from childtuning_jax.models.xlnet import rel_shift
from childtuning_jax.paths import leaf_names

torch = pytest.importorskip("torch")

TOL = 1e-4  # max abs logit difference allowed (the parity bound)
PAD = 5  # XLNet's pad_token_id


def xlnet_config(**kw) -> transformers.XLNetConfig:
    small = dict(vocab_size=100, d_model=32, n_layer=2, n_head=4, d_inner=64, num_labels=3)
    return transformers.XLNetConfig(**{**small, **kw})


@nnx.jit
def _forward(model, ids, mask, types, rng):
    return model(ids, mask, types, deterministic=rng is None, dropout_rng=rng)


def ours(model, inputs: dict, rng=None) -> np.ndarray:
    args = [inputs.get(k) for k in ("input_ids", "attention_mask", "token_type_ids")]
    return np.asarray(_forward(model, *[None if a is None else jnp.asarray(a) for a in args], rng))


def theirs(model, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        tensors = {k: torch.as_tensor(v) for k, v in inputs.items() if v is not None}
        return model(**tensors).logits.numpy()


def perturb_torch(model, seed: int, scale: float = 0.2) -> None:
    """Adds noise to every parameter (LayerNorms and biases too, so none is trivially 1 or 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def padded_inputs(side: str, seed: int = 0) -> dict:
    """Three sentence pairs as XLNet's tokenizer lays them out: ``A <sep> B <sep> <cls>``, token
    types 0, 1 and 2 (``<cls>``), padding (type 3) on ``side``; rows 1 and 2 are padded."""
    rng = np.random.default_rng(seed)
    width = 12
    ids = rng.integers(6, 100, size=(3, width))
    mask = np.zeros((3, width), np.int64)
    types = np.full((3, width), 3, np.int64)
    for row, (length, first) in enumerate([(12, 6), (9, 5), (5, 2)]):
        real = slice(width - length, width) if side == "left" else slice(0, length)
        mask[row, real] = 1
        segment = np.ones(length, np.int64)
        segment[:first], segment[-1] = 0, 2
        types[row, real] = segment
        ids[row, mask[row] == 0] = PAD
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def torch_xlnet(tmp_path, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = transformers.XLNetForSequenceClassification(xlnet_config(**kw)).eval()
    perturb_torch(model, seed=seed + 1)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize(
    "side, overrides",
    [
        ("left", dict(num_labels=3)),
        ("right", dict(num_labels=1)),
        ("left", dict(num_labels=2, clamp_len=3, ff_activation="relu")),
    ],
    ids=["left-3-labels", "right-regression", "left-clamp-relu"],
)
def test_parity_with_pytorch(side, overrides, tmp_path, capsys):
    torch_model = torch_xlnet(tmp_path, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing missing, nothing unused
        model = from_pretrained(tmp_path)
    inputs = padded_inputs(side)
    expected = theirs(torch_model, inputs)
    got = ours(model, inputs)
    assert got.shape == (3, overrides["num_labels"]) and got.dtype == np.float32
    diffs = [float(np.abs(got - expected).max())]
    # Without token types PyTorch drops the segment term; without a mask nothing is masked.
    for drop in ("token_type_ids", "attention_mask"):
        partial = {**inputs, drop: None}
        diffs.append(float(np.abs(ours(model, partial) - theirs(torch_model, partial)).max()))
    with capsys.disabled():
        print(
            f"\nXLNet {side} padding {overrides}: max |logit diff| = {max(diffs):.3g}, "
            f"|logits| <= {np.abs(expected).max():.3g}"
        )
    assert max(diffs) <= TOL
    assert not np.allclose(ours(model, {**inputs, "token_type_ids": None}), got, atol=1e-3)


def test_left_padding_gives_the_unpadded_logits():
    """Relative positions make left padding invisible: the summary is the last (real) token."""
    model = from_config(xlnet_config(), seed=1)
    left, right = padded_inputs("left"), padded_inputs("right")
    padded_left, padded_right = ours(model, left), ours(model, right)
    for row, length in [(1, 9), (2, 5)]:
        alone = {k: v[row : row + 1, -length:] for k, v in left.items()}
        np.testing.assert_allclose(padded_left[row], ours(model, alone)[0], atol=1e-5)
        # Right padding: the last position is a padding token, so the result differs.
        assert not np.allclose(padded_right[row], padded_left[row], atol=1e-3)
    np.testing.assert_allclose(padded_right[0], padded_left[0], atol=1e-5)  # row 0: no padding


def test_round_trip_through_pytorch(tmp_path):
    model = from_config(xlnet_config(num_labels=2), seed=3)
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    noisy = [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))  # "fine-tuned"
    save_pretrained(model, tmp_path)
    torch_model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert type(torch_model).__name__ == "XLNetForSequenceClassification"
    inputs = padded_inputs("left")
    expected = theirs(torch_model.eval(), inputs)
    np.testing.assert_allclose(ours(model, inputs), expected, atol=TOL)
    loaded = from_pretrained(tmp_path)
    np.testing.assert_array_equal(ours(loaded, inputs), ours(model, inputs))


def test_language_model_checkpoint_gets_a_fresh_head(tmp_path):
    """A pre-trained checkpoint (as xlnet-large-cased: XLNetLMHeadModel) has no summary."""
    torch.manual_seed(0)
    lm = transformers.XLNetLMHeadModel(xlnet_config()).eval()
    lm.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="newly initialised") as record:
        model = from_pretrained(tmp_path, num_labels=2, seed=1)
    messages = " ".join(str(r.message) for r in record)
    assert "sequence_summary.summary.weight" in messages and "logits_proj.bias" in messages
    assert "lm_loss" not in messages and "unused" not in messages
    state = lm.state_dict()
    attention = model.transformer.layer[1].rel_attn
    np.testing.assert_array_equal(attention.q[...], state["transformer.layer.1.rel_attn.q"])
    np.testing.assert_array_equal(
        attention.seg_embed[...], state["transformer.layer.1.rel_attn.seg_embed"]
    )
    np.testing.assert_array_equal(model.transformer.mask_emb[...], state["transformer.mask_emb"])
    np.testing.assert_array_equal(model.logits_proj.bias[...], 0.0)
    # The encoder's last hidden states match PyTorch's.
    inputs = padded_inputs("left")
    args = [jnp.asarray(inputs[k]) for k in ("input_ids", "attention_mask", "token_type_ids")]
    hidden = nnx.jit(lambda m: m.transformer(*args, None))(model)
    with torch.no_grad():
        reference = lm.transformer(**{k: torch.as_tensor(v) for k, v in inputs.items()})[0]
    np.testing.assert_allclose(hidden, reference.numpy(), atol=TOL)


def test_names_shapes_and_initialisation():
    model = from_config(xlnet_config(initializer_range=0.5), seed=2)
    params = nnx.state(model, nnx.Param)
    names = leaf_names(params)
    shapes = dict(zip(names, (x.shape for x in jax.tree.leaves(params)), strict=True))
    assert shapes["transformer/layer/1/rel_attn/q"] == (32, 4, 8)
    assert shapes["transformer/layer/0/rel_attn/seg_embed"] == (2, 4, 8)
    assert shapes["transformer/layer/0/rel_attn/r_w_bias"] == (4, 8)
    assert shapes["transformer/mask_emb"] == (1, 1, 32)
    assert shapes["sequence_summary/summary/kernel"] == (32, 32)
    assert shapes["logits_proj/kernel"] == (32, 3)
    attention = model.transformer.layer[0].rel_attn
    assert abs(float(jnp.std(attention.r_s_bias[...])) - 0.5) < 0.2  # N(0, std) as HF
    np.testing.assert_array_equal(attention.layer_norm.scale[...], 1.0)
    np.testing.assert_array_equal(model.transformer.layer[0].ff.layer_1.bias[...], 0.0)


def test_rel_shift_aligns_distances():
    length = 5
    # scores[i, p] = p: after the shift, query i and key j must see row length - i + j.
    scores = jnp.broadcast_to(jnp.arange(2 * length, dtype=jnp.float32), (1, 1, length, 2 * length))
    out = np.asarray(rel_shift(scores))[0, 0]
    i, j = np.indices((length, length))
    np.testing.assert_array_equal(out, length - i + j)


def test_training_dropout_and_gradients():
    model = from_config(xlnet_config(), seed=5)
    inputs = padded_inputs("left")
    evaluation = ours(model, inputs)
    train = lambda seed: ours(model, inputs, jax.random.key(seed, impl="rbg"))
    np.testing.assert_array_equal(train(1), train(1))
    assert not np.allclose(train(1), train(2))
    assert not np.allclose(train(1), evaluation)
    with pytest.raises(ValueError, match="dropout_rng"):
        jax.eval_shape(lambda: model(jnp.asarray(inputs["input_ids"]), deterministic=False))

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    args = [jnp.asarray(inputs[k]) for k in ("input_ids", "attention_mask", "token_type_ids")]

    def loss(p):
        logits = nnx.merge(graphdef, p, rest)(*args)
        return jnp.mean(jax.nn.log_softmax(logits)[:, 0])

    grads = jax.jit(jax.grad(loss))(params)
    for name, g in zip(leaf_names(grads), jax.tree.leaves(grads), strict=True):
        assert np.all(np.isfinite(g)), name
        # mask_emb serves only the pre-training query stream.
        assert np.any(g != 0) == (name != "transformer/mask_emb"), name


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(attn_type="uni"), "attn_type"),
        (dict(bi_data=True), "bi_data"),
        (dict(summary_type="attn"), "summary_type"),
        (dict(ff_activation="mish"), "ff_activation"),
    ],
)
def test_unsupported_configs_are_rejected(overrides, match):
    with pytest.raises(ValueError, match=match):
        XLNetForSequenceClassification(xlnet_config(**overrides), rngs=nnx.Rngs(0))
