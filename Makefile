# Two entry points on a fresh machine: `make demo` (the main job end to end) and `make test`.
PY := .venv/bin/python
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export PIP_CACHE_DIR := $(CURDIR)/.cache/pip
export MPLCONFIGDIR := $(CURDIR)/.cache/matplotlib
export HF_HUB_OFFLINE := 1
export AIRFLOW_HOME := $(CURDIR)/.ckl/airflow
export AIRFLOW__CORE__LOAD_EXAMPLES := False

.PHONY: setup demo test test-slow bench clean

setup: .venv/.installed

.venv/.installed: pyproject.toml requirements.lock scripts/setup.sh
	bash scripts/setup.sh
	touch $@

demo: setup
	$(PY) -m cli.demo

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow || [ $$? -eq 5 ]  # 5: no slow test selected

bench: setup
	$(PY) bench/model.py

clean:
	.venv/bin/ckl services down || true
	rm -rf .ckl .cache
