# Set-up is part of every target: a missing .venv is created and the project installed into it.
# torch 2.13.0 is installed first and on its own: pip takes this CPU build from the machine's
# disk, and the project's torch range then needs nothing more (no multi-GB CUDA download).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ftc-installed
EXAMPLE ?= gpt
STAGES ?= 4
CONFIG ?= configs/$(EXAMPLE).json
ARGS ?=

.PHONY: demo train test regenerate clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade pip
	$(BIN)/python -m pip install -qq torch==2.13.0
	$(BIN)/python -m pip install -qq -e '.[test]'
	touch $@

demo: $(STAMP)
	$(BIN)/ftc compile examples/$(EXAMPLE).py --stages $(STAGES) -o generated/
	$(BIN)/ftc check generated/$(EXAMPLE)
	$(BIN)/ftc train configs/$(EXAMPLE).json

# Train per a config: make train CONFIG=configs/mlp.json ARGS="--set steps=50 --set mode=local"
train: $(STAMP)
	$(BIN)/ftc train $(CONFIG) $(ARGS)

# Two pytest processes (pytest-xdist), each taking whole files so a module's compiled fixtures
# are built once: many tests wait on the processes they start, which leaves a core idle.
# Plain `$(BIN)/python -m pytest tests/test_x.py` runs in one process.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# Rewrite the committed example pipelines (tests/test_generated.py fails when they drift).
regenerate: $(STAMP)
	$(BIN)/python -m tests.regenerate

clean:
	rm -rf $(VENV) build *.egg-info
