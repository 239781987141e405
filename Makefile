# The two commands of the README. Each creates .venv when it is missing (or stale).
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# `make demo` needs only the demo and curation extras (not torch, libtpu, apache-beam, pytest: the
# test extra); a venv that `make test` set up has them too
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: demo test long lint

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	# open_clip's own tokenizer.py, a test reference (its package needs torchvision: read the file only)
	$(VENV)/bin/python -m pip download -q --no-deps open-clip-torch==3.3.0 -d $(VENV)/open_clip_ref
	$(VENV)/bin/python -m zipfile -e $(VENV)/open_clip_ref/open_clip_torch-3.3.0-py3-none-any.whl $(VENV)/open_clip_ref
	touch $(STAMP)

$(DEMO_STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	test $(STAMP) -nt pyproject.toml || { \
		$(VENV)/bin/python -m pip install -q --upgrade pip && \
		$(VENV)/bin/python -m pip install -q -e '.[demo,curation]'; }
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(VENV)/bin/pathor1 demo

test: $(STAMP)
	$(VENV)/bin/ruff check pathor1_jax tests bench configs
	$(VENV)/bin/ruff format --check pathor1_jax tests bench configs
	$(VENV)/bin/python -m pytest -q --durations=30 tests

# CI's second step: the tests too long for the suite's 25 minutes, run by the suite's own files: the
# seven shipped configs' TPU compiles it leaves out (minutes each, two at a time; see
# tests/test_shipped_configs_fit.py) and the demo's RL-learning check (tests/test_train_demo.py)
long: $(STAMP)
	PATHOR1_FIT_CELLS=rest PATHOR1_DEMO_RL=1 $(VENV)/bin/python -m pytest -q -rP --durations=10 \
		tests/test_train_demo.py tests/test_shipped_configs_fit.py

lint: $(STAMP)
	$(VENV)/bin/ruff check pathor1_jax tests bench configs
	$(VENV)/bin/ruff format --check pathor1_jax tests bench configs
