"""Reading back what the loop left on the tests' Prefect API: events, page by page."""

from __future__ import annotations

import httpx
from prefect.settings import PREFECT_API_URL


def read_events(**filters: object) -> list[dict]:
    """Every event since 2000 matching the filter (e.g. `event={"name": [...]}`), following `next_page`."""
    body = {"filter": {"occurred": {"since": "2000-01-01T00:00:00Z"}, **filters}, "limit": 50}
    page = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json=body, timeout=30).raise_for_status().json()
    found = page["events"]
    while page.get("next_page"):
        page = httpx.get(page["next_page"], timeout=30).raise_for_status().json()
        found += page["events"]
    return found
