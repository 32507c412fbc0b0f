# The two commands of the README: `make demo` and `make test`. Both install what is missing.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test lint demo demo-bank bench stress fuzz clean deb deb-check systemd-check man openapi

setup:
	@scripts/bootstrap

lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy

# The whole suite on SoftHSM2 in TEST_WORKERS processes at once (pytest-xdist: one process alone left a core
# idle about half the time, its tests waiting on daemons, banks and the token), then its core (-m core, see
# tests/conftest.py) on the other modules of the matrix: SoftHSM2 behind p11-kit's RPC, NSS's softoken
# (init_args), and tpm2-pkcs11 on a software TPM, one process per file there (tpm2-abrmd holds at most 100
# loaded keys per connection), TEST_WORKERS runs at a time (tests/matrix.py). TEST_WORKERS=0: all one at a time.
# The tests start the agent, the model bank and the demo in many processes: their bytecode is compiled here once,
# or with PYTHONDONTWRITEBYTECODE set each process would compile every module it imports again (a fifth of the
# CPU time of tests/test_cli_x509.py).
TEST_WORKERS ?= 2
test: lint
	$(PY) -m compileall -q agent pkcs11_backends modelbank demo softhsm bench fuzz tests
	$(PY) -m pytest -q -n $(TEST_WORKERS)
	$(PY) -m tests.matrix --jobs $(TEST_WORKERS)

demo: setup
	$(PY) -m demo

# After `make demo`: its model bank again, for the demo's config (.state/demo), until Ctrl-C (README: After the demo).
demo-bank: setup
	$(PY) -m demo --serve-bank

# Bounded stress/soak runs (tests marked slow, left out of `make test`); see docs/reliability.md.
stress: setup
	$(PY) -m pytest -q -s -m slow tests/stress

# Coverage-guided fuzzing of request framing, routing and JSON decoding (atheris); new inputs join the corpus,
# which `make test` replays. Findings are written as fuzz/findings-*.
FUZZ_SECONDS ?= 600
fuzz: setup
	$(PY) -m pip install -q --disable-pip-version-check -c $(VENV)/constraints.txt atheris
	$(PY) -m fuzz.http_target fuzz/corpus/http -max_total_time=$(FUZZ_SECONDS) -max_len=4096 \
		-artifact_prefix=fuzz/findings-

# The bench's own waits have deadlines; this one bounds the whole run (a full run takes ~11 minutes; SIGTERM
# lets it stop the daemons it started).
bench: setup
	timeout --kill-after=90 3600 $(PY) -m bench

# The Debian package (docs/packaging.md): dist/tpp-agent_VERSION_ARCH.deb for this machine's Debian release.
# Installs debhelper, dh-python and the other build tools when missing (root); `make test` needs none of them.
deb:
	@scripts/deb-build

# Build, install, check (units, doctor on a SoftHSM2 token) and purge the package on this machine (root).
# In the Debian 13 chroot: scripts/debian13-chroot run DIR scripts/deb-check
deb-check:
	@scripts/deb-check

# The package's units under a real systemd: ROOTFS (a Debian 12 or 13 root file system, default the Debian 13
# chroot /var/tmp/tpp-d13) booted with systemd-nspawn on a throw-away overlay (root, a few minutes; docs/packaging.md).
systemd-check:
	@scripts/systemd-check $(ROOTFS)

# tpp-agent(1), generated from the parser: build/man/tpp-agent.1 (man -l build/man/tpp-agent.1).
man: setup
	@mkdir -p build/man
	$(PY) scripts/manpage > build/man/tpp-agent.1

# docs/openapi.json, the socket API's description, made from the routes and the operations' specs
# (tests/daemon/test_openapi.py fails while the committed one differs).
openapi: setup
	$(PY) -m agent.daemon.openapi > docs/openapi.json.new || { rm -f docs/openapi.json.new; exit 1; }
	mv docs/openapi.json.new docs/openapi.json

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build dist
