# The two commands of the README. Each creates .venv when it is missing (or stale).
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pathor1 demo

test: $(STAMP)
	$(VENV)/bin/ruff check pathor1_jax tests bench configs
	$(VENV)/bin/python -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check pathor1_jax tests bench configs
