#!/usr/bin/env bash
# Entry point of the ckl images: turn Docker secrets into the environment variables ckl and its clients
# read, then run the command.
#
# For every variable NAME_FILE (NAME starting with CKL_, AWS_, PG or MLFLOW_), NAME is set to the file's
# contents (trailing newlines dropped), e.g. CKL_WRITE_TOKEN_FILE=/run/secrets/ckl_write_token gives
# CKL_WRITE_TOKEN, PGPASSWORD_FILE gives PGPASSWORD (libpq reads it, so database URLs carry no password).
# Setting both NAME and NAME_FILE is an error, as is a NAME_FILE that cannot be read.
#
# CKL_TENSOR_PARALLEL (default 1): ranks one model is sharded over. `ckl serve` hosts a single rank, so a
# value above 1 is refused here rather than silently serving unsharded (see docker/README.md).
set -euo pipefail

while IFS='=' read -r file_var _; do
    name=${file_var%_FILE}
    path=${!file_var}
    if [[ -n ${!name:-} ]]; then
        echo "entrypoint: both $name and $file_var are set; set one of them" >&2
        exit 2
    fi
    if [[ ! -r $path ]]; then
        echo "entrypoint: $file_var=$path is not a readable file" >&2
        exit 2
    fi
    export "$name=$(<"$path")"
    unset "$file_var"
done < <(env | grep -E '^(CKL_|AWS_|PG|MLFLOW_)[A-Z0-9_]*_FILE=' || true)

tensor_parallel=${CKL_TENSOR_PARALLEL:-1}
if [[ ! $tensor_parallel =~ ^[1-9][0-9]*$ ]]; then
    echo "entrypoint: CKL_TENSOR_PARALLEL must be a positive integer, not '$tensor_parallel'" >&2
    exit 2
fi
if (( tensor_parallel > 1 )) && [[ " $* " == *" serve "* ]]; then
    echo "entrypoint: CKL_TENSOR_PARALLEL=$tensor_parallel, but \`ckl serve\` hosts one rank; a" \
         "tensor-parallel server needs a rank-0 HTTP front end driving the other ranks (docker/README.md)" >&2
    exit 2
fi

exec "$@"
