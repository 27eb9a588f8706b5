# synthdx: `make run` sets up and runs the pipeline on the demo data; `make test` runs the tests.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.synthdx-installed
# A CUDA build of torch only where an NVIDIA GPU answers; elsewhere the CPU build, so a
# CPU-only machine never downloads several GB of CUDA libraries.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),torch==2.14.1,torch==2.13.0)
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup run test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check '$(TORCH_SPEC)' 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]' 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(BIN)/python -c "import torch, pydicom, prefect, mlflow, dvc; print('synthdx env ready: torch', torch.__version__)"
	@touch $(STAMP)

run: setup
	$(BIN)/synthdx run
	@echo
	@echo "Outputs:"
	@echo "  raw DICOM archive + labels : data/raw/ (montage: data/raw/montage.png)"
	@echo "  processed dataset          : data/processed/ (manifest.parquet, images/, headers/)"
	@echo "  ingest report              : data/processed/ingest_report.json"
	@echo "  diffusion model            : data/diffusion/model.pt (registered in MLflow)"
	@echo "  synthetic dataset          : data/synthetic/ (montage.png, dicom/)"
	@echo "  audit + released set       : data/audit/audit.json, data/audit/released/"
	@echo "  classifiers                : data/classifiers/<task>/<regime>/seed<k>/"
	@echo "  validation report          : reports/validation.html (numbers: reports/validation.json)"
	@echo "  champion models            : models:/synthdx-classifier-<task>@champion (MLflow registry)"
	@echo "  MLflow runs                : synthdx ui  (MLflow UI on mlflow.db, http://127.0.0.1:5000)"
	@echo "  stage status               : synthdx status"

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check flows tasks models benchmarks tests infra

clean:
	rm -rf data reports mlflow.db
