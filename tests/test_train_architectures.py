"""The trainer on ELECTRA and XLNet: tiny local checkpoints with tokenizers built here (nothing
downloaded), run end to end in vanilla, F and D on a few RTE rows, with a bit-exact resume; the
dropout override of every architecture; XLNet's left padding; ``check_model`` for both."""

import functools
import json
import os
import warnings

import jax
import numpy as np
import pytest
import transformers
from flax import nnx
from tiny_models import NUM_LAYERS, electra_tokenizer, tiny_config, xlnet_tokenizer

from childtuning_jax import leaf_names
from childtuning_jax.models import dropout_overrides, from_config, from_pretrained, save_pretrained
from childtuning_trainer import input_pipeline, loop, model_check, run_setup, settings, tasks

# The tiny checkpoints have no classification head; the trainer's warning about it is checked in
# test_end_to_end and not repeated in the summary.
pytestmark = pytest.mark.filterwarnings("ignore:.*newly initialised:UserWarning")

ARCHS = ("electra", "xlnet")
ENCODER_LAYERS = {"electra": "electra/encoder/layer", "xlnet": "transformer/layer"}
QUERY = {  # one encoder weight of 1024 elements
    "electra": "electra/encoder/layer/0/attention/self/query/kernel",
    "xlnet": "transformer/layer/0/rel_attn/q",
}
HEAD = {"electra": "classifier/out_proj/kernel", "xlnet": "logits_proj/kernel"}
HEAD_TENSOR = {"electra": "classifier.out_proj.weight", "xlnet": "logits_proj.weight"}  # PyTorch
NUM_TRAIN = 12  # global batch 4: 3 steps per epoch, 6 in all
GLOBAL_BATCH = 4
SENTENCES = [
    "The cat sat on the mat.",
    "A dog barked at the mailman, who ran away.",
    "Paris is the capital of France.",
]

# ---------------------------------------------------------------------------------------------
# Library: dropout override, tokenizers (no GLUE needed)
# ---------------------------------------------------------------------------------------------

SMALL = dict(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
ENCODER = dict(SMALL, intermediate_size=32, max_position_embeddings=40, classifier_dropout=0.3)
DROPOUT_CONFIGS = {  # every dropout field set, and non-zero
    "bert": lambda: transformers.BertConfig(**ENCODER),
    "roberta": lambda: transformers.RobertaConfig(**ENCODER),
    "electra": lambda: transformers.ElectraConfig(**ENCODER, embedding_size=8),
    "xlnet": lambda: transformers.XLNetConfig(
        vocab_size=40, d_model=16, n_layer=1, n_head=2, d_inner=32, summary_first_dropout=0.2
    ),
}
DROPOUT_FIELDS = {
    "bert": {"hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"},
    "xlnet": {"dropout", "summary_first_dropout", "summary_last_dropout"},
}
DROPOUT_FIELDS["roberta"] = DROPOUT_FIELDS["electra"] = DROPOUT_FIELDS["bert"]


@nnx.jit
def _train_and_eval_logits(model, ids, mask, types, rng):
    train = model(ids, mask, types, deterministic=False, dropout_rng=rng)
    return train, model(ids, mask, types)


def dropout_rates(model):
    """Every dropout rate the model's modules hold (the ``*rate`` attributes each ``dropout``
    call reads), by module path."""
    return {
        "/".join(map(str, path)) + "." + name: value
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Module)
        for name, value in vars(node).items()
        if name.endswith("rate")
    }


@pytest.mark.parametrize("arch", sorted(DROPOUT_CONFIGS))
def test_dropout_zero_makes_training_logits_equal_eval_logits(arch):
    config = DROPOUT_CONFIGS[arch]()
    assert set(dropout_overrides(config, 0.0)) == DROPOUT_FIELDS[arch]
    # The config's own rates are all non-zero; the override reaches every site (head included).
    assert all(rate > 0 for rate in dropout_rates(from_config(config, num_labels=2)).values())
    assert set(dropout_rates(from_config(config, num_labels=2, dropout=0.5)).values()) == {0.5}
    model = from_config(config, num_labels=2, dropout=0.0)
    assert set(dropout_rates(model).values()) == {0.0}
    ids = np.random.default_rng(0).integers(5, 40, (4, 10))
    mask, types = np.ones((4, 10), np.int32), np.zeros((4, 10), np.int32)
    train, evaluation = _train_and_eval_logits(model, ids, mask, types, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(train), np.asarray(evaluation))


