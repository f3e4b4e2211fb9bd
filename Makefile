# The two set-up commands of the README: `make demo` (the main job) and `make test`.
# Both create ./.venv on first use and install edgetl into it (editable).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= train,openvino,dev
STAMP := $(VENV)/.edgetl-installed

.PHONY: test demo install clean system-deps gst-env arm64-check jetson-userland-check

# A new venv with the train extra holds ~7 GiB on Linux x86_64 (PyPI's torch there is a CUDA build that
# pulls ~4 GiB of NVIDIA libraries): say so before pip runs out of disk half-way.
NEED_GIB ?= $(if $(findstring train,$(EXTRAS)),8,1)
DISK_CHECK = import os, shutil, sys; free = shutil.disk_usage(os.path.dirname(os.path.abspath('$(VENV)'))).free / 2**30; \
	sys.exit(0 if free >= $(NEED_GIB) else f'make: {free:.1f} GiB free where $(VENV) goes; a new venv with edgetl[$(EXTRAS)] needs about $(NEED_GIB) GiB. Free some space, or put the venv on a larger disk: make VENV=/big/disk/venv ...')

# pip's own output (and the warnings of the packages it builds) goes to $(VENV)/install.log, so that the
# demo's log holds edgetl's lines only; when pip fails, the end of that log is shown.
# deepforest's wheel ships the NEON tree-crown images + Pascal VOC boxes `edgetl data trees` reads; only its
# data is used, so not its ~25 dependencies (lightning, geopandas, rasterio, ...).
$(STAMP): pyproject.toml
	@test -x $(PY) || { $(PYTHON) -c "$(DISK_CHECK)" && echo "creating $(VENV) ($(PYTHON) -m venv)" && $(PYTHON) -m venv $(VENV); }
	@echo "installing edgetl[$(EXTRAS)] into $(VENV) (a few minutes the first time; pip's output: $(VENV)/install.log)"
	@{ $(PY) -m pip install --upgrade "pip>=24" "setuptools>=68" wheel && \
	   $(PY) -m pip install -e ".[$(EXTRAS)]" && \
	   $(PY) -m pip install --no-deps "deepforest==2.1.0"; } > $(VENV)/install.log 2>&1 || \
	 { tail -n 25 $(VENV)/install.log; echo "make: pip failed installing edgetl[$(EXTRAS)] (its whole output: $(VENV)/install.log)"; exit 1; }
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The main job on real data: ELPV -> fine-tuned EfficientNet-Lite0 -> INT8 for two x86 targets (gated)
# -> the device runtime on a 720p conveyor video -> side-by-side benchmark -> summary. FULL=1: better recipe.
# TASK=detect: the detection leg (conveyor scenes of real cells -> SSDLite detector -> INT8 -> tracked counts).
demo: $(STAMP)
	$(PY) -m edgetl.demo $(if $(FULL),--full,) $(if $(TASK),--task $(TASK),)

# The stream tests' system packages (GStreamer's RTSP server, GStreamer plugins, Debian's OpenCV with
# GStreamer, mosquitto, chromium): Debian/Ubuntu, as root. Without them those tests skip, saying so.
system-deps:
	.ci/system-deps.sh

# A venv on the system python3 that sees Debian's OpenCV (built with GStreamer, unlike the pip wheel):
# tests/test_streams*.py run gst:, csi:// and GStreamer RTSP through it (EDGETL_GST_PYTHON to use another).
SYSTEM_PYTHON ?= /usr/bin/python3
GST_PY := $(VENV)/gst/bin/python
gst-env:
	test -x $(GST_PY) || $(SYSTEM_PYTHON) -m venv --system-site-packages $(VENV)/gst
	$(GST_PY) -m pip install --no-deps -e .
	$(GST_PY) -m pip install "onnxruntime>=1.17" "click>=8.1" "rich>=13"
	$(GST_PY) -c "from edgetl.runtime.sources import opencv_has_gstreamer as g; assert g(), 'no GStreamer in this OpenCV: sudo make system-deps'"

# The ARM target's gate on ARM kernels without a board: a Debian arm64 root under qemu-user emulation
# (root on Debian/Ubuntu; installs qemu-user-static, binfmt-support, mmdebstrap, arch-test), cached in
# ~/.cache/edgetl/arm64-root: the core install of this checkout, the runtime's torch-free tests, and
# `edgetl check` of artifacts compiled here for arm64-cpu-onnxruntime (the demo's too once `make demo`
# has trained it). Writes benchmarks/results/arm64_check_bookworm.json. ARM64_ARGS: more options (--help).
DEMO_RUN ?= demo/runs/elpv-lite0
arm64-check: $(STAMP)
	$(PY) .ci/arm64_check.py --suite bookworm $(if $(wildcard $(DEMO_RUN)/manifest.json),--demo $(DEMO_RUN),) $(ARM64_ARGS)

# The oldest Jetson userland the profiles offer (JetPack 5: glibc 2.31) in a Debian bullseye arm64 root
# (Python 3.9): the core install, the torch-free tests, `edgetl check` and `edgetl run` of a tiny artifact.
jetson-userland-check: $(STAMP)
	$(PY) .ci/arm64_check.py --suite bullseye $(ARM64_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
