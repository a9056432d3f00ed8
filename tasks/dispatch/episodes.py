"""Spike episodes: whether a spike rule opens an episode, closes one, or stays quiet in a window, decided from
the triaged windows before it (the snapshots' windows table), so a rerun decides the same."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from tasks.config import LoopConfig
from tasks.store import SnapshotStore

EPISODE_GAP = timedelta(days=1)  # how long a loop may go untriaged and still send an episode's recovery


def episode_history(store: SnapshotStore, config: LoopConfig, window_start: datetime) -> list[tuple[datetime, bool]]:
    """The triaged windows a spike rule's episode can reach back to (none without spike rules)."""
    cooldown = max([r.cooldown_delta for r in config.actions if r.when.spike], default=None)
    if cooldown is None:
        return []
    return recent_windows(store, window_start, cooldown + config.window.size_delta + EPISODE_GAP)


def recent_windows(store: SnapshotStore, window_start: datetime, lookback: timedelta) -> list[tuple[datetime, bool]]:
    """The triaged windows in `[window_start - lookback, window_start)`, each with whether it spiked."""
    windows = [w for w in store.windows("windows") if window_start - lookback <= w < window_start]
    if not windows:
        return []
    table = store.read("windows", ["window_start", "spike"], windows).to_pandas()
    return [(t.to_pydatetime(), bool(spiked)) for t, spiked in zip(table["window_start"],
                                                                    table["spike"].fillna(False), strict=True)]


def episode_event(spiking: bool, history: list[tuple[datetime, bool]], window_start: datetime, size: timedelta,
                  cooldown: timedelta) -> dict[str, Any] | None:
    """What a spike rule does in this window: open an episode, close one, or nothing.

    An episode runs from a spiking window until `cooldown` has passed without a spike. A spike inside the
    cooldown belongs to the episode (no second alert). The recovery goes with the first triaged window by whose
    end the cooldown has run out (a later one when that window had no traces or was never run). Decided from
    `history`, the triaged windows before this one, so a rerun decides the same.
    """
    spikes = [w for w, spiked in history if spiked and w < window_start]
    if not spikes:
        return {"event": "spike"} if spiking else None
    last_end = max(spikes) + size
    if spiking:
        return {"event": "spike"} if window_start - last_end >= cooldown else None
    if window_start + size - last_end < cooldown:
        return None  # the cooldown runs on past this window
    if any(last_end <= w < window_start and w + size - last_end >= cooldown for w, _ in history):
        return None  # an earlier window already carried this episode's recovery
    return {"event": "recovered", "episode": {"last_spike_window": max(spikes).isoformat()}}
