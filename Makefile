# The two commands of the README: `make demo` (install + main job) and `make test` (install + lint + tests).
PY ?= python3.11
VENV := .venv
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
LABEL_STAMP := $(VENV)/.installed-label

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

# MONAI Label 0.8.5 beside the pinned stack: its dependencies under the installed versions as
# constraints, then monailabel and pydicom-seg without their numpy<2 / jsonschema<4 requirements.
$(LABEL_STAMP): $(STAMP)
	$(PIP) freeze | grep -iE '^(numpy|torch|torchvision|monai|nnunetv2|jsonschema)==' > $(VENV)/pins.txt
	$(PIP) install -q -e ".[dev,label]" -c $(VENV)/pins.txt
	$(PIP) install -q --no-deps monailabel==0.8.5 pydicom-seg==0.4.1
	touch $(LABEL_STAMP)

install: $(STAMP)
install-label: $(LABEL_STAMP)

demo: $(STAMP)
	$(VENV)/bin/python scripts/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check tpp_monai tests scripts benchmarks apps

test: $(LABEL_STAMP) lint
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider tests

# Everything but the end-to-end runs marked slow (bundle, nnU-Net, label-server and study runs).
test-fast: $(LABEL_STAMP) lint
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not slow" tests

.PHONY: install install-label demo lint test test-fast
