# portscan-exporter: slim Python, non-root, state in a volume.
#   docker build -t portscan-exporter .
#   docker run -d -p 9678:9678 -v portscan-state:/var/lib/portscan-exporter \
#     -v $PWD/config.yaml:/etc/portscan-exporter/config.yaml:ro portscan-exporter
# The connect scanner needs no capability. `--cap-add NET_RAW` is only for a SYN-scan mode,
# which this image does not use yet.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter ./exporter
RUN pip install --no-compile . && rm -rf /src

RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent portscan \
    && install -d -o portscan -g portscan /var/lib/portscan-exporter
COPY docker/config.yaml /etc/portscan-exporter/config.yaml

USER portscan
WORKDIR /var/lib/portscan-exporter
VOLUME ["/var/lib/portscan-exporter"]
EXPOSE 9678

# No curl in the image: the health check is a few lines of the Python already there.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9678/-/healthy', timeout=4).status != 200)"]

ENTRYPOINT ["portscan-exporter"]
CMD ["--config", "/etc/portscan-exporter/config.yaml", "--web.listen-address", ":9678"]
