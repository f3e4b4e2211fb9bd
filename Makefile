# The two set-up commands of the README: `make demo` (the main job) and `make test`.
# Both create ./.venv on first use and install edgetl into it (editable).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= train,openvino,dev
STAMP := $(VENV)/.edgetl-installed

.PHONY: test demo install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade "pip>=24" "setuptools>=68" wheel
	$(PY) -m pip install -e ".[$(EXTRAS)]"
	# deepforest's wheel ships the NEON tree-crown images + Pascal VOC boxes `edgetl data trees` reads;
	# only its data is used, so not its ~25 dependencies (lightning, geopandas, rasterio, ...)
	$(PY) -m pip install --no-deps "deepforest==2.1.0"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The main job on real data: ELPV -> fine-tuned EfficientNet-Lite0 -> INT8 for two x86 targets (gated)
# -> the device runtime on a 720p conveyor video -> side-by-side benchmark -> summary. FULL=1: better recipe.
# TASK=detect: the detection leg (conveyor scenes of real cells -> SSDLite detector -> INT8 -> tracked counts).
demo: $(STAMP)
	$(PY) -m edgetl.demo $(if $(FULL),--full,) $(if $(TASK),--task $(TASK),)

clean:
	rm -rf $(VENV) .pytest_cache
