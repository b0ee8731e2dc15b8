# Two commands set everything up on a machine with Python >= 3.11 and pip:
#   make demo   check, chip, train, detect and evaluate on the bundled NEON sample (creates .venv on first run)
#   make test   run the test suite (creates .venv on first run)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.geonet-installed
DEMO := demo-out
SAMPLE := examples/data/OSBS_029.tif
SAMPLE_LABELS := examples/data/OSBS_029_trees.geojson
WEIGHTS := examples/weights/mobilenet_v2_imagenet.pth

.PHONY: demo test venv clean bench-peers

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/geonet check --imagery $(SAMPLE) --labels $(SAMPLE_LABELS) --class-field label
	$(BIN)/geonet chip --imagery $(SAMPLE) --labels $(SAMPLE_LABELS) --class-field label -o $(DEMO)/chips \
		--size 128 --stride 64 --split val=0.25 --split-by block --preview 4 --overwrite
	-$(BIN)/python examples/fetch_weights.py $(WEIGHTS)
	$(BIN)/geonet train --chips $(DEMO)/chips -o $(DEMO)/run \
		--weights $$(if [ -f $(WEIGHTS) ]; then echo $(WEIGHTS); else echo none; fi) \
		--steps 300 --overwrite --no-progress
	$(BIN)/geonet detect $(SAMPLE) -m $(DEMO)/run/best.pt -o $(DEMO)/trees.geojson --preview $(DEMO)/trees.png \
		--overwrite --no-progress
	$(BIN)/geonet evaluate --model $(DEMO)/run/best.pt --imagery $(SAMPLE) --truth $(SAMPLE_LABELS) --iou 0.4 \
		--aoi $(DEMO)/run/val_area.geojson -o $(DEMO)/report --overwrite
	@echo "demo: chips and previews in $(DEMO)/chips, run in $(DEMO)/run, detections $(DEMO)/trees.geojson" \
		"(open it in QGIS over $(SAMPLE)), preview $(DEMO)/trees.png, report $(DEMO)/report/report.md" \
		"(scored on the validation blocks only: ground the model did not train on)"

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(DEMO) .pytest_cache

# Peers for bench/seam_bench.py and bench/torchgeo_labels_bench.py only (SAHI, DeepForest, TorchGeo), in their own venv.
bench-peers: $(STAMP)
	$(PYTHON) -m venv bench/.venv-peers
	bench/.venv-peers/bin/python -m pip install --quiet sahi deepforest torchgeo==0.8.1 requests pyarrow pyogrio pycocotools
	bench/.venv-peers/bin/python -m pip install --quiet --no-deps -e .
