# Two commands: `make run` and `make test`. Both create .venv and install into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# The CPU wheel lies on disk; installing it before the package keeps pip from
# resolving torch>=2.2 to a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: run test install clean bench

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/promvae serve $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/accuracy.py --data ../shared/data/nab
	$(PY) benchmarks/training_speed.py

clean:
	rm -rf $(VENV) build *.egg-info
