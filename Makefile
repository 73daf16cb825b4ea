# Two commands on a fresh machine: `make run` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run test lint typecheck bench bench-smoke clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $(STAMP)

run: install
	$(VENV)/bin/evergreen run

test: install
	bash scripts/ensure-systemd-analyze.sh
	bash scripts/ensure-prometheus.sh
	bash scripts/ensure-debian-policy.sh
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy daemon policies store
	$(VENV)/bin/lint-imports
	$(PY) -m pytest
	$(MAKE) bench-smoke

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy daemon policies store
	$(VENV)/bin/lint-imports

# Every benchmark, full size (slow: tens of minutes on 2 cores).
bench: install
	bash scripts/ensure-debian-policy.sh
	@set -e; for b in benchmarks/[!_]*.py; do echo "== $$b"; $(PY) $$b; done

# Every benchmark with --smoke: tiny sizes, the real path, and a check that the JSON line
# has every field the full run prints. A new benchmarks/*.py is picked up by the loop.
bench-smoke: install
	@set -e; for b in benchmarks/[!_]*.py; do \
		echo "== $$b --smoke"; start=$$(date +%s); \
		$(PY) $$b --smoke || { echo "FAILED: $$b --smoke" >&2; exit 1; }; \
		echo "== $$b --smoke: $$(( $$(date +%s) - start )) s"; \
	done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
