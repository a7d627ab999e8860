# syntax=docker/dockerfile:1
# The MLflow tracking server of docker/compose.yaml (PostgreSQL backend, artifacts on MinIO) and the image
# of the minio-init job. Versions: the project's lock. Build context: the repository root.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/ckl
COPY requirements.lock ./
RUN pip install --no-cache-dir -c requirements.lock mlflow==3.17.2 psycopg2-binary==2.9.13 boto3==1.44.5 \
    && useradd --system --uid 10001 --home-dir /opt/ckl mlflow
COPY docker/entrypoint.sh docker/s3_buckets.py docker/
COPY docker/http-ok /usr/local/bin/http-ok

USER 10001
EXPOSE 5000
ENTRYPOINT ["/opt/ckl/docker/entrypoint.sh"]
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
