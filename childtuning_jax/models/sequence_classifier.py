"""The interface the four ``*ForSequenceClassification`` models share: their config and call.

Every model is called as ``model(input_ids, attention_mask=None, token_type_ids=None, *,
deterministic=True, dropout_rng=None, perturb_embeddings=None)`` and returns float32 logits
``(batch, num_labels)``. ``perturb_embeddings`` is applied to the word-embedding lookup before
anything is added to it (R3F's noise on input embeddings); ``None`` leaves the model unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from childtuning_jax.models.blocks import EmbeddingHook, Key, dropout_keys, take


class SequenceClassifier(nnx.Module):
    """A ``transformers`` sequence classifier: a backbone, then a head on its output.

    ``config.num_labels == 1`` is regression. A subclass sets ``frozen_config`` (a
    :class:`~childtuning_jax.models.blocks.FrozenConfig`) and its modules, and names them through
    :attr:`backbone`, :meth:`head_dropout` and :meth:`head`. A training call splits one dropout
    key per site: the backbone's ``num_keys`` first, then the head's.
    """

    @property
    def config(self) -> Any:
        """The ``transformers`` config (read-only)."""
        return self.frozen_config.config

    @property
    def backbone(self) -> nnx.Module:
        """The pretrained model: called as ``backbone(input_ids, attention_mask, token_type_ids,
        keys, perturb_embeddings)``, with ``num_keys`` dropout keys (``None`` in evaluation)."""
        raise NotImplementedError

    def head_dropout(self) -> tuple[int, tuple[float, ...]]:
        """The head's number of dropout keys, and the rates not in the config (to tell whether a
        training call needs a key)."""
        raise NotImplementedError

    def head(self, encoded: Any, keys: Key) -> jax.Array:
        """Logits (compute dtype) from the backbone's output, with the head's dropout keys."""
        raise NotImplementedError

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        deterministic: bool = True,
        dropout_rng: jax.Array | None = None,
        perturb_embeddings: EmbeddingHook | None = None,
    ) -> jax.Array:
        """Float32 logits of shape ``(batch, num_labels)``.

        Training mode is ``deterministic=False`` with an explicit ``dropout_rng`` key.
        ``perturb_embeddings`` maps the word-embedding lookup ``(batch, seq, features)`` (the
        embedding width: ELECTRA's ``embedding_size``, XLNet's ``d_model``) before positions and
        token types are added and before ELECTRA's projection to ``hidden_size`` (e.g. R3F's
        noise); ``None`` leaves it unchanged.
        """
        n = self.backbone.num_keys
        head_keys, rates = self.head_dropout()
        keys = dropout_keys(self.config, deterministic, dropout_rng, n + head_keys, rates)
        encoded = self.backbone(
            input_ids, attention_mask, token_type_ids, take(keys, slice(0, n)), perturb_embeddings
        )
        return self.head(encoded, take(keys, slice(n, None))).astype(jnp.float32)
