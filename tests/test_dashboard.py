"""The live dashboard at `/`, in a real browser: Debian's chromium driven by Playwright, against
`lambdalake up` as a real process with events sent to its gateway.

Each chart's figure carries what it drew (`data-total`, `data-points`); the test compares
that with a live query, checks the series' pixels are on the canvas, and sends more events
to see them appear without a reload.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright
from test_flow import Flow, batch_run, send, send_synthetic

from lambdalake.eventlog import now_ms
from lambdalake.producer import ProduceStats
from lambdalake.synthetic import WebAnalyticsStream

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
FIRST_SERIES_RGB = (0x34, 0x65, 0xA4)  # COLORS[0] in dashboard.js
VIEW = "pageviews_by_url_hour"
HOUR = 3_600_000

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium "
                                "(`make test` installs it)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Console:
    """Every console error and uncaught exception of a page."""

    def __init__(self, page: Page):
        self.errors: list[str] = []
        page.on("console", self._message)
        page.on("pageerror", lambda error: self.errors.append(str(error)))

    def _message(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)


@pytest.fixture
def flow(tmp_path: Path) -> Iterator[Flow]:
    flow = Flow(tmp_path)
    yield flow
    flow.stop()


def live_total(flow: Flow, headers: dict[str, str] | None = None) -> int:
    """The pageviews of the page's default range (the last 24 hours, to the end of this hour),
    as the API answers it right now."""
    end = (now_ms() // HOUR + 1) * HOUR
    params = {"bucket": "total", "group_by": "", "from": end - 24 * HOUR, "to": end}
    reply = httpx.get(f"{flow.api}/views/{VIEW}", params=params, headers=headers, timeout=30)
    reply.raise_for_status()
    return sum(row["pageviews"] for row in reply.json()["rows"])


def chart_total(page: Page, metric: str) -> float:
    total = page.get_attribute(f"figure[data-metric={metric}]", "data-total")
    return float(total) if total is not None else -1


def wait_for_chart_total(page: Page, metric: str, expected: int) -> None:
    page.wait_for_function(
        "([metric, expected]) => Number(document.querySelector("
        "`figure[data-metric=${metric}]`)?.dataset.total) === expected",
        arg=[metric, expected], timeout=20_000)


def series_pixels(page: Page, metric: str) -> int:
    """Pixels of the first series' colour on the chart's canvas."""
    return page.evaluate(
        """([metric, [r, g, b]]) => {
            const canvas = document.querySelector(`figure[data-metric=${metric}] canvas`);
            const context = canvas.getContext("2d");
            const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
            let count = 0;
            for (let i = 0; i < data.length; i += 4) {
                if (data[i] === r && data[i + 1] === g && data[i + 2] === b) count++;
            }
            return count;
        }""", [metric, list(FIRST_SERIES_RGB)])


def test_the_dashboard_draws_live_queries_and_new_events_without_a_reload(
    flow: Flow, browser: Browser, tmp_path: Path
) -> None:
    flow.start()
    send_synthetic(flow, 400, seed=3)
    batch_run(flow)  # a batch version, so the cut is on the chart
    send_synthetic(flow, 200, seed=4)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    console = Console(page)

    page.goto(f"{flow.api}/?view={VIEW}")
    expected = _settled_total(flow)
    wait_for_chart_total(page, "pageviews", expected)
    assert series_pixels(page, "pageviews") > 50
    assert page.text_content("#batch-version") not in ("–", "none yet")
    assert page.locator("#top-table tbody tr").count() > 0

    send_synthetic(flow, 150, seed=5)
    later = _settled_total(flow)
    assert later > expected
    wait_for_chart_total(page, "pageviews", later)
    assert page.evaluate("performance.getEntriesByType('navigation').length") == 1  # no reload

    page.select_option("#split", "url")
    page.wait_for_selector("figure[data-metric=pageviews] .u-legend th:has-text('/')")
    page.screenshot(path=tmp_path / "dashboard.png", full_page=True)
    assert console.errors == []


def test_quantiles_are_drawn_as_bands(flow: Flow, browser: Browser) -> None:
    flow.start()
    stream = WebAnalyticsStream(seed=9)
    events = [stream.event(now_ms()) for _ in range(300)]
    send(flow, events, ProduceStats())
    page = browser.new_page()
    console = Console(page)

    page.goto(f"{flow.api}/?view=durations_by_url_hour")
    legend = page.locator("figure[data-metric=duration_ms] .u-legend .u-series th")
    legend.filter(has_text="p99").wait_for()
    assert {"p50", "p90", "p99"} <= set(legend.all_text_contents())
    assert series_pixels(page, "duration_ms") > 0
    assert console.errors == []


def test_the_page_asks_for_a_key_when_the_api_needs_one(tmp_path: Path, browser: Browser) -> None:
    keys = [{"key": "reader-key", "scopes": ["query"]}, {"key": "writer-key", "scopes": ["ingest"]}]
    flow = Flow(tmp_path)
    flow.env["LAMBDALAKE_API_KEYS"] = json.dumps(keys)
    try:
        flow.start()
        with httpx.Client(headers={"X-API-Key": "writer-key"}, timeout=30) as client:
            client.post(flow.gateway, json={"events": [WebAnalyticsStream(seed=1).event(now_ms())
                                                       for _ in range(20)]}).raise_for_status()
        page = browser.new_page()
        page.goto(f"{flow.api}/?view={VIEW}")
        page.fill("#key-input", "reader-key")
        page.click("#key-form button")
        expected = _settled_total(flow, {"X-API-Key": "reader-key"})
        wait_for_chart_total(page, "pageviews", expected)
        assert page.evaluate("sessionStorage.getItem('lambdalake.apiKey')") == "reader-key"
    finally:
        flow.stop()


def _settled_total(flow: Flow, headers: dict[str, str] | None = None) -> int:
    """The live total once the speed layer has folded what was sent (it stops changing)."""
    previous, deadline = -1, time.monotonic() + 20
    while time.monotonic() < deadline:
        total = live_total(flow, headers)
        if total == previous and total > 0:
            return total
        previous = total
        time.sleep(0.5)
    raise TimeoutError("the live total did not settle")


def test_the_static_files_ship_in_the_package() -> None:
    from lambdalake.serving.app import STATIC

    names = {"index.html", "dashboard.js", "dashboard.css"}
    assert names <= {entry.name for entry in STATIC.iterdir()}
    assert {"uPlot.iife.min.js", "uPlot.min.css", "uPlot.LICENSE"} <= {
        entry.name for entry in (STATIC / "vendor").iterdir()}
    html = (STATIC / "index.html").read_text()
    assert "http://" not in html and "https://" not in html  # nothing from a CDN
