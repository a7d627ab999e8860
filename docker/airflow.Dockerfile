# syntax=docker/dockerfile:1
# Airflow 3 with ckl installed: API server, scheduler, DAG processor, Celery workers and the kafka-init job
# of docker/compose.yaml. Build context: the repository root (docker compose does this).
FROM apache/airflow:3.3.2-python3.11

# The workers only call the model server over HTTP, so torch is the CPU build of the pinned release.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV DS_BUILD_OPS=0 \
    HF_HUB_OFFLINE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/ckl
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.13.0+cpu
COPY --chown=airflow:0 pyproject.toml requirements.lock README.md ./
COPY --chown=airflow:0 model/ model/
COPY --chown=airflow:0 compression/ compression/
COPY --chown=airflow:0 pipelines/ pipelines/
COPY --chown=airflow:0 monitoring/ monitoring/
COPY --chown=airflow:0 serving/ serving/
COPY --chown=airflow:0 runtime/ runtime/
COPY --chown=airflow:0 documents/ documents/
COPY --chown=airflow:0 cli/ cli/
COPY --chown=airflow:0 dags/ dags/
COPY --chown=airflow:0 docker/entrypoint.sh docker/kafka_topics.py docker/
# DeepSpeed is an sdist whose build imports torch: build it against the torch installed above. Pinning
# apache-airflow keeps the image's Airflow release (the lock pins the same one).
RUN pip install --no-cache-dir --no-build-isolation deepspeed==0.19.8 \
    && pip install --no-cache-dir -c requirements.lock apache-airflow==3.3.2 --editable .

ENV AIRFLOW__CORE__DAGS_FOLDER=/opt/ckl/dags \
    CKL_HOME=/opt/airflow/ckl
ENTRYPOINT ["/usr/bin/dumb-init", "--", "/opt/ckl/docker/entrypoint.sh", "/entrypoint"]
CMD ["airflow", "version"]
