"""Loading Hugging Face checkpoints into the Flax models and saving them back.

``transformers`` 5 has no Flax models; it is used here only for configs and tokenizers. Weights
are read from ``model.safetensors`` (no torch needed) or ``pytorch_model.bin`` (needs torch) and
written as ``model.safetensors`` that ``transformers``' PyTorch
``AutoModelForSequenceClassification`` loads with the same logits.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import transformers
from flax import nnx

from childtuning_jax.models import convert
from childtuning_jax.models.bert import BertForSequenceClassification
from childtuning_jax.models.electra import ElectraForSequenceClassification
from childtuning_jax.models.roberta import RobertaForSequenceClassification
from childtuning_jax.models.xlnet import XLNetForSequenceClassification

Model = (
    BertForSequenceClassification
    | RobertaForSequenceClassification
    | ElectraForSequenceClassification
    | XLNetForSequenceClassification
)


class Architecture(NamedTuple):
    """How one ``model_type`` maps to a Flax class and to PyTorch names."""

    cls: type
    base_prefix: str  # the encoder's name in the state dict
    head_prefixes: tuple[str, ...]  # parameters a pretrained (non-task) checkpoint may lack
    hf_class: str  # the ``transformers`` class written to config.json
    padded_embeddings: tuple[str, ...]  # embeddings whose padding row HF initialises to zero
    dropout_fields: tuple[str, ...]  # the config fields of every dropout rate the model uses


# BERT, RoBERTa and ELECTRA: the encoder's two rates and the head's (``None``: the hidden rate).
_ENCODER_DROPOUT = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout")


ARCHITECTURES: dict[str, Architecture] = {
    "bert": Architecture(
        BertForSequenceClassification,
        "bert",
        ("bert/pooler/", "classifier/"),
        "BertForSequenceClassification",
        ("bert/embeddings/word_embeddings/embedding",),
        _ENCODER_DROPOUT,
    ),
    "roberta": Architecture(
        RobertaForSequenceClassification,
        "roberta",
        ("classifier/",),
        "RobertaForSequenceClassification",
        (
            "roberta/embeddings/word_embeddings/embedding",
            "roberta/embeddings/position_embeddings/embedding",
        ),
        _ENCODER_DROPOUT,
    ),
    "electra": Architecture(
        ElectraForSequenceClassification,
        "electra",
        ("classifier/",),
        "ElectraForSequenceClassification",
        ("electra/embeddings/word_embeddings/embedding",),
        _ENCODER_DROPOUT,
    ),
    "xlnet": Architecture(
        XLNetForSequenceClassification,
        "transformer",
        ("sequence_summary/", "logits_proj/"),
        "XLNetForSequenceClassification",
        (),  # XLNet's word embedding has no padding row
        # ``dropout`` covers embeddings, attention, feed-forward and output; the summary has two.
        ("dropout", "summary_first_dropout", "summary_last_dropout"),
    ),
}


def _architecture(config: Any) -> Architecture:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"Unsupported model type {model_type!r}; supported: {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


def dropout_overrides(config: Any, rate: float) -> dict[str, float]:
    """Config overrides that set every dropout rate of the model for ``config`` to ``rate``.

    BERT, RoBERTa, ELECTRA: ``hidden_dropout_prob``, ``attention_probs_dropout_prob`` and the
    head's ``classifier_dropout``. XLNet: ``dropout`` (embeddings, attention, feed-forward,
    output) and the sequence summary's ``summary_last_dropout`` and ``summary_first_dropout``. A
    field the config lacks is left out (XLNet's ``summary_first_dropout``: absent means no dropout
    there, as in ``transformers``), so ``rate=0`` switches off every dropout site. Pass the result
    as ``**config_overrides`` (or use the ``dropout=`` option of :func:`from_pretrained`).

    Raises:
      ValueError: ``rate`` outside [0, 1), or an unsupported ``model_type``.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate {rate} must be in [0, 1)")
    fields = _architecture(config).dropout_fields
    return {name: float(rate) for name in fields if hasattr(config, name)}


def _prepare_config(
    config: Any, num_labels: int | None, overrides: dict[str, Any], dropout: float | None = None
) -> Any:
    """A copy of ``config`` with the dropout rate, the overrides, ``num_labels`` and a matching
    ``problem_type``."""
    if dropout is not None:
        overrides = {**dropout_overrides(config, dropout), **overrides}
    config = copy.deepcopy(config)
    for name, value in overrides.items():
        if not hasattr(config, name):
            raise ValueError(f"Unknown config override {name!r} for {type(config).__name__}")
        setattr(config, name, value)
    if num_labels is not None:
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        config.num_labels = num_labels
    config.problem_type = "regression" if config.num_labels == 1 else "single_label_classification"
    return config


