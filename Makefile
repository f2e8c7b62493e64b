# Two entry points: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv when it is missing and install the project into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOPT_DATA_DIR ?= $(abspath ../shared/data)
export LOPT_DATA_DIR

.PHONY: demo test lint setup clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# The shipped learned optimizer against tuned AdamW on an unseen model, then a short
# meta-training of its rule (scripts/demo.py; the v0.2 demo is scripts/demo_unf_mlp.py).
demo: setup
	$(PY) scripts/demo.py

# The suite includes the docstring examples of the three packages (doctests); two workers
# (pytest-xdist): 1,099 s for 424 items on the 2-core machine shared with a meta-training.
test: setup
	XLA_FLAGS=--xla_force_host_platform_device_count=2 $(PY) -m pytest -n 2 --durations=25 tests --doctest-modules learned_opt meta_train tasks

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs wandb .pytest_cache
