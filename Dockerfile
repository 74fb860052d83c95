# The metering gateway as a container: `make image` (docker, podman or buildah,
# whichever works), or `docker build -t metering-gateway .`; docs/deploy.md#container.
#
# Stage 1 installs into a virtual environment at /opt/metering-gateway: first every
# dependency at the exact version and hash requirements/image.txt names (exported
# from uv.lock by `make lock`: the versions `make test` tests), so two builds on
# different days install the same thing; then the gateway itself, built with the
# locked setuptools. Then the build tools leave: the final stage copies an
# environment with no pip, setuptools or wheel, and no test folders, only what runs.
#
# Plain Dockerfile syntax on purpose: no `# syntax=` line (it pulls a frontend
# image, so offline builds fail) and no RUN --mount (docker needs BuildKit for it);
# docker's classic builder and BuildKit, podman and buildah all build it as it is.
# Any Python 3.11 base works: PYTHON_IMAGE=python:3.11-slim, or a Debian bookworm
# image with python3-venv (`make image PYTHON_IMAGE=...`).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY requirements/image.txt ./requirements/
# Wheels only (--only-binary): a dependency without one for this platform fails
# here, loudly, instead of needing a compiler.
RUN python3 -m venv /opt/metering-gateway \
    && /opt/metering-gateway/bin/pip install --require-hashes --only-binary=:all: -r requirements/image.txt
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY clients/python ./clients/python
# No build isolation: setuptools comes from the lock too. The server wheel ships
# the generated stubs from clients/python/src; the client wheel is built too (and
# dropped), so a broken client distribution fails the image build. Then pip checks
# the whole, and the build tools and every package's own tests are removed.
RUN /opt/metering-gateway/bin/pip install --no-deps --no-build-isolation . \
    && /opt/metering-gateway/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /tmp/client ./clients/python \
    && /opt/metering-gateway/bin/pip check \
    && /opt/metering-gateway/bin/pip uninstall --yes --quiet setuptools \
    && /opt/metering-gateway/bin/python -m pip uninstall --yes --quiet pip \
    && find /opt/metering-gateway -depth -type d \( -name tests -o -name test \) \
        -path '*/site-packages/*' -exec rm -rf {} +

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/metering-gateway/bin:$PATH \
    METERING_GATEWAY_LISTEN=0.0.0.0:50051
# The group gets the same id as the user (10001), so USER 10001:10001 has a group
# entry (`id -gn` says gateway) and files it writes carry a named group.
RUN groupadd --gid 10001 gateway \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin gateway \
    && install -d -o 10001 -g 10001 /var/lib/metering-gateway
COPY --from=build /opt/metering-gateway /opt/metering-gateway
WORKDIR /var/lib/metering-gateway
USER 10001:10001
EXPOSE 50051
# Both commands read METERING_GATEWAY_LISTEN (health checks its loopback end), so
# `docker run -e METERING_GATEWAY_LISTEN=0.0.0.0:9000` moves the server and its
# health check together.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["metering-gateway", "health"]
STOPSIGNAL SIGTERM
CMD ["metering-gateway", "serve"]
