# syntax=docker/dockerfile:1
# MinIO for MLflow's artifacts and the memory bank. MinIO's community edition is distributed as source
# only since October 2025 (no new images), so this builds its last release from source.
FROM golang:1.25-bookworm AS build
ARG MINIO_RELEASE=RELEASE.2025-10-15T17-29-55Z
WORKDIR /src
RUN git clone --depth 1 --branch "${MINIO_RELEASE}" https://github.com/minio/minio.git . \
    && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o /out/minio .

FROM debian:bookworm-slim
COPY --from=build /out/minio /usr/local/bin/minio
COPY docker/http-ok /usr/local/bin/http-ok
RUN useradd --system --uid 10001 --home-dir /data minio \
    && mkdir /data \
    && chown minio /data

USER 10001
EXPOSE 9000 9001
ENTRYPOINT ["minio"]
CMD ["server", "/data", "--address", ":9000", "--console-address", ":9001"]
