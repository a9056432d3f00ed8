"""tracetriage's Prefect blocks; `prefect block register -m blocks` registers them all."""

from blocks.config import LoopConfigBlock
from blocks.langsmith import LangSmithCredentials
from blocks.storage import SnapshotStorage

__all__ = ["LangSmithCredentials", "LoopConfigBlock", "SnapshotStorage"]
