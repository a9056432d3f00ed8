"""Where snapshots (and the ledger beside them) are kept, with the credentials to reach it."""

from __future__ import annotations

from typing import Any

from prefect.blocks.core import Block
from prefect.blocks.fields import SecretDict
from pydantic import Field

from tasks.store import SnapshotStore


class SnapshotStorage(Block):
    """A snapshot URL and its fsspec options; secret options (keys, tokens) stay secret.

    >>> SnapshotStorage(
    ...     url="s3://my-bucket/tracetriage",
    ...     storage_options={"client_kwargs": {"region_name": "eu-west-1"}},
    ...     secret_options={"key": "AKIA...", "secret": "..."},
    ... ).save("prod-snapshots")  # doctest: +SKIP

    Then in the loop config: `snapshots: {block: prod-snapshots}`.
    """

    _block_type_name = "tracetriage snapshot storage"
    _description = "Where tracetriage keeps its windowed Parquet snapshots: a directory, s3:// or gs:// URL."

    url: str = Field(description="A directory, s3://bucket/prefix or gs://bucket/prefix.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options that are not secret: endpoint_url, region, ..."
    )
    secret_options: SecretDict | None = Field(
        None, description="fsspec options that are secret, e.g. {key, secret} for S3 or {token} for GCS."
    )

    def get_store(self) -> SnapshotStore:
        secret = self.secret_options.get_secret_value() if self.secret_options else {}
        return SnapshotStore(self.url, {**self.storage_options, **secret})