def test_dropout_override_keeps_absent_fields_absent_and_checks_the_rate():
    config = transformers.XLNetConfig(vocab_size=40, d_model=16, n_layer=1, n_head=2, d_inner=32)
    assert dropout_overrides(config, 0.25) == {"dropout": 0.25, "summary_last_dropout": 0.25}
    model = from_config(config, num_labels=2, dropout=0.25, summary_last_dropout=0.0)
    assert (model.config.dropout, model.config.summary_last_dropout) == (0.25, 0.0)
    with pytest.raises(ValueError, match=r"dropout rate 1.0 must be in \[0, 1\)"):
        dropout_overrides(config, 1.0)


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_reloads_with_its_padding_side(tmp_path, arch):
    tokenizer = (electra_tokenizer if arch == "electra" else xlnet_tokenizer)(SENTENCES)
    save_pretrained(from_config(tiny_config(arch, len(tokenizer))), tmp_path, tokenizer)
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert type(reloaded) is type(tokenizer)
    kw = dict(padding="max_length", max_length=24, truncation=True, return_token_type_ids=True)
    enc = reloaded(["The cat sat on the mat."], ["Paris is a dog."], **kw)
    assert dict(enc) == dict(tokenizer(["The cat sat on the mat."], ["Paris is a dog."], **kw))
    ids, mask, types = (
        np.asarray(enc[k][0]) for k in ("input_ids", "attention_mask", "token_type_ids")
    )
    tokens = reloaded.convert_ids_to_tokens(ids[mask == 1])
    assert reloaded.unk_token not in tokens  # every word is in the vocabulary
    if arch == "electra":
        assert reloaded.padding_side == "right" and reloaded.pad_token_id == 0
        assert mask[0] == 1 and mask[-1] == 0
        assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and tokens.count("[SEP]") == 2
        assert set(types[mask == 1]) == {0, 1}
    else:
        assert reloaded.padding_side == "left" and reloaded.pad_token == "<pad>"
        assert reloaded.pad_token_id == 5  # XLNetConfig's pad_token_id
        assert mask[0] == 0 and mask[-1] == 1  # the last position is the real last token
        assert tokens[-2:] == ["<sep>", "<cls>"] and tokens.count("<sep>") == 2
        assert types[-1] == 2 and set(types[mask == 1]) == {0, 1, 2}


def test_check_model_takes_electra_and_xlnet(tmp_path):
    rte = tasks.get_task("rte")
    xlnet = tmp_path / "xlnet"
    tiny_config("xlnet", 50).save_pretrained(xlnet)  # no max_position_embeddings (answers -1)
    assert model_check.check_model(str(xlnet), rte, 4096).model_type == "xlnet"
    electra = tmp_path / "electra"
    tiny_config("electra", 50).save_pretrained(electra)
    assert model_check.check_model(str(electra), rte, 64).model_type == "electra"
    with pytest.raises(ValueError, match="max_seq_length=65 exceeds .* max_position_embeddings=64"):
        model_check.check_model(str(electra), rte, 65)
    for arch, cls in [("electra", "Electra"), ("xlnet", "XLNet")]:
        head = tmp_path / f"{arch}_head"
        config = tiny_config(arch, 50)
        config.num_labels, config.architectures = 3, [f"{cls}ForSequenceClassification"]
        config.save_pretrained(head)
        with pytest.raises(ValueError, match="head with 3 output.*'rte' needs 2"):
            model_check.check_model(str(head), rte, 32)
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2Config(n_layer=1).save_pretrained(gpt2)
    with pytest.raises(ValueError, match="model_type 'gpt2'; supported: bert, electra, roberta"):
        model_check.check_model(str(gpt2), rte, 32)


# ---------------------------------------------------------------------------------------------
# The trainer end to end (needs ../shared/glue)
# ---------------------------------------------------------------------------------------------


RUN = dict(
    max_train_samples=NUM_TRAIN,
    max_eval_samples=8,
    num_train_epochs=2,
    per_device_batch_size=GLOBAL_BATCH,
    num_devices=1,
    dropout=0.0,
    log_every_steps=2,
    checkpoint_every_steps=2,
    keep_checkpoints=5,
)


@pytest.fixture(scope="module")
def make_config(run_config):
    """``make_config(model_dir, out_dir, **overrides)``: this module's runs (``RUN``)."""
    return functools.partial(run_config, **RUN)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("train_architectures")


@pytest.fixture(scope="module")
def checkpoint(workdir, make_config, tiny_checkpoint):
    """``checkpoint(arch)``: a tiny checkpoint whose vocabulary covers the RTE rows of the runs
    (training subset and dev rows; other words fall back to characters)."""

    @functools.cache
    def _checkpoint(arch):
        config = make_config("", workdir)
        train, dev = input_pipeline.load_examples(
            settings.data_settings(config), config.seed, tasks.get_task("rte")
        )
        texts = [t for split in [train, *dev] for t in [*split.text_a, *split.text_b]]
        return tiny_checkpoint(arch, texts=tuple(texts))

    return _checkpoint


@pytest.fixture(scope="module")
def run(workdir, checkpoint, make_config):
    """``run(arch, mode)``: one uninterrupted run and the warnings it gave, once per module."""

    @functools.cache
    def _run(arch, mode):
        out = workdir / f"{arch}_{mode}"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results, params = loop.train_and_evaluate(make_config(checkpoint(arch), out, mode=mode))
        return results, params, out, [str(w.message) for w in caught]

    return _run


