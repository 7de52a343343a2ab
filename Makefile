# Real-time ETA platform — the verbs a newcomer can guess.
#   make run      bring up the whole system locally (embedded Kafka-protocol broker, Redis, PostgreSQL)
#                 (make run REDIS_CLUSTER=1: a local Redis Cluster of 3 primaries instead of one Redis)
#   make test     install everything, lint, type-check, unit + integration + deploy tests
#   make test-cluster  the Redis-facing integration tests again, against a local 3-primary Redis Cluster
#   make bench    run every benchmark under bench/ (tables + bench/results/<name>.json)
#   make protos   generate the protobuf/gRPC code into services/eta/ (never committed)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PROTO_SRC := $(wildcard protos/eta/v1/*.proto)
PROTO_OUT := services
STAMP  := $(VENV)/.installed
# buf (protobuf lint + breaking-change check): the official binary from PyPI (buf-bin, pinned in the dev
# extra), so a fresh machine needs no Node for `make test`.
BUF    := $(VENV)/bin/buf
# The API every proto change must stay wire- and JSON-compatible with (buf breaking, WIRE_JSON rules):
# a committed image of the protos as of the last landed main, so a shallow CI clone can check against it.
API_BASELINE := protos/baseline/eta-v1.binpb

.PHONY: help install protos run test test-cluster lint typecheck unit integration deploy-check bench bench-peers clean stop image-test \
	buf api-check api-baseline

help:
	@sed -n '1,7p' Makefile

$(PY):
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ required"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) protos

protos: $(STAMP) $(PROTO_OUT)/eta/v1/.stamp

$(PROTO_OUT)/eta/v1/.stamp: $(PROTO_SRC) | $(STAMP)
	rm -rf $(PROTO_OUT)/eta
	mkdir -p $(PROTO_OUT)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m grpc_tools.protoc -Iprotos \
		--python_out=$(PROTO_OUT) --grpc_python_out=$(PROTO_OUT) \
		--mypy_out=$(PROTO_OUT) --mypy_grpc_out=$(PROTO_OUT) $(PROTO_SRC)
	touch $(PROTO_OUT)/eta/__init__.py $(PROTO_OUT)/eta/v1/__init__.py $(PROTO_OUT)/eta/py.typed
	touch $@

# buf lint (protos/buf.yaml: STANDARD; names that predate it are excepted in place with the reason) and
# buf breaking against $(API_BASELINE) (WIRE_JSON: wire and JSON compatibility). Part of `make test`.
api-check buf: $(STAMP)
	$(BUF) lint protos
	$(BUF) breaking protos --against $(API_BASELINE)

# Deliberately move the baseline to the API as of a landed commit (default HEAD), after review; the
# commit it was built from is recorded next to it ($(API_BASELINE:.binpb=.source)):
#   make api-baseline API_BASELINE_REF=<commit>
API_BASELINE_REF ?= HEAD
api-baseline: $(STAMP)
	$(BUF) build '.git#ref=$(API_BASELINE_REF),subdir=protos' --exclude-source-info -o $(API_BASELINE)
	git rev-parse '$(API_BASELINE_REF)^{commit}' > $(API_BASELINE:.binpb=.source)

REDIS_CLUSTER ?=
run: install
	$(PY) -m devstack run $(if $(filter 1 true yes,$(REDIS_CLUSTER)),--redis-cluster)

lint: install
	$(VENV)/bin/ruff check services tests bench
	$(VENV)/bin/ruff format --check services tests bench

typecheck: install
	$(VENV)/bin/mypy services tests bench

unit: install
	$(PY) -m pytest -q -m "not integration" services tests/unit tests/deploy bench/tests

integration: install
	$(PY) -m pytest -q -m integration tests/integration

# The same tests against a local Redis Cluster of 3 primaries (--redis-mode=cluster). `make test` runs a
# representative subset (serving: round trips per shard; degradation) after the whole suite on one Redis;
# `make test-cluster` runs every Redis-facing module of issue #14 (features, rebuild, serving, degradation,
# consistency day) on the cluster. The one-primary-killed test always runs on its own cluster.
CLUSTER_SUBSET := tests/integration/test_prediction_serving.py tests/integration/test_prediction_degradation.py
CLUSTER_TESTS  := $(CLUSTER_SUBSET) tests/integration/test_feature_guarantees.py \
	tests/integration/test_consistency_day.py tests/integration/test_redis_cluster_shard_down.py

test: lint typecheck api-check
	$(PY) -m pytest -q services tests bench/tests
	$(PY) -m pytest -q --redis-mode=cluster $(CLUSTER_SUBSET)

test-cluster: install
	$(PY) -m pytest -q --redis-mode=cluster $(CLUSTER_TESTS)

# Build the Docker image from the repo root and run migrate/seed/train and the three services from it
# (non-root, read-only root fs, no capabilities, host network) against the local broker, Redis and
# PostgreSQL; then events and a prediction go through them. Needs a Docker daemon.
# PYTHON_IMAGE=<base> overrides the Dockerfile's base image (e.g. the one ../shared/tools/docker-up prints).
image-test: install
	ETA_IMAGE_TEST=1 PYTHON_IMAGE="$(PYTHON_IMAGE)" $(PY) -m pytest -q -rs -s -m image tests/image

bench: install
	$(PY) -m bench

# Feast, Quix Streams and the maintained Redis clients as peers, in their own venv ($(VENV)/peers: Feast pins
# redis<8 and prometheus-client<0.25, older than the project's); the benchmarks themselves run from the main venv.
bench-peers: install
	test -x $(VENV)/peers/bin/python || $(PYTHON) -m venv $(VENV)/peers
	$(VENV)/peers/bin/python -m pip install --quiet -e '.[peers]'
	$(PY) -m bench peers_feast peers_quix redis_clients

format: install
	$(VENV)/bin/ruff check --fix services tests bench
	$(VENV)/bin/ruff format services tests bench

clean:
	rm -rf $(VENV) .tools $(PROTO_OUT)/eta .run build .pytest_cache .mypy_cache .ruff_cache
