# Quick start:  make demo   (set-up + the Fashion-MNIST demo)   |   make test   (set-up + the whole suite)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.paws-setup-stamp
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
PYTEST_ARGS ?=

.PHONY: setup system-packages demo demo-60pc test lint bench clean-venv

# Idempotent: the stamp is rebuilt only when the packaging files change.
setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	@$(MAKE) --no-print-directory system-packages
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt torch torchvision
	$(PIP) install -c constraints.txt -e '.[dev]'
	@$(BIN)/python -c "import torch, torchvision, timm; print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| timm', timm.__version__)"
	@touch $(STAMP)

# Debian's Fashion-MNIST (the embedded real dataset). Installed with apt-get as root or through sudo;
# otherwise we say exactly what to run.
system-packages:
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "paws: cannot install system packages without root. Run:"; \
	     echo "  sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"; \
	     echo "or, without root: apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb ./data/deb"; \
	     echo "     and pass data.root=./data/deb/usr/share/datasets/fashion-mnist"; exit 0; fi; \
	echo "paws: installing dataset-fashion-mnist with apt-get"; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: setup
	$(BIN)/paws demo --recipe fmnist_demo

demo-60pc: setup
	$(BIN)/paws demo --recipe fmnist_60pc

bench: setup
	$(BIN)/python benchmarks/train_step.py

clean-venv:
	rm -rf $(VENV)
