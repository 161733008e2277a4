# Entry points: `make serve` (the service), `make test` (the suite), `make run` (one replica, no service).
# Each creates .venv and installs what it needs on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch for machines without a GPU. It is installed only when
# the venv has no torch yet, so a GPU user who installed a CUDA build first keeps it.
TORCH_SPEC ?= torch==2.13.0
# pip byte-compiles every module it installs, one file after another (40 of the install's 67 s
# here). Installed with --no-compile, then compiled on every core at once, but for the two big
# packages only the tests' own process imports (transformers, sympy): those are compiled when first
# imported, and kept, as the entry points below let Python keep what it compiles (PYTHONDONTWRITEBYTECODE
# unset). Every Ray worker process imports torch and Ray: compiled before, not in each of them.
# (compileall's status is ignored: a test file or two inside torch uses a newer Python's syntax.)
PIP_INSTALL := $(PY) -m pip install -q --no-compile
COMPILE := $(PY) -m compileall -q -j 0 -x '/(transformers|sympy)/'
RUN := env -u PYTHONDONTWRITEBYTECODE
DEMO_DIR ?= models/demo
PROMPT ?= The list type

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install serve run test lint clean protos

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP_INSTALL) "$(TORCH_SPEC)"
	$(PIP_INSTALL) -e ".[test]"
	$(COMPILE) "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" > /dev/null 2>&1 || true
	touch $(STAMP)

# the embedded default: demo model (trained on first use), 2 replicas x 2 stages, gRPC on 127.0.0.1:50051
serve: $(STAMP)
	$(RUN) $(VENV)/bin/ringpipe serve $(if $(CONFIG),--config $(CONFIG))

run: $(STAMP)
	$(RUN) $(VENV)/bin/ringpipe model demo $(DEMO_DIR)
	$(RUN) $(VENV)/bin/ringpipe run --model $(DEMO_DIR) --stages 2 --prompt "$(PROMPT)" --max-new-tokens 48

test: $(STAMP)
	$(RUN) $(PY) -m pytest -q -p no:cacheprovider -n 2 $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Regenerate the gRPC stubs under protos/ringpipe/ from protos/ringpipe/v1/*.proto
# (needs grpcio-tools in the venv). Commit the result; tests/protos checks it is fresh.
protos: $(STAMP)
	$(PY) -m protos.generate

clean:
	rm -rf $(VENV) .pytest_cache
