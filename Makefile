# One entry point for humans and CI. Every target sets itself up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LOCK   := requirements/dev.txt

.PHONY: setup serve test check-deploy lint bench lock

# Exactly the locked versions (hash-checked), then this project itself without touching them.
$(STAMP): pyproject.toml $(LOCK)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "tome-serve needs Python >= 3.11, found " + sys.version.split()[0] + " (set PYTHON=python3.11)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
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

## Re-pin requirements/*.txt from pyproject.toml (see scripts/lock.sh); commit the result.
lock:
	bash scripts/lock.sh

check-deploy:
	bash scripts/check-deploy.sh

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m models.bench --model vit_small_patch16_224 --batch-size 16 --device cpu
