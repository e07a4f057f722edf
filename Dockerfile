# The OpenAI-compatible server in a container. One file, two images:
#   docker build --build-arg VARIANT=cuda -t deepseek-ocr:cuda .   # PyTorch with CUDA (run with --gpus all)
#   docker build --build-arg VARIANT=cpu  -t deepseek-ocr:cpu  .   # PyTorch on the CPU (the constraints pin)
# Models download on first use into the /cache volume and stay there. The server listens on 0.0.0.0 inside
# the container, so it refuses to start without an API key: pass DEEPSEEK_OCR_API_KEY or mount a key file and
# add --api-key-file PATH (see README.md, "Docker").
FROM python:3.11-slim

ARG VARIANT=cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    XDG_CONFIG_HOME=/config

WORKDIR /opt/deepseek-ocr
COPY pyproject.toml README.md constraints.txt ./
COPY common/ common/
COPY torch_ocr/ torch_ocr/
COPY mlx_ocr/ mlx_ocr/
COPY server/ server/

# The README's install lines: the CPU image keeps the constraints pin, the CUDA image lets pip choose CUDA torch.
RUN if [ "$VARIANT" = "cpu" ]; then \
        pip install -c constraints.txt ".[torch,server,pdf]"; \
    elif [ "$VARIANT" = "cuda" ]; then \
        pip install ".[torch,server,pdf]"; \
    else \
        echo "VARIANT must be cpu or cuda, not $VARIANT" >&2; exit 1; \
    fi

RUN useradd --create-home --uid 1000 ocr && mkdir -p /cache /config && chown ocr:ocr /cache /config
USER ocr
VOLUME ["/cache"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

ENTRYPOINT ["deepseek-ocr-server"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
