# The README's two commands. Each sets up .venv on a fresh machine first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_CPU := torch==2.13.0

.PHONY: setup test test-all train clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Two pytest workers (pytest-xdist): most tests wait on one XLA compile or one eager torch op.
test: setup
	$(PY) -m pytest -q -n $${TEST_WORKERS:-2} --dist loadgroup --durations=25

test-all: setup
	$(PY) -m pytest -q -m '' -n $${TEST_WORKERS:-2} --dist loadgroup

train: setup
	rm -rf runs/vit-digits
	XLA_FLAGS="--xla_force_host_platform_device_count=$${DEVICES:-2}" $(PY) -m train vit-digits --parallel pmap --workdir runs/vit-digits --export runs/vit-digits/vit-digits.safetensors

clean:
	rm -rf $(VENV) runs .pytest_cache *.egg-info
