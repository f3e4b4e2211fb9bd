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
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	test -f data/elpv/elpv_meta.csv || $(VENV)/bin/edgetl data elpv data/elpv --task binary --overwrite
	$(VENV)/bin/edgetl train data/elpv --backbone efficientnet_lite0 --mode feature-extract --out runs/elpv-lite0 --overwrite
	$(VENV)/bin/edgetl predict runs/elpv-lite0 data/elpv/defective/$$(ls data/elpv/defective | head -1) --top-k 2

clean:
	rm -rf $(VENV) .pytest_cache
