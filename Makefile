# Two entry points, both idempotent on a fresh machine: `make repro` (set up, then run the pipeline on the
# embedded synthetic world) and `make test` (set up, then run the test suite).
VENV := .venv
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120

.PHONY: setup repro test flow replay s3

setup: $(STAMP)

# torch first: `torch==2.13.0` takes the CPU wheel; anything looser drags in multi-GB CUDA builds. The lock is the
# whole tested set, so it installs with --no-deps: torchrec's metadata asks for the CUDA fbgemm-gpu, and the lock
# holds fbgemm-gpu-cpu instead.
$(STAMP): requirements.lock pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q pip==26.3
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q --no-deps -r requirements.lock
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

repro: setup
	dvc repro

# The S3 tests run against a local moto_server that this starts and stops (S3_TEST_ENDPOINT: MinIO or AWS instead).
test: setup
	if [ -n "$$S3_TEST_ENDPOINT" ]; then pytest; else python infra/local_s3.py --port 0 -- pytest; fi

# A local S3 endpoint for development: 127.0.0.1:5555, bucket semid (prints the settings to export).
s3: setup
	python infra/local_s3.py

flow: setup
	python -m flows.daily

# The loop on a simulated clock: 120 days of the default world across the April codebook refresh.
replay: setup
	semid replay --start 2026-02-20 --days 120
