# promvae: per-series VAE anomaly detection for Prometheus.
#   docker build -t promvae .
#   docker run -p 8080:8080 -v $PWD/promvae.yml:/etc/promvae/promvae.yml:ro promvae
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# CPU-only torch first, from PyTorch's own index: otherwise pip resolves torch>=2.2 to a
# multi-GB CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /src
COPY pyproject.toml README.md ./
COPY detector ./detector
COPY grafana_plugin_backend ./grafana_plugin_backend
RUN pip install . && rm -rf /src

RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/promvae --create-home \
        --shell /usr/sbin/nologin promvae
USER promvae
WORKDIR /var/lib/promvae
VOLUME ["/var/lib/promvae"]
EXPOSE 8080

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/-/healthy', timeout=4)"]

ENTRYPOINT ["promvae"]
CMD ["serve", "--config.file=/etc/promvae/promvae.yml", "--storage.path=/var/lib/promvae", "--web.listen-address=:8080"]
