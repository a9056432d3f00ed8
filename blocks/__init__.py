"""tracetriage's Prefect blocks; `prefect block register -m blocks` registers them all."""

from blocks.storage import SnapshotStorage

__all__ = ["SnapshotStorage"]
