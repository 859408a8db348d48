# ppl-vae: `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup data demo test lint bench clean

setup: $(STAMP)

# torch / torchvision are pinned in constraints.txt: the pair that installs and works here.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --constraint constraints.txt --editable ".[dev,lessons]"
	touch $(STAMP)

# Fashion-MNIST from the Debian package, where apt-get is usable as root; otherwise say how.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then \
	  echo "Fashion-MNIST: /usr/share/datasets/fashion-mnist"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	  { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }; \
	else \
	  echo "Fashion-MNIST not installed: sudo apt-get install dataset-fashion-mnist," \
	       "or set PPL_VAE_DATA, or run '$(BIN)/ppl-vae download fashion-mnist' with internet."; \
	fi

demo: setup data
	$(BIN)/ppl-vae demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup data
	$(BIN)/python benchmarks/train_speed.py
	$(BIN)/python benchmarks/iwae_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
