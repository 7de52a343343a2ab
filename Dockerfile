# syntax=docker/dockerfile:1
# One image, several entrypoints: eta-ingestion, eta-aggregator, eta-prediction, eta-migrate, eta-trainer,
# eta-simulator. The Helm chart picks one per workload with `command:`. Build from the repo root:
#   docker build -t eta-platform .
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---------------------------------------------------------------------------------------------------------
# builder: resolve dependencies into /opt/venv, generate the protobuf/gRPC code, install the project.
# ---------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --upgrade pip setuptools wheel

# 1) Dependencies only (cached until pyproject.toml changes): an empty package tree is enough for pip to
#    resolve and install [project.dependencies].
COPY pyproject.toml README.md ./
RUN mkdir -p services \
    && /opt/venv/bin/pip install . \
    && /opt/venv/bin/pip uninstall --yes eta-platform \
    && rm -rf build services

# 2) Code generation with grpcio-tools from a separate, throw-away venv (never reaches the final image).
#    Same grpcio minor as the runtime and never newer (generated *_grpc.py refuses an older grpcio).
RUN GRPC_VERSION="$(/opt/venv/bin/python -c 'import importlib.metadata as m; print(m.version("grpcio"))')" \
    && python -m venv /opt/codegen \
    && /opt/codegen/bin/pip install "grpcio-tools>=${GRPC_VERSION%.*}.0,<=${GRPC_VERSION}"
COPY protos/ protos/
COPY services/ services/
RUN rm -rf services/eta \
    && /opt/codegen/bin/python -m grpc_tools.protoc -Iprotos --python_out=services --grpc_python_out=services \
        protos/eta/v1/*.proto \
    && touch services/eta/__init__.py services/eta/v1/__init__.py

# 3) The project itself (non-editable), then byte-compile so a read-only root filesystem costs nothing.
#    Development-only code stays out: .dockerignore leaves out services/devstack (`make run`, the trace
#    report), and the [project.scripts] entries whose package is not in the context are dropped here, so
#    the image has exactly the entry points the chart runs (no eta-devstack, no eta-trace-report).
#    `wheel` was only needed to build.
RUN python -c 'import pathlib, tomllib; p = pathlib.Path("pyproject.toml"); text = p.read_text(); scripts = tomllib.loads(text)["project"]["scripts"]; drop = sorted(n for n, t in scripts.items() if not pathlib.Path("services", t.split(":")[0].split(".")[0]).is_dir()); p.write_text("".join(line for line in text.splitlines(keepends=True) if line.partition("=")[0].strip() not in drop)); print("entry points left out of the image:", drop)'
RUN /opt/venv/bin/pip install --no-deps . \
    && /opt/venv/bin/pip uninstall --yes wheel \
    && /opt/venv/bin/python -m compileall -q /opt/venv/lib

# ---------------------------------------------------------------------------------------------------------
# runtime: the venv only. No compilers, no grpcio-tools, no sources, no tests or dev tools, no secrets.
# ---------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="eta-platform" \
      org.opencontainers.image.description="Real-time delivery ETA platform (gRPC, Kafka, Redis, PostgreSQL)" \
      org.opencontainers.image.licenses="Apache-2.0"

# libgomp1: OpenMP runtime required by LightGBM's wheels (not part of the slim image).
RUN apt-get update \
    && apt-get install --yes --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 eta \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin eta

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONFAULTHANDLER=1

WORKDIR /tmp
USER 10001:10001

# gRPC: ingestion 50051, aggregator (FeatureService) 50052, prediction 50053; Prometheus metrics 9101-9103.
EXPOSE 50051 50052 50053 9101 9102 9103

# No ENTRYPOINT: each workload sets `command:` (see deploy/helm/eta-platform/values.yaml).
CMD ["python", "-c", "print('eta-platform image: run one of eta-ingestion, eta-aggregator, eta-prediction, eta-migrate, eta-trainer, eta-simulator')"]
