# Two commands on a fresh machine: `make run` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run test lint typecheck bench clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $(STAMP)

run: install
	$(VENV)/bin/evergreen run

test: install
	bash scripts/ensure-systemd-analyze.sh
	bash scripts/ensure-prometheus.sh
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy daemon policies store
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy daemon policies store

bench: install
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/continual.py
	$(PY) benchmarks/swap.py
	$(PY) benchmarks/freshness.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
