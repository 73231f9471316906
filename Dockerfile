# syntax=docker/dockerfile:1
# One image for every role: `scaleout serve`, `scaleout combine`, `scaleout join` (and the admin
# commands). Build it with `make image` (IMAGE=scaleout:VERSION); deploy/helm/scaleout runs it.

# -- build: a venv with scaleout and its dependencies, installed from pyproject.toml ------------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/scaleout
WORKDIR /src
# pyproject.toml names README.md as the readme: setuptools reads it while building the wheel.
COPY pyproject.toml README.md ./
COPY src ./src
RUN /opt/scaleout/bin/pip install --upgrade pip && /opt/scaleout/bin/pip install . \
    && /opt/scaleout/bin/scaleout --version

# -- runtime: the venv on a slim Python of the same version (the venv's python links to it) -----
FROM python:3.11-slim
# A fixed, numeric, non-root user: Kubernetes' runAsNonRoot can check a numeric USER, and the
# chart's runAsUser/fsGroup (deploy/helm/scaleout/values.yaml) name the same number.
RUN groupadd --gid 10001 scaleout \
    && useradd --uid 10001 --gid 10001 --home-dir /data --no-create-home --shell /usr/sbin/nologin scaleout \
    && mkdir -p /data && chown 10001:10001 /data && chmod 0700 /data
COPY --from=build /opt/scaleout /opt/scaleout
ENV PATH=/opt/scaleout/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/data
USER 10001:10001
WORKDIR /data
# The controller's data dir (serve --data-dir /data), a combiner's or client's state dir.
VOLUME ["/data"]
# 8090: the controller (wss and /api/v1); 9090: its Prometheus metrics (--metrics-port 9090).
EXPOSE 8090 9090
# No HEALTHCHECK: what is healthy differs by role (a standby controller is up but not active);
# the chart's probes say it per role (GET /api/v1/health for the controller).
ENTRYPOINT ["scaleout"]
CMD ["--help"]
