# syntax=docker/dockerfile:1
# SkinSAM Serve image: `docker build -t skinsam .` (BuildKit), then for example
#   docker run --gpus all -p 50051:50051 -p 9090:9090 \
#     -v $PWD/skinsam.toml:/etc/skinsam/config.toml:ro -v /srv/sam:/models:ro skinsam
# Without a mounted config it serves the default model `skinsam-tiny` (built in), like `make serve`.
#
# Two stages, the same build as the README's: libtorch comes from the PyPI wheel pinned in
# scripts/requirements.txt (torch==2.13.0, which runs on CPU and CUDA), and build.rs bakes the
# absolute path of the wheel's torch/lib into the binary's run path. The runtime stage copies the
# libraries the binary loads to the SAME absolute path (/opt/torch), so no LD_LIBRARY_PATH is needed:
# libtorch itself finds the CUDA libraries of the wheel through its own $ORIGIN/../../nvidia/*/lib
# run paths.

# Debian 12 (glibc 2.36): the binary also runs on the runtime stage's Ubuntu 24.04 (glibc 2.39).
ARG BUILD_IMAGE=rust:1.95-bookworm
# The wheel brings its own CUDA 13 libraries; the CUDA base image adds the NVIDIA container
# runtime settings (the driver, libcuda.so.1, is mounted from the node). The larger
# nvidia/cuda:13.0.2-runtime-ubuntu24.04 works as well.
ARG RUNTIME_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04

FROM ${BUILD_IMAGE} AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# libtorch: only the torch wheel (and its nvidia-* dependencies) from scripts/requirements.txt,
# installed flat into /opt/torch (torch/ and nvidia/ side by side, as in a site-packages folder).
COPY scripts/requirements.txt scripts/requirements.txt
RUN python3 -m venv /opt/pip \
 && /opt/pip/bin/pip install --no-cache-dir --disable-pip-version-check -q \
      --target /opt/torch "$(grep -E '^torch==' scripts/requirements.txt)" \
 && test -e /opt/torch/torch/lib/libtorch.so
# An exported LIBTORCH wins over .cargo/config.toml's .venv/libtorch.
ENV LIBTORCH=/opt/torch/torch
COPY Cargo.toml Cargo.lock build.rs ./
COPY .cargo .cargo
COPY proto proto
COPY src src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin skinsam \
 && install -D -m 755 target/release/skinsam /stage/usr/local/bin/skinsam
# What the binary loads at run time, at the same paths: libtorch (its CPU and CUDA parts, plus the
# libraries it opens lazily: NVRTC and CUDA linear algebra) and the wheel's nvidia/*/lib folders
# (CUDA 13 runtime, cuBLAS, cuFFT, cuSPARSE(Lt), cuSOLVER, cuRAND, cuDNN, NCCL, NVSHMEM), without
# static archives. Python bindings and headers stay behind.
RUN set -eu; \
    readelf -d /stage/usr/local/bin/skinsam | grep -q '/opt/torch/torch/lib'; \
    mkdir -p /stage/opt/torch/torch/lib; \
    for f in libtorch.so libtorch_cpu.so libtorch_cuda.so libtorch_cuda_linalg.so libtorch_nvshmem.so \
             libc10.so libc10_cuda.so libcaffe2_nvrtc.so libgomp.so.1; do \
      cp -a /opt/torch/torch/lib/$f /stage/opt/torch/torch/lib/; \
    done; \
    for d in cu13 cudnn cusparselt nccl nvshmem; do \
      mkdir -p /stage/opt/torch/nvidia/$d; cp -a /opt/torch/nvidia/$d/lib /stage/opt/torch/nvidia/$d/; \
    done; \
    find /stage/opt/torch -name '*.a' -delete
# The default config's model: skinsam_tiny, trained on HAM10000 (MODEL_CARD.md), 13 MB.
COPY models/skinsam_tiny.safetensors /stage/opt/skinsam/models/skinsam_tiny.safetensors
COPY MODEL_CARD.md /stage/opt/skinsam/MODEL_CARD.md

FROM ${RUNTIME_IMAGE}
COPY --from=build /stage/ /
# A fixed non-root user (the Helm chart runs as 10001 too). Mount points: the config file
# (/etc/skinsam/config.toml), the checkpoints (/models, read-only), writable state such as the
# embedding store and training runs (/var/lib/skinsam). The root filesystem can be read-only.
RUN groupadd --gid 10001 skinsam \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin skinsam \
 && mkdir -p /etc/skinsam /models /var/lib/skinsam \
 && chown 10001:10001 /var/lib/skinsam
# Used when no config file is mounted: listen on all interfaces; models = the built-in default.
# Training runs go to the writable state volume: the default `runs` would resolve against the
# WORKDIR, /opt/skinsam, which user 10001 cannot write (and the root filesystem may be read-only).
COPY <<'EOF' /etc/skinsam/config.toml
grpc_addr = "0.0.0.0:50051"
metrics_addr = "0.0.0.0:9090"

[train]
output_dir = "/var/lib/skinsam/runs"
EOF
WORKDIR /opt/skinsam
USER 10001:10001
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/skinsam"]
CMD ["serve", "--config", "/etc/skinsam/config.toml"]
