# The two commands of the README. Both create or update .venv from the project's own files.
PY ?= python3.11
VENV := .venv
PIP := $(VENV)/bin/pip
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup pretrain bench clean chromium

$(STAMP): pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# plain pip: it takes the pinned torch/torchvision pair from the local wheel cache where one exists
	$(PIP) install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# Main job on the offline default: shapes world + committed pretrained models + the Ray
# actor-learner system on a local cluster.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/vlrm train --config configs/shapes.yaml $(ARGS)

# Debian's chromium opens the HTML reports in the tests (installed where the user may: root, as in CI)
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; } || \
	  echo "chromium is not installed: the report tests will be skipped"

test: $(STAMP) chromium
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PYTHON) -m pytest -q $(ARGS)

pretrain: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/vlrm pretrain-shapes --data data/shapes --out models/shapes

clean:
	rm -rf $(VENV) runs data
