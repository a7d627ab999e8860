"""Create S3 buckets if they are missing, or check that they exist: the `minio-init` job of
docker/compose.yaml (MinIO's own `mc` client is no longer published as an image).

    python docker/s3_buckets.py mlflow ckl-bank            # create the missing ones
    python docker/s3_buckets.py --check mlflow ckl-bank    # exit 1 if one is missing

boto3 reads the endpoint and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
and AWS_REGION (the image's entry point fills AWS_SECRET_ACCESS_KEY from the Docker secret).
"""

import argparse
import sys

import boto3
from botocore.exceptions import ClientError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("buckets", nargs="+")
    parser.add_argument("--check", action="store_true", help="only check that the buckets exist")
    args = parser.parse_args(argv)
    s3 = boto3.client("s3")
    ok = True
    for bucket in args.buckets:
        try:
            s3.head_bucket(Bucket=bucket)
            print(f"{bucket}: ok")
            continue
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise
        if args.check:
            print(f"{bucket}: missing")
            ok = False
            continue
        try:
            s3.create_bucket(Bucket=bucket)
        except ClientError as error:  # another creator won the race
            if error.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou",
                                                                   "BucketAlreadyExists"):
                raise
        print(f"{bucket}: created")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
