"""Flax ELECTRA against ``transformers``' PyTorch ELECTRA: logits, checkpoints, dropout."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from childtuning_jax.models import from_config, from_pretrained, save_pretrained
from childtuning_jax.paths import leaf_names

torch = pytest.importorskip("torch")

TOL = 1e-4  # max abs logit difference allowed (the parity bound)


def electra_config(**kw) -> transformers.ElectraConfig:
    small = dict(
        vocab_size=100,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        num_labels=3,
    )
    return transformers.ElectraConfig(**{**small, **kw})


@nnx.jit
def _forward(model, ids, mask, types, rng):
    return model(ids, mask, types, deterministic=rng is None, dropout_rng=rng)


def ours(model, inputs: dict, rng=None) -> np.ndarray:
    args = [jnp.asarray(inputs[k]) for k in ("input_ids", "attention_mask", "token_type_ids")]
    return np.asarray(_forward(model, *args, rng))


def theirs(model, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.as_tensor(v) for k, v in inputs.items()}).logits.numpy()


def perturb_torch(model, seed: int, scale: float = 0.1) -> None:
    """Adds noise to every parameter (LayerNorms and biases too, so none is trivially 1 or 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def padded_inputs(seed: int = 0) -> dict:
    """Three sentence pairs; rows 1 and 2 end in padding (id 0, ELECTRA's pad_token_id)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 100, size=(3, 12))
    mask = np.ones((3, 12), np.int64)
    types = np.zeros((3, 12), np.int64)
    for row, (length, second) in enumerate([(12, 6), (9, 5), (5, 3)]):
        ids[row, length:], mask[row, length:] = 0, 0
        types[row, second:length] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@pytest.mark.parametrize(
    "embedding_size, num_labels",
    [(16, 1), (16, 3), (32, 2)],
    ids=["projected-regression", "projected-3-labels", "unprojected-2-labels"],
)
def test_parity_with_pytorch(embedding_size, num_labels, tmp_path, capsys):
    config = electra_config(embedding_size=embedding_size, num_labels=num_labels)
    torch.manual_seed(0)
    torch_model = transformers.ElectraForSequenceClassification(config).eval()
    perturb_torch(torch_model, seed=1, scale=0.3)
    torch_model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing missing, nothing unused
        model = from_pretrained(tmp_path)
    assert (model.electra.embeddings_project is None) == (embedding_size == 32)
    inputs = padded_inputs()
    expected = theirs(torch_model, inputs)
    got = ours(model, inputs)
    diff = float(np.abs(got - expected).max())
    with capsys.disabled():
        print(
            f"\nELECTRA embedding_size={embedding_size} num_labels={num_labels}: max |logit "
            f"diff| = {diff:.3g}, |logits| <= {np.abs(expected).max():.3g}"
        )
    assert got.shape == (3, num_labels) and got.dtype == np.float32
    assert diff <= TOL


def test_round_trip_through_pytorch(tmp_path):
    model = from_config(electra_config(num_labels=1), seed=3)
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    noisy = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))  # "fine-tuned"
    save_pretrained(model, tmp_path)
    torch_model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert type(torch_model).__name__ == "ElectraForSequenceClassification"
    assert torch_model.config.problem_type == "regression"
    inputs = padded_inputs()
    np.testing.assert_allclose(ours(model, inputs), theirs(torch_model.eval(), inputs), atol=TOL)
    loaded = from_pretrained(tmp_path)
    np.testing.assert_array_equal(ours(loaded, inputs), ours(model, inputs))


def test_discriminator_checkpoint_gets_a_fresh_head(tmp_path):
    """A pre-trained discriminator (as google/electra-large-discriminator) has no classifier."""
    torch.manual_seed(0)
    discriminator = transformers.ElectraForPreTraining(electra_config()).eval()
    discriminator.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="newly initialised") as record:
        model = from_pretrained(tmp_path, num_labels=2, seed=1)
    messages = " ".join(str(r.message) for r in record)
    assert "classifier.dense.weight" in messages and "classifier.out_proj.bias" in messages
    assert "discriminator_predictions" not in messages and "unused" not in messages
    state = discriminator.state_dict()
    np.testing.assert_array_equal(
        model.electra.embeddings_project.kernel[...],
        state["electra.embeddings_project.weight"].numpy().T,
    )
    inputs = padded_inputs()
    args = [jnp.asarray(inputs[k]) for k in ("input_ids", "attention_mask", "token_type_ids")]
    hidden, _ = nnx.jit(lambda m: m.electra(*args, None))(model)
    with torch.no_grad():
        reference = discriminator.electra(**{k: torch.as_tensor(v) for k, v in inputs.items()})
    np.testing.assert_allclose(hidden, reference.last_hidden_state.numpy(), atol=TOL)


def test_names_and_initialisation():
    model = from_config(electra_config(initializer_range=0.5), seed=2)
    params = nnx.state(model, nnx.Param)
    shapes = dict(zip(leaf_names(params), (x.shape for x in jax.tree.leaves(params)), strict=True))
    assert shapes["electra/embeddings/word_embeddings/embedding"] == (100, 16)
    assert shapes["electra/embeddings/LayerNorm/scale"] == (16,)
    assert shapes["electra/embeddings_project/kernel"] == (16, 32)
    assert shapes["electra/encoder/layer/1/attention/self/query/kernel"] == (32, 32)
    assert shapes["classifier/dense/kernel"] == (32, 32)
    assert shapes["classifier/out_proj/kernel"] == (32, 3)
    assert not any("pooler" in name for name in shapes)
    embeddings = model.electra.embeddings
    np.testing.assert_array_equal(embeddings.word_embeddings.embedding[0], 0.0)  # padding row
    assert abs(float(jnp.std(embeddings.word_embeddings.embedding[1:])) - 0.5) < 0.1
    np.testing.assert_array_equal(model.classifier.out_proj.bias[...], 0.0)


def test_training_dropout():
    model = from_config(electra_config(), seed=5)
    inputs = padded_inputs()
    evaluation = ours(model, inputs)
    train = lambda seed: ours(model, inputs, jax.random.key(seed, impl="rbg"))
    np.testing.assert_array_equal(train(1), train(1))
    assert not np.allclose(train(1), train(2))
    assert not np.allclose(train(1), evaluation)
    with pytest.raises(ValueError, match="dropout_rng"):
        jax.eval_shape(lambda: model(jnp.asarray(inputs["input_ids"]), deterministic=False))
