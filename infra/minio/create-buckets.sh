#!/bin/sh
# One-shot service minio-init (minio/mc image), run on every `docker compose up`:
#   synthdx-mlflow  MLflow's artifact store (the tracking server proxies every artifact, so
#                   only the server holds S3 credentials)
#   synthdx-dvc     the team's DVC remote (dvc remote add -d team s3://synthdx-dvc)
# and the application account S3_ACCESS_KEY / S3_SECRET_KEY (MLflow server, DVC users) with
# read-write access; the root account stays for administration. Idempotent: buckets and their
# contents are kept, the account's secret is reset to the one in infra/.env.
set -eu

: "${MINIO_ROOT_USER:?MINIO_ROOT_USER is not set}"
: "${MINIO_ROOT_PASSWORD:?MINIO_ROOT_PASSWORD is not set}"
: "${S3_ACCESS_KEY:?S3_ACCESS_KEY is not set}"
: "${S3_SECRET_KEY:?S3_SECRET_KEY is not set}"

mc alias set synthdx http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing synthdx/synthdx-mlflow synthdx/synthdx-dvc
mc admin user add synthdx "$S3_ACCESS_KEY" "$S3_SECRET_KEY"
# Attaching a policy the account already has is an error for mc; only that one is expected.
if ! out=$(mc admin policy attach synthdx readwrite --user "$S3_ACCESS_KEY" 2>&1); then
    case "$out" in
        *"already in effect"*) ;;
        *) echo "$out" >&2; exit 1 ;;
    esac
fi
echo "synthdx: buckets synthdx-mlflow, synthdx-dvc ready; account $S3_ACCESS_KEY has readwrite"
