# One entry point for humans and CI. Every target sets itself up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup serve test check-deploy lint bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## Set up, then serve the demo config (a small random-weight ViT on CPU) on http://127.0.0.1:8000
serve: $(STAMP)
	$(BIN)/tome-serve --config service/configs/cpu-demo.toml --host 127.0.0.1 --port 8000

## Set up, then run lint, the deploy checks and the test suite (what .ci/run calls).
## Installs Debian's prometheus when run as root (the live Prometheus test needs it).
test: $(STAMP)
	bash scripts/install-test-deps.sh
	$(BIN)/ruff check .
	bash scripts/check-deploy.sh
	$(BIN)/python -m pytest -q

check-deploy:
	bash scripts/check-deploy.sh

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m models.bench --model vit_small_patch16_224 --batch-size 16 --device cpu