def from_config(
    config: Any,
    *,
    num_labels: int | None = None,
    seed: int = 0,
    dtype: Any = jnp.float32,
    dropout: float | None = None,
    **config_overrides: Any,
) -> Model:
    """A randomly initialised model (as Hugging Face initialises it) for a ``transformers`` config.

    Args:
      config: a ``BertConfig``, ``RobertaConfig``, ``ElectraConfig`` or ``XLNetConfig`` (it is
        copied, not changed).
      num_labels: output size; 1 is regression. ``None`` keeps ``config.num_labels``.
      seed: seeds the initialisation.
      dtype: compute dtype (parameters stay float32), e.g. ``jnp.bfloat16``.
      dropout: every dropout rate of the model (:func:`dropout_overrides`); ``None`` keeps the
        config's rates.
      **config_overrides: config attributes to change, e.g. ``hidden_dropout_prob=0.0`` (applied
        after ``dropout``).
    """
    config = _prepare_config(config, num_labels, config_overrides, dropout)
    model, _ = _build(_architecture(config), config, dtype, None, seed=seed)
    return model


def _build(
    arch: Architecture,
    config: Any,
    dtype: Any,
    state: dict[str, Any] | None,
    *,
    seed: int,
    ignore_mismatched_sizes: bool = False,
) -> tuple[Model, convert.LoadReport]:
    """The model with parameters from ``state``; with ``state=None``, all initialised.

    The module is traced abstractly (``nnx.eval_shape``) and its parameters filled on the host,
    so nothing is initialised only to be overwritten and no per-shape init kernel is compiled.
    """
    abstract = nnx.eval_shape(lambda: arch.cls(config, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0)))
    graphdef, shapes, rest = nnx.split(abstract, nnx.Param, ...)
    params, report = convert.params_from_state_dict(
        shapes,
        state or {},
        base_prefix=arch.base_prefix,
        head_prefixes=arch.head_prefixes if state is not None else ("",),
        std=config.initializer_range,
        seed=seed,
        ignore_mismatched_sizes=ignore_mismatched_sizes,
        padding_rows={name: config.pad_token_id for name in arch.padded_embeddings},
    )
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, params), rest), report


def load_config(name_or_path: str | os.PathLike, revision: str | None = None) -> Any:
    """The ``transformers`` config of a local folder or hub name, with errors naming it."""
    name_or_path = os.fspath(name_or_path)
    looks_local = os.path.isabs(name_or_path) or name_or_path.startswith(".")
    if looks_local and not os.path.isdir(name_or_path):
        raise FileNotFoundError(f"No checkpoint folder {name_or_path}")
    try:
        return transformers.AutoConfig.from_pretrained(name_or_path, revision=revision)
    except (OSError, ValueError) as e:
        raise OSError(f"Cannot load the config of {name_or_path!r}: {e}") from e


