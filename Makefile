# Two commands set everything up on a machine with Python >= 3.11 and pip:
#   make demo   chip, train, detect on the bundled NEON sample (creates .venv on first run)
#   make test   run the test suite (creates .venv on first run)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.geonet-installed
DEMO := demo-out
SAMPLE := examples/data/OSBS_029.tif
SAMPLE_LABELS := examples/data/OSBS_029_trees.geojson

.PHONY: demo test venv bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/geonet check --imagery $(SAMPLE) --labels $(SAMPLE_LABELS) --class-field label
	$(BIN)/geonet chip --imagery $(SAMPLE) --labels $(SAMPLE_LABELS) --class-field label \
		-o $(DEMO)/chips --size 256 --stride 192 --split val=0.25 --preview 4 --overwrite
	@echo "demo: chips in $(DEMO)/chips, previews in $(DEMO)/chips/preview"

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(DEMO) .pytest_cache
