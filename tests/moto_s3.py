"""The credentials of the local S3 (moto) that conftest's `s3_endpoint` starts; the secret is a canary."""

MOTO_KEY, MOTO_SECRET = "moto-test-key", "moto-test-secret-canary-7f3e"