def _weight_files(name_or_path: str, revision: str | None) -> list[str]:
    if os.path.isdir(name_or_path):
        files = convert.local_weight_files(name_or_path)
        if files is None:
            raise FileNotFoundError(
                f"No weights in {name_or_path}: expected one of {', '.join(convert.WEIGHT_FILES)}"
            )
        return files
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    download = lambda f: huggingface_hub.hf_hub_download(name_or_path, f, revision=revision)
    for name in convert.WEIGHT_FILES:
        try:
            path = download(name)
        except (EntryNotFoundError, LocalEntryNotFoundError):
            continue
        if name.endswith(".index.json"):
            return [download(shard) for shard in convert.shard_files(path)]
        return [path]
    raise FileNotFoundError(
        f"No weights found for {name_or_path!r} (tried {', '.join(convert.WEIGHT_FILES)}; "
        "offline, a hub name works only when it is in the local cache)"
    )


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    num_labels: int | None = None,
    dtype: Any = jnp.float32,
    seed: int = 0,
    revision: str | None = None,
    ignore_mismatched_sizes: bool = False,
    dropout: float | None = None,
    **config_overrides: Any,
) -> Model:
    """Loads a Hugging Face BERT / RoBERTa / ELECTRA / XLNet checkpoint as a Flax classifier.

    The encoder must be in the checkpoint (prefixed ``bert.``/``roberta.``/``electra.``/
    ``transformer.`` or bare, as saved by ``BertModel``); a missing head (BERT's pooler and
    classifier, RoBERTa's and ELECTRA's classifier, XLNet's sequence summary and logits_proj) is
    initialised as Hugging Face does (N(0, initializer_range), zero bias) with a warning that
    names the tensors. Pre-training heads (``cls.``, ``lm_head.``, ELECTRA's
    ``discriminator_predictions.``, XLNet's ``lm_loss.``) are skipped silently.

    Args:
      name_or_path: a local folder (works offline) or a hub name (needs the hub or its cache).
      num_labels: output size; 1 is regression (STS-B). ``None`` keeps the checkpoint's config
        (e.g. to reload a fine-tuned model).
      dtype: compute dtype (parameters stay float32), e.g. ``jnp.bfloat16``.
      seed: seeds the initialisation of a missing head.
      revision: hub revision.
      ignore_mismatched_sizes: re-initialise tensors whose shapes differ from the config (e.g. a
        fine-tuned head with another ``num_labels``) instead of raising.
      dropout: every dropout rate of the model (:func:`dropout_overrides`), e.g. 0 to switch
        dropout off; ``None`` keeps the checkpoint's rates.
      **config_overrides: config attributes to change, e.g. ``hidden_dropout_prob=0.0`` (applied
        after ``dropout``).

    Returns:
      The model in evaluation mode by default: ``model(input_ids, attention_mask,
      token_type_ids)`` gives float32 logits ``(batch, num_labels)``; ``model.config`` is the
      ``transformers`` config.

    Raises:
      OSError / FileNotFoundError: no config or no weights.
      ValueError: unsupported model type, or a tensor whose shape does not fit the config.
      KeyError: encoder tensors missing from the checkpoint.
    """
    name_or_path = os.fspath(name_or_path)
    config = load_config(name_or_path, revision=revision)
    arch = _architecture(config)
    config = _prepare_config(config, num_labels, config_overrides, dropout)
    files = _weight_files(name_or_path, revision)
    state = convert.read_state_dict(files)

    model, report = _build(
        arch, config, dtype, state, seed=seed, ignore_mismatched_sizes=ignore_mismatched_sizes
    )
    if report.initialised:
        warnings.warn(
            f"{name_or_path}: newly initialised (not in the checkpoint): "
            + ", ".join(report.initialised),
            stacklevel=2,
        )
    if report.mismatched:
        warnings.warn(
            f"{name_or_path}: re-initialised (shape mismatch): " + ", ".join(report.mismatched),
            stacklevel=2,
        )
    if report.unexpected:
        warnings.warn(
            f"{name_or_path}: unused checkpoint tensors: "
            + ", ".join(report.unexpected[:8])
            + (", ..." if len(report.unexpected) > 8 else ""),
            stacklevel=2,
        )
    return model


def load_tokenizer(name_or_path: str | os.PathLike, **kwargs: Any) -> Any | None:
    """``transformers.AutoTokenizer`` for a checkpoint, or ``None`` when it has no tokenizer."""
    try:
        return transformers.AutoTokenizer.from_pretrained(os.fspath(name_or_path), **kwargs)
    except (OSError, ValueError, TypeError):
        return None


def save_pretrained(model: Model, directory: str | os.PathLike, tokenizer: Any = "auto") -> None:
    """Writes ``config.json`` + ``model.safetensors`` (+ tokenizer files) to ``directory``.

    ``transformers.AutoModelForSequenceClassification.from_pretrained(directory)`` loads the
    result in PyTorch with the same logits, and so does :func:`from_pretrained`.

    Args:
      model: a model from :func:`from_pretrained` or :func:`from_config` (possibly fine-tuned;
        ``nnx.update(model, params)`` puts trained parameters back into it).
      directory: created if needed.
      tokenizer: a ``transformers`` tokenizer to save alongside; ``"auto"`` (default) saves the
        tokenizer of the checkpoint the model was loaded from, when it has one; ``None`` saves
        none.
    """
    directory = os.fspath(directory)
    config = copy.deepcopy(model.config)
    arch = _architecture(config)
    if isinstance(tokenizer, str) and tokenizer == "auto":
        source = getattr(config, "name_or_path", "") or ""
        tokenizer = load_tokenizer(source) if source else None
    os.makedirs(directory, exist_ok=True)
    config.architectures = [arch.hf_class]
    config.save_pretrained(directory)
    state = convert.state_dict_from_params(nnx.state(model, nnx.Param))
    convert.write_safetensors(state, os.path.join(directory, convert.SAFETENSORS))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