@pytest.mark.needs_glue
# D in `make test` (the Fisher pass, the mask and training); vanilla and F in `make test-slow`.
@pytest.mark.parametrize(
    "mode",
    [
        pytest.param("vanilla", marks=pytest.mark.slow),
        pytest.param("F", marks=pytest.mark.slow),
        "D",
    ],
)
@pytest.mark.parametrize("arch", ARCHS)
def test_end_to_end(run, checkpoint, arch, mode):
    results, params, out, caught = run(arch, mode)
    with open(out / "results.json") as f:
        assert json.load(f) == json.loads(json.dumps(results))
    assert (results["mode"], results["num_train_examples"], results["steps"]) == (mode, 12, 6)
    assert [h["epoch"] for h in results["history"]] == [1, 2]
    assert set(results["eval"]) == {"accuracy"} and results["num_dev_examples"] == {"dev.tsv": 8}
    # The pre-trained checkpoint had no classification head: a fresh one, named in a warning;
    # the pre-training head's tensor is skipped silently.
    fresh = [m for m in caught if "newly initialised" in m]
    assert len(fresh) == 1 and HEAD_TENSOR[arch] in fresh[0]
    assert not [m for m in caught if "unused checkpoint tensors" in m]
    with open(out / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
    assert len(losses) == 4 and all(np.isfinite(losses))

    initial = nnx.state(from_pretrained(checkpoint(arch), num_labels=2, seed=42), nnx.Param)
    names = leaf_names(params)
    changed = {
        n: np.asarray(a) != np.asarray(b)
        for n, a, b in zip(names, jax.tree.leaves(params), jax.tree.leaves(initial), strict=True)
    }
    query = changed[QUERY[arch]]
    if mode != "F":  # D: the head is outside the encoder layers, always trained
        assert changed[HEAD[arch]].all()
    if mode == "vanilla":
        assert query.mean() > 0.95
    elif mode == "F":
        # Kept with RTE's p = 0.3 in any of 6 steps: 1 - 0.7**6 = 0.88 of 1024 elements, sd 0.01.
        assert results["reserve_p"] == 0.3
        assert query.mean() == pytest.approx(1 - 0.7**6, abs=0.05)
    else:
        with open(out / "mask_summary.json") as f:
            summary = json.load(f)
        layers = {f"{ENCODER_LAYERS[arch]}/{i}" for i in range(NUM_LAYERS)}
        assert set(summary["kept_fraction_per_layer"]) == layers
        assert summary["kept_fraction_encoder_layers"] == pytest.approx(0.3, abs=0.01)
        in_layers = [n for n in names if "layer" in n]
        assert {n for n in in_layers if not n.startswith(ENCODER_LAYERS[arch] + "/")} == set()
        moved = sum(changed[n].sum() for n in in_layers)
        assert moved / sum(changed[n].size for n in in_layers) == pytest.approx(0.3, abs=0.02)
        for name in in_layers:  # only the child network moves (no weight decay here)
            assert changed[name].mean() <= summary["kept_fraction_per_parameter"][name] + 1e-9


@pytest.mark.needs_glue
def test_xlnet_resume_after_a_kill_is_bit_exact(run, checkpoint, workdir, make_config):
    reference, ref_params, ref_out, _ = run("xlnet", "D")
    out = workdir / "xlnet_D_resumed"
    model = checkpoint("xlnet")
    # Stop after step 5: checkpoints at steps 2, 3 (end of epoch 1) and 4; step 5 is lost.
    assert loop.train_and_evaluate(make_config(model, out, mode="D", stop_after_steps=5)) is None
    assert sorted(os.listdir(out / "checkpoints")) == ["2", "3", "4"]
    written = (out / "mask_summary.json").stat().st_mtime_ns
    results, params = loop.train_and_evaluate(make_config(model, out, mode="D", resume=True))
    assert (out / "mask_summary.json").stat().st_mtime_ns == written  # no second Fisher pass
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        assert np.array_equal(a, b)
    assert results["history"] == reference["history"]
    with open(out / "metrics.jsonl") as f, open(ref_out / "metrics.jsonl") as g:
        assert f.read() == g.read()


@pytest.mark.needs_glue
def test_xlnet_batches_are_left_padded(checkpoint, tmp_path, make_config):
    """The trainer's tokenisation and batches keep XLNet's padding on the left, so the summary's
    last position is every example's ``<cls>``."""
    model = checkpoint("xlnet")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    cls_id = tokenizer.cls_token_id
    config = make_config(model, tmp_path, max_seq_length=64, padding="bucket", bucket_multiple=16)
    prepared = run_setup.prepare(settings.Settings.from_config(config))
    features = prepared.data.train
    padded = features["attention_mask"].min(axis=1) == 0
    assert padded.any()  # some examples are shorter than max_seq_length
    order = np.arange(prepared.data.num_train_examples)
    batches = input_pipeline.train_batches(features, order, 4, padding=prepared.data.padding)
    dev = input_pipeline.eval_batches(prepared.data.dev[0], 4, padding=prepared.data.padding)
    for batch in [features, *batches, *dev]:
        mask = batch["attention_mask"]
        assert (np.diff(mask, axis=1) >= 0).all()  # 0 ... 0 1 ... 1: padding on the left
        assert (batch["input_ids"][:, -1] == cls_id).all()
        assert (batch["token_type_ids"][:, -1] == 2).all()
        assert (batch["input_ids"][mask == 0] == tokenizer.pad_token_id).all()
