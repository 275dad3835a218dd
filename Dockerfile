# GPU image: CUDA runtime + morserve installed by scripts/install.sh, the same install path as
# `make test` and CI. CPU image: Dockerfile.cpu.
#   docker build -t morserve .
#   docker run --gpus all -p 8000:8000 morserve                                  # default model
#   docker run --gpus all -p 8000:8000 morserve --model smollm2-135m-instruct    # any `morserve serve` flags
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

# PyPI's Linux torch wheel is the CUDA build.
ARG MORSERVE_TORCH_SPEC=torch==2.13.0
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin morserve \
    && mkdir -p /opt/morserve && chown morserve:morserve /opt/morserve
WORKDIR /opt/morserve
COPY --chown=morserve:morserve . .
USER morserve
RUN MORSERVE_TORCH_SPEC="${MORSERVE_TORCH_SPEC}" bash scripts/install.sh /opt/morserve/.venv

ENV PATH=/opt/morserve/.venv/bin:${PATH}
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"
# Arguments given to `docker run` replace CMD (so `--model X` picks another model).
ENTRYPOINT ["morserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--model", "morserve-mini-mor3"]
