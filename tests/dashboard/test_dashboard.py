"""The dashboard: its JSON endpoints and token gate, and the page in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

import dashfuncs as df
import pygirder

pytest.importorskip("starlette", reason="the dashboard needs pip install 'pygirder[dashboard]'")
pytest.importorskip("uvicorn", reason="the dashboard needs pip install 'pygirder[dashboard]'")
from pygirder.cli.dashboard import app as dashboard_cli
from pygirder.dashboard import create_app, serve_in_thread

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def events(text: str) -> list[tuple[str, dict]]:
    """The (event, data) pairs of a server-sent event stream."""
    out = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            out.append((fields["event"], json.loads(fields["data"])))
    return out


def test_json_endpoints_show_the_grid_and_its_calls(grid_factory):
    grid = grid_factory(workers=2)
    assert grid.run(df.fan(3, 0.0)) == 3
    with pytest.raises(pygirder.RemoteError):
        grid.run(df.explode_via(4))
    web = create_app(grid.url, grid.namespace, interval=0.1, fleet=None)
    # a real uvicorn on 127.0.0.1 (the lifespan runs the sampler, as in production)
    with serve_in_thread(web) as server, httpx.Client(base_url=server.url, timeout=10) as http:
        page = http.get("/")
        assert page.status_code == 200 and "pygirder dashboard" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert http.get("/static/app.js").status_code == 200
        assert http.get("/static/style.css").status_code == 200

        snap = http.get("/api/status").json()
        status = snap["status"]
        assert {w["id"] for w in status["workers"]} == set(grid.workers())
        assert status["stats"]["executed"] == 6 and status["stats"]["failed"] == 2
        assert snap["history"] and snap["error"] is None
        deadline = time.monotonic() + 5  # the sampler's failure walk runs in the background
        while {f["fn"] for f in snap["failures"]} != {"dashfuncs:explode", "dashfuncs:explode_via"}:
            assert time.monotonic() < deadline, snap["failures"]
            time.sleep(0.1)
            snap = http.get("/api/status").json()

        fan = http.get(f"/api/calls/{df.fan(3, 0.0).id[:10]}").json()
        assert fan["fn"] == "dashfuncs:fan" and fan["state"] == "done"
        assert {c["id"] for c in fan["children"]} == {df.nap(i, 0.0).id for i in range(3)}
        assert http.get("/api/calls/abc").status_code == 400
        missing = http.get("/api/calls/0123456789abcdef")
        assert missing.status_code == 404 and "no call" in missing.json()["error"]
        assert http.get("/api/fleet").json()["configured"] is False

        stream = http.get("/api/events?limit=2")
        assert stream.headers["content-type"].startswith("text/event-stream")
        kinds = events(stream.text)
        assert [k for k, _ in kinds] == ["snapshot", "status"]
        assert kinds[0][1]["status"]["namespace"] == grid.namespace

        # without a token, only loopback Host names are answered (no DNS rebinding)
        assert http.get("/api/status", headers={"Host": "evil.example"}).status_code == 403


def test_token_is_required_on_every_request(redis_url):
    fleet = [
        {"id": "i-0a1", "role": "redis", "state": "running"},
        {"id": "i-0b2", "role": "worker", "state": "running"},
        {"id": "i-0c3", "role": "worker", "state": "pending"},
    ]
    web = create_app(redis_url, "default", token="s3cret", interval=0.1, fleet=lambda: fleet)
    with serve_in_thread(web) as server, httpx.Client(base_url=server.url, timeout=10) as http:
        for path in ("/", "/static/app.js", "/api/status", "/api/fleet", "/api/events"):
            assert http.get(path).status_code == 401, path
        # with a token, any Host may ask (e.g. through a tunnel or a proxy)
        remote = {"Host": "dashboard.example", "Authorization": "Bearer s3cret"}
        assert http.get("/api/status", headers=remote).status_code == 200
        assert http.get("/api/status", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert http.get("/api/status?token=nope").status_code == 401
        ok = http.get("/api/status", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["status"]["workers"] == []
        assert http.get("/api/status", headers={"X-Pygirder-Token": "s3cret"}).status_code == 200
        page = http.get("/?token=s3cret")  # opening the printed URL sets the cookie ...
        assert page.status_code == 200 and "HttpOnly" in page.headers["set-cookie"]
        assert http.get("/static/style.css").status_code == 200  # ... the page's assets use
        view = http.get("/api/fleet").json()
        assert view["configured"] is True and view["roles"] == {"redis": 1, "worker": 2}
        assert [i["id"] for i in view["instances"]] == ["i-0a1", "i-0b2", "i-0c3"]


def test_cli_refuses_a_public_address_without_a_token():
    result = CliRunner().invoke(dashboard_cli, ["--bind", "0.0.0.0", "--port", "0"])
    assert result.exit_code == 2
    assert "refusing" in result.output and "--token" in result.output


@pytest.mark.slow
def test_page_shows_workers_and_updates_while_a_job_runs(grid_factory):
    if not os.path.exists(CHROMIUM):
        pytest.skip(
            f"{CHROMIUM} is not installed (apt-get install -y chromium); "
            "the dashboard's browser test needs it"
        )
    sync_api = pytest.importorskip("playwright.sync_api")
    grid = grid_factory(workers=2)
    assert grid.run(df.fan(4, 0.0)) == 6
    with pytest.raises(pygirder.RemoteError):
        grid.run(df.explode_via(9))
    ARTIFACTS.mkdir(exist_ok=True)
    web = create_app(grid.url, grid.namespace, token="t0ken", interval=0.25, fleet=None)
    job: list[object] = []
    with serve_in_thread(web) as server, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            problems: list[str] = []
            page.on("pageerror", lambda exc: problems.append(str(exc)))
            page.goto(f"{server.url}/?token=t0ken")
            assert "token" not in page.url  # kept out of the address bar
            for worker_id in grid.workers():
                sync_api.expect(page.locator("#workers tbody")).to_contain_text(worker_id)
            sync_api.expect(page.locator("#conn")).to_have_text("live")
            sync_api.expect(page.locator("#c-executed")).to_have_text("7")

            runner = threading.Thread(
                target=lambda: job.append(grid.map(df.nap, [(i, 0.02) for i in range(80)]))
            )
            runner.start()
            # the executed counter and the throughput both move while the job runs
            # (polled by Playwright: the page's CSP forbids evaluating strings)
            not_7 = re.compile(r"^(?!7$)[0-9,]+$")
            sync_api.expect(page.locator("#c-executed")).to_have_text(not_7, timeout=15_000)
            moving = re.compile(r"^(?!0\.0$)[0-9.,]+$")
            sync_api.expect(page.locator("#c-rate")).to_have_text(moving, timeout=15_000)
            sync_api.expect(page.locator("#workers tbody")).to_contain_text("busy")
            runner.join(30)
            assert job and job[0] == list(range(80))
            sync_api.expect(page.locator("#c-executed")).to_have_text("87", timeout=10_000)
            sync_api.expect(page.locator("#c-results")).to_have_text("87")  # results stored

            # the call explorer: a failure, then through to its child and back
            page.locator("#failures tbody tr", has_text="explode_via").click()
            view = page.locator("#call")
            sync_api.expect(view).to_contain_text("dashfuncs:explode_via")
            sync_api.expect(view).to_contain_text("RuntimeError: exploded on 9")
            view.locator("table.children a.call-link").first.click()
            sync_api.expect(view.locator("h3")).to_contain_text("dashfuncs:explode")
            sync_api.expect(view).to_contain_text("explode_via")  # its parent, clickable
            page.fill("#explore-id", df.fan(4, 0.0).id[:10])
            page.click("#explore-form button[type=submit]")
            sync_api.expect(view).to_contain_text("Children (4)")
            sync_api.expect(page.locator("#fleet")).to_contain_text("No fleet configured")
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            assert problems == []
        finally:
            browser.close()


def test_the_default_fleet_source_is_the_cloud_fleets_rows() -> None:
    from pygirder.cloud.fleet import dashboard_instances
    from pygirder.dashboard import default_fleet_source

    assert default_fleet_source() is dashboard_instances
