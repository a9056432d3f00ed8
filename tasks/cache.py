"""Cache keys and content-addressed work files shared by the stages.

Every cached stage takes a `cache_token`: a hash of the window, the source's
fingerprint, the config, the evaluators' source code and the work directory's
epoch (a random id made with the directory, so deleting `<out>/work` drops every
cached result with it). An open window gets no token, so nothing of it is cached.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any


def stable_hash(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def stage_cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
    """Prefect cache key: the stage name, its token and batch; None (no caching) without a token."""
    token = parameters.get("cache_token")
    if not token:
        return None
    return stable_hash(context.task.name, token, parameters.get("batch"))


def work_epoch(work_dir: Path) -> str:
    """The work directory's random id, made on first use."""
    work_dir.mkdir(parents=True, exist_ok=True)
    marker = work_dir / ".epoch"
    if not marker.exists():
        tmp = work_dir / f".epoch.{uuid.uuid4().hex}"
        tmp.write_text(uuid.uuid4().hex)
        tmp.replace(marker)
    return marker.read_text().strip()
