# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SHARED_DATA ?= ../shared/data/real

.PHONY: install demo test lint sandbox bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## The main job once on the embedded default: embedded PostgreSQL under ./data, the local
## sandbox API, the default tickers and timeframes; then the status table, the holes left
## (none) and the coverage heatmap in reports/.
demo: $(STAMP)
	$(BIN)/polygon-backfill once --with-sandbox
	$(BIN)/polygon-backfill status
	-$(BIN)/polygon-backfill gaps
	$(BIN)/polygon-backfill report

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

## A sandbox on :8010 serving the real CSV data (synthetic bars for other tickers).
sandbox: $(STAMP)
	$(BIN)/polygon-backfill sandbox --data-dir $(SHARED_DATA)

## Speed: the seed's workload, every mode and the official client side by side (a few
## minutes), then the bulk-upsert micro-benchmark. Figures in README.md; JSON in bench/results.
bench: $(STAMP)
	$(BIN)/python -m bench.speed $(BENCH_ARGS)
	$(BIN)/python -m bench.upsert

clean:
	rm -rf $(VENV) data .pytest_cache .ruff_cache
