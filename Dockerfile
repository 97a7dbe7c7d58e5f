# syntax=docker/dockerfile:1
# One image for both programs: run it with `controller` or `activator` as the command
# (deploy/kustomize does). Nothing is written at run time: it works with a read-only root
# filesystem (mount an emptyDir on /tmp), as the non-root user 65532.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment with the package and its dependencies ----------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
# .dockerignore keeps the local cluster, the kubelet stand-in and the demo out of these two, so the
# package holds the controller, the activator and the client commands; without the `local` extra
# their gRPC dependencies stay out too. The two --help runs fail the build if a production command
# needs anything left out.
COPY elasti_istio ./elasti_istio
COPY activator ./activator
# Bytecode is compiled here, once, with hashes that never go stale, so that nothing is compiled or
# written at run time; pip itself is not kept in the environment.
RUN python -m venv /opt/elasti \
 && /opt/elasti/bin/pip install --no-compile ".[fast]" \
 && /opt/elasti/bin/elasti-istio controller --help >/dev/null \
 && /opt/elasti/bin/elasti-istio activator --help >/dev/null \
 && /opt/elasti/bin/pip uninstall -y pip setuptools wheel \
 && python -m compileall -q --invalidation-mode unchecked-hash /opt/elasti/lib

# ---- runtime: the base image and the environment, nothing else -------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="elasti-istio" \
      org.opencontainers.image.description="Scale-to-zero for Istio-routed HTTP services: controller and activator" \
      org.opencontainers.image.licenses="Apache-2.0"
# The base image's installers are not needed to run.
RUN python -m pip uninstall -y -q pip setuptools wheel
COPY --from=build /opt/elasti /opt/elasti
ENV PATH=/opt/elasti/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1 \
    HOME=/tmp
# 8012 proxy and 9091 admin (activator); 8013 wake and 8080 metrics (controller).
EXPOSE 8012 9091 8013 8080
USER 65532:65532
ENTRYPOINT ["elasti-istio"]
CMD ["--help"]
