# rrc: top-level entry points. `make demo` and `make test` are the README's two commands; both
# install what they need first (integration/setup.sh is idempotent and quick once done).
SHELL := /bin/bash
CARGO ?= cargo
TARGET_DIR := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)
SHIM_DEBUG := $(TARGET_DIR)/debug/containerd-shim-rrc-v2
SHIM_RELEASE := $(TARGET_DIR)/release/containerd-shim-rrc-v2
PREFIX ?= /usr/local
# Integration tests share two cores; more threads only make them slower and flakier.
TEST_THREADS ?= 2

.PHONY: all setup build release install test lint unit integration demo bench campaign clean

all: build

## Install packages, CRIU 4.2 and the local images (idempotent).
setup:
	integration/setup.sh

build: setup
	$(CARGO) build --workspace --bins --locked

release: setup
	$(CARGO) build --release --workspace --bins --locked

## Install the shim where containerd finds it (io.containerd.rrc.v2 -> containerd-shim-rrc-v2),
## and hybrid mode's recorder next to it.
install: release
	install -D -m 0755 $(SHIM_RELEASE) $(DESTDIR)$(PREFIX)/bin/containerd-shim-rrc-v2
	install -D -m 0755 $(TARGET_DIR)/release/rrc-recorder $(DESTDIR)$(PREFIX)/bin/rrc-recorder

## The whole suite: setup, format check, clippy, unit tests, integration tests.
test: setup lint unit integration

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

unit:
	$(CARGO) test --workspace --lib --bins --locked
	$(CARGO) test -p rrc-recorder --test cli --locked

integration: build
	RRC_REQUIRE_INTEGRATION=1 RRC_SHIM_BIN=$(SHIM_DEBUG) \
		$(CARGO) test -p rrc-integration --tests --locked -- --test-threads=$(TEST_THREADS)

## The main job: a redis under io.containerd.rrc.v2 answering a client on another test host.
demo: build
	RRC_SHIM_BIN=$(SHIM_DEBUG) $(TARGET_DIR)/debug/rrc-demo

## runc, rrc mode off, passive and hybrid, alternating in one run, for redis, memcached and
## lighttpd; results in integration/results/ (BENCH_ARGS: see rrc-bench --help).
bench: release
	RRC_SHIM_BIN=$(SHIM_RELEASE) $(TARGET_DIR)/release/rrc-bench --modes runc,off,passive,hybrid $(BENCH_ARGS)

## Fault injection: N primary kills under load (passive mode); prints the recovery rate and the
## recovery-time distribution per phase, and writes them to integration/results/.
N ?= 100
campaign: build
	RRC_REQUIRE_INTEGRATION=1 RRC_SHIM_BIN=$(SHIM_DEBUG) RRC_INJECTIONS=$(N) \
		RRC_CAMPAIGN_OUT=$(CURDIR)/integration/results/campaign-passive.md \
		$(CARGO) test -p rrc-integration --test passive --locked failover_keeps -- --nocapture

clean:
	$(CARGO) clean
