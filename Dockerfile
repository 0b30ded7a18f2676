# mlaas-testbed: the provider (and the attacker client) in one image.
# CPU by default. For CUDA, point TORCH_INDEX_URL at PyTorch's CUDA wheel index, e.g.
#   docker compose build --build-arg TORCH_INDEX_URL=<PyTorch's cu12x wheel index URL>
# The steps are the README's: install the package, prepare Fashion-MNIST, train the victim
# if there is none (docker/entrypoint.sh), serve.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

ARG TORCH_INDEX_URL=""
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLAAS_VAR_DIR=/var/lib/mlaas \
    MLAAS_VICTIM_DIR=/var/lib/mlaas/victims/fashion

# Debian ships Fashion-MNIST, so the default victim trains without a download.
RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY mlaas ./mlaas
COPY testbed ./testbed
COPY server ./server
COPY attacker ./attacker
COPY defense ./defense
COPY experiments ./experiments
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install torch torchvision --index-url "$TORCH_INDEX_URL"; \
    fi \
    && pip install . \
    && mlaas datasets prepare fashion-mnist

COPY docker/entrypoint.sh /usr/local/bin/mlaas-entrypoint
RUN chmod +x /usr/local/bin/mlaas-entrypoint && useradd --create-home --uid 1000 mlaas \
    && mkdir -p /var/lib/mlaas && chown -R mlaas /var/lib/mlaas /app
USER mlaas

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=5 \
    CMD curl -fsS http://127.0.0.1:8000/readyz || exit 1
ENTRYPOINT ["mlaas-entrypoint"]
CMD ["serve"]
