# tripcast API: `docker build -t tripcast .` then see compose.yaml for the production profile.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# With Dask (the [dask] extra): the same image runs `dask worker tcp://scheduler:8786` for TRIPCAST_DASK.
RUN pip install --no-cache-dir --prefix=/install ".[dask]"

FROM python:3.11-slim
# libgomp: LightGBM's OpenMP runtime.
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 tripcast
COPY --from=build /install /usr/local
USER tripcast
WORKDIR /home/tripcast
ENV TRIPCAST_HOME=/home/tripcast/.tripcast \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PYTHONUNBUFFERED=1
# Made here, owned by the service's user: an empty named volume mounted on them (compose.yaml) takes that
# ownership; mounted on a path the image lacks, it would be root's, and the service could not write to it.
RUN mkdir -p "$TRIPCAST_HOME/reports" "$TRIPCAST_HOME/spool" "$TRIPCAST_HOME/predictions" "$TRIPCAST_HOME/archive"
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD python -c "import urllib.request, sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=2).status == 200 else 1)"
CMD ["tripcast", "serve", "--host", "0.0.0.0", "--port", "8000"]
