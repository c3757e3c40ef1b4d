"""The library without the training extras: run with the Python of a virtual environment that has
only ``pip install .`` (``make test-bare``), in isolated mode (``python -I``), so the package is
the installed one and not this checkout.

It checks that the training extras are absent, that no library module imports them (or the
trainer, configs or benchmarks), and that the library works: a tiny BERT, the Fisher pass, the mask,
a ChildTuning-D and a ChildTuning-F step under ``jax.jit``, and a checkpoint round trip.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import sys
import tempfile

# Installed only by the train extra (orbax, scipy and tqdm come with flax, jax and transformers,
# so for those the check is that the library does not import them).
EXTRAS = ("ml_collections", "datasets", "sklearn")
NOT_IMPORTED = ("ml_collections", "orbax", "datasets", "sklearn", "scipy", "tqdm")
NOT_THE_LIBRARY = ("childtuning_trainer", "configs", "benchmarks", "train")


def check_sources() -> None:
    """No module of the installed library imports an extra, the trainer, configs or benchmarks."""
    spec = importlib.util.find_spec("childtuning_jax")
    root = pathlib.Path(spec.origin).parent
    forbidden = set(NOT_IMPORTED) | set(NOT_THE_LIBRARY)
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in forbidden:
                    raise SystemExit(f"{path}:{node.lineno} imports {name}")


def check_use() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import transformers
    from flax import nnx

    import childtuning_jax as ct
    from childtuning_jax.models import from_config, from_pretrained, save_pretrained

    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    model = from_config(config, num_labels=2)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)
    batches = [
        {
            "input_ids": rng.integers(0, 40, (4, 8)).astype(np.int32),
            "labels": rng.integers(0, 2, (4,)).astype(np.int32),
        }
        for _ in range(2)
    ]

    def loss_fn(params, batch, rng=None):
        module = nnx.merge(graphdef, params, rest)
        logits = module(batch["input_ids"], deterministic=rng is None, dropout_rng=rng)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    fisher = ct.fisher_information(loss_fn, params, batches, max_grad_norm=1.0)
    mask = ct.fisher_mask(fisher, 0.3)
    grads = jax.grad(loss_fn)(params, batches[0])
    for name, child in (
        ("D", ct.child_tuning_d(mask)),
        ("F", ct.child_tuning_f(0.3, jax.random.key(0))),
    ):
        tx = optax.chain(optax.clip_by_global_norm(1.0), child, ct.hf_adamw(1e-2))
        updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
        new = optax.apply_updates(params, updates)
        pairs = zip(jax.tree.leaves(new), jax.tree.leaves(params), strict=True)
        moved = [np.asarray(a != b) for a, b in pairs]
        if name == "D":
            for m, keep in zip(moved, jax.tree.leaves(mask), strict=True):
                assert not np.any(m & ~np.asarray(keep)), "D moved a frozen weight"
        fraction = sum(m.sum() for m in moved) / sum(m.size for m in moved)
        assert 0.0 < fraction < 1.0, (name, fraction)
        print(f"bare install: ChildTuning-{name} step moved {fraction:.3f} of the weights")
    with tempfile.TemporaryDirectory() as directory:
        save_pretrained(model, directory, tokenizer=None)
        again = from_pretrained(directory)
        ids = jnp.asarray(batches[0]["input_ids"])
        np.testing.assert_allclose(again(ids), model(ids), rtol=1e-6, atol=1e-6)


def main() -> None:
    if "--expect-bare" in sys.argv:
        present = [n for n in EXTRAS if importlib.util.find_spec(n) is not None]
        if present:
            raise SystemExit(f"not a bare install: {present} are installed")
    check_sources()
    check_use()
    # tqdm is left out: transformers imports it itself.
    loaded = [n for n in NOT_IMPORTED[:-1] + NOT_THE_LIBRARY if n in sys.modules]
    if loaded:
        raise SystemExit(f"using the library imported {loaded}")
    if "--expect-bare" in sys.argv:
        check_commands_name_the_extra()
    print("bare install: ok")


def check_commands_name_the_extra() -> None:
    """Without the train extra, ``childtuning-train`` says how to install it, in one line."""
    import subprocess

    script = pathlib.Path(sys.executable).parent / "childtuning-train"
    done = subprocess.run([script, "--help"], capture_output=True, text=True)
    expected = (
        'error: childtuning-train needs the train extra: pip install "childtuning-jax[train]"'
    )
    if done.returncode != 1 or not done.stderr.startswith(expected) or done.stderr.count("\n") != 1:
        raise SystemExit(f"childtuning-train without the extra: {done.returncode} {done.stderr!r}")


if __name__ == "__main__":
    main()
