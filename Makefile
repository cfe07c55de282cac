# `make demo` and `make test` each create or refresh .venv, then do their job.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: venv demo test test-fast clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# CPU stack: torch CPU wheel + fbgemm-gpu-cpu, then torchrec without its CUDA fbgemm-gpu dependency.
	$(VPY) -m pip install -q -c constraints.txt torch fbgemm-gpu-cpu tensordict torchmetrics pyre-extensions iopath tqdm numpy PyYAML tabulate torchx pytest hypothesis matplotlib tensorboard
	$(VPY) -m pip install -q --no-deps -c constraints.txt torchrec
	# optional MLPerf log output; --no-deps: mllog needs only the stdlib (pandas/scipy serve its compliance checker)
	$(VPY) -m pip install -q --no-deps -c constraints.txt mlperf-logging
	$(VPY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: venv
	$(VPY) -m torchrec_compress.cli demo

test: venv
	$(VPY) -m pytest -q -ra tests

test-fast: venv
	$(VPY) -m pytest -q -ra -m "not slow" tests

clean:
	rm -rf $(VENV) .pytest_cache
