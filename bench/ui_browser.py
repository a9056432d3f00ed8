"""The Prefect UI as a new user sees it, in headless Chromium against a real `prefect server start`.

    apt-get install -y chromium && .venv/bin/pip install playwright   # no browser download: Debian's chromium
    .venv/bin/python -m bench.ui_browser [SCREENSHOT_DIR]              # default /tmp/tracetriage-ui

It deploys the project, opens the triage-backfill Custom run form and checks that `source`, `evaluators` and
`actions` render as fields with their defaults, submits a backfill from that form, finds the roll-up artifact
on the run, and opens the LoopConfigBlock create form. It prints one line per check and saves a screenshot of
each page. Not part of `pytest` (CI would need chromium); tests/test_deployments.py checks the same through the
API.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

from tests.test_deployments import (
    REPO,
    api_call,
    backfill_parameters,
    deployed_with_worker,
    running_prefect_server,
)

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


def check(name: str, ok: bool) -> bool:
    print(f"{'ok  ' if ok else 'FAIL'} {name}")
    return ok


def shot(page: Page, shots: Path, name: str) -> None:
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


def shot_at(page: Page, shots: Path, label: str, name: str) -> None:
    """A screenshot of the viewport scrolled to a field's label (v1 scrolls inside the page, so a full-page
    screenshot would miss it)."""
    try:
        page.locator(f"text={label}").filter(visible=True).first.scroll_into_view_if_needed(timeout=5000)
    except Exception:  # noqa: BLE001 - the screenshot is still taken where the page is
        print(f"     (no visible label {label!r} to scroll to)")
    page.screenshot(path=str(shots / f"{name}.png"))


def wait_for_text(page: Page, text: str, timeout: float = 30) -> bool:
    try:
        page.get_by_text(text, exact=False).first.wait_for(timeout=timeout * 1000)
        return True
    except Exception:  # noqa: BLE001 - reported as a failed check
        return False


def main(shots: Path) -> int:
    shots.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tracetriage-ui-"))
    results = []
    with running_prefect_server(work) as server:
        server["env"]["PREFECT_LOGGING_LEVEL"] = "INFO"  # the runs' INFO logs reach the UI (the roll-up table)
        with deployed_with_worker(server, work):
            results += browse(server, shots, work)
    print(f"screenshots in {shots}")
    return 0 if all(results) else 1


def browse(server: dict, shots: Path, work: Path) -> list[bool]:
    """Every check in the browser, one bool each."""
    results = []
    api, ui = server["api"], server["ui"]
    deployment = api_call("GET", f"{api}/deployments/name/triage-backfill/triage-backfill")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})

        for version, base in (("v2", f"{ui}/v2"), ("v1", ui)):  # a plain visit to the server opens v2
            page.goto(f"{base}/deployments/deployment/{deployment['id']}/run")
            results.append(check(f"{version}: the Custom run form opens", wait_for_text(page, "Parameters")))
            page.wait_for_timeout(2500)
            shot(page, shots, f"1-custom-run-form-{version}")
            for field in ("Kind", "Evaluators", "Actions"):
                shot_at(page, shots, field, f"1-custom-run-form-{version}-{field.lower()}")
            shown = form_text(page)
            results.append(check(f"{version}: source renders as fields (kind, path, project)",
                                 all(word in shown for word in ("Kind", "Path", "Project"))))
            results.append(check(f"{version}: the default evaluators are listed",
                                 "answer_grounded" in shown and "builtin:latency_slo" in shown))
            results.append(check(f"{version}: the default action is listed", "log-failures" in shown))
            results.append(check(f"{version}: parameters are described", "The first window to triage" in shown))

        parameters = backfill_parameters(work, name="browser")
        query = urllib.parse.urlencode({"parameters": json.dumps(parameters)})
        page.goto(f"{ui}/v2/deployments/deployment/{deployment['id']}/run?{query}")
        wait_for_text(page, "Parameters")
        page.wait_for_timeout(2000)
        shot(page, shots, "2-custom-run-filled")
        page.get_by_role("button", name="Submit").click()
        run = wait_for_run(api, deployment["id"])
        results.append(check(f"the backfill submitted from the form completed ({run['state_type']})",
                             run["state_type"] == "COMPLETED"))

        page.goto(f"{ui}/v2/runs/flow-run/{run['id']}")
        wait_for_text(page, "Artifacts")
        page.get_by_role("tab", name="Artifacts").click()
        found = wait_for_text(page, "browser-rollup")
        shot(page, shots, "3-backfill-run-artifacts")
        results.append(check("the roll-up artifact is on the backfill run", found))
        page.get_by_role("tab", name="Logs").click()
        found = wait_for_text(page, "top root cause")
        page.wait_for_timeout(1000)
        shot(page, shots, "4-backfill-run-logs")
        results.append(check("the logs end with the roll-up table", found))
        artifacts = api_call("POST", f"{api}/artifacts/filter",
                             json={"artifacts": {"key": {"any_": ["browser-rollup"]}}})
        if artifacts:
            page.goto(f"{ui}/v2/artifacts/artifact/{artifacts[0]['id']}")
            page.wait_for_timeout(3000)
            shot(page, shots, "5-rollup-artifact")
        window_runs = api_call("POST", f"{api}/flow_runs/filter", json={"flow_runs": {"name": {
            "like_": "window 2026-11-02"}}})
        if window_runs:
            page.goto(f"{ui}/v2/runs/flow-run/{window_runs[0]['id']}")
            wait_for_text(page, "Artifacts")
            page.get_by_role("tab", name="Artifacts").click()
            page.wait_for_timeout(3000)
            shot(page, shots, "6-window-run-artifacts")
        results.append(check("window runs are named by their window", len(window_runs) == 3))

        for version, base in (("v2", f"{ui}/v2"), ("v1", ui)):
            page.goto(f"{base}/blocks/catalog/tracetriage-loop-config/create")
            page.wait_for_timeout(3000)
            shot(page, shots, f"7-loop-config-block-form-{version}")
            shown = form_text(page)
            results.append(check(f"{version}: the LoopConfigBlock form shows source fields and the default "
                                 "evaluators", "Kind" in shown and "answer_grounded" in shown))
        subprocess.run([sys.executable, "-c", "from blocks import LoopConfigBlock; from tasks.config import "
                        "load_config; LoopConfigBlock(config=load_config('docs/loop.yaml')).save('support-bot')"],
                       env=server["env"], cwd=REPO, check=True)
        (block,) = api_call("POST", f"{api}/block_documents/filter",
                            json={"block_documents": {"name": {"any_": ["support-bot"]}}})
        # The read-only block page: v2 shows nested objects as fields (lists of objects as plain JSON); v1 shows
        # lists of objects as an escaped JSON string whatever the schema, so it is only screenshotted.
        for version, base in (("v2", f"{ui}/v2"), ("v1", ui)):
            page.goto(f"{base}/blocks/block/{block['id']}")
            page.wait_for_timeout(3000)
            shot(page, shots, f"8-loop-config-block-{version}")
        page.goto(f"{ui}/v2/blocks/block/{block['id']}")
        wait_for_text(page, "support-bot")
        shown = form_text(page)
        results.append(check("v2: the saved LoopConfigBlock shows its config as fields, not escaped JSON",
                             "Kind" in shown and "support-bot" in shown and '\\"' not in shown))
        browser.close()
    return results


def form_text(page: Page) -> str:
    """What a person reads on the page: its text and the values in its inputs."""
    values = page.locator("input, textarea, select").evaluate_all("els => els.map(e => e.value)")
    return page.inner_text("body") + "\n" + "\n".join(values)


def wait_for_run(api: str, deployment_id: str, timeout: float = 300) -> dict:
    """The deployment's flow run, once it has finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = api_call("POST", f"{api}/flow_runs/filter",
                        json={"flow_runs": {"deployment_id": {"any_": [deployment_id]}}})
        if runs and runs[0]["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return runs[0]
        time.sleep(1)
    return {"id": runs[0]["id"] if runs else "", "state_type": "TIMEOUT"}


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/tracetriage-ui")))
