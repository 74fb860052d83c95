# syntax=docker/dockerfile:1
# The metering gateway as a container: `docker build -t metering-gateway .`
#
# Stage 1 builds wheels (the gateway and every dependency); the final stage
# installs those wheels only: no compiler, no build tools, no source tree.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY clients/python ./clients/python
# The server wheel ships the generated stubs from clients/python/src; the client
# wheel is built too, so a broken client distribution fails the image build.
RUN pip wheel --wheel-dir /wheels . ./clients/python

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    METERING_GATEWAY_LISTEN=0.0.0.0:50051
# Only the server distribution is installed: it already holds the stubs, and the
# client distribution would own the same files a second time.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels metering-gateway \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin gateway \
    && install -d -o 10001 -g 10001 /var/lib/metering-gateway
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
