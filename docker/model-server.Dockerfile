# syntax=docker/dockerfile:1
# The ckl model server (`ckl serve`) for NVIDIA GPU workers: DeepSpeed inference on the CUDA build of torch.
# The released MemoryLLM-7B/8B checkpoint is not in the image: docker/compose.yaml mounts it read-only at
# /models/memoryllm. Build context: the repository root.
FROM python:3.11-slim-bookworm

# PyPI's torch 2.13.0 for Linux x86_64 is the CUDA build; its CUDA runtime arrives as nvidia-* wheels, so
# the host needs only the NVIDIA driver and the container toolkit.
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DS_BUILD_OPS=0 \
    HF_HUB_OFFLINE=1 \
    CKL_HOME=/var/lib/ckl/state \
    TORCH_EXTENSIONS_DIR=/var/lib/ckl/torch_extensions

WORKDIR /opt/ckl
RUN pip install --no-cache-dir torch==2.13.0 setuptools==84.2.1 \
    && pip install --no-cache-dir --no-build-isolation deepspeed==0.19.8
COPY pyproject.toml requirements.lock README.md ./
COPY model/ model/
COPY compression/ compression/
COPY monitoring/ monitoring/
COPY serving/ serving/
COPY runtime/ runtime/
COPY documents/ documents/
COPY cli/ cli/
COPY docker/entrypoint.sh docker/
COPY docker/http-ok /usr/local/bin/http-ok
RUN pip install --no-cache-dir -c requirements.lock --editable . \
    && useradd --system --uid 10001 --home-dir /var/lib/ckl ckl \
    && mkdir -p /var/lib/ckl/state /var/lib/ckl/snapshots /var/lib/ckl/torch_extensions \
    && chown -R ckl /var/lib/ckl

USER 10001
EXPOSE 8400
ENTRYPOINT ["/opt/ckl/docker/entrypoint.sh"]
CMD ["ckl", "serve", "--host", "0.0.0.0", "--port", "8400", "--model", "/models/memoryllm", "--device", "cuda"]
