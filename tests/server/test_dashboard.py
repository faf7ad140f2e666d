"""The dashboard in a real browser (Playwright driving Debian's chromium, headless, no network).

Loads /, sees live numbers change while requests run, checks the recent
requests' queue and TTFT columns against the API, takes a screenshot
under load (KVCELLAR_UPDATE_SCREENSHOTS=1 also copies it to
docs/dashboard.png), and clears a tier through the page.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .support import long_text

CHROMIUM = Path(os.environ.get("KVCELLAR_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
DOCS = Path(__file__).resolve().parents[2] / "docs"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium; Playwright's own browsers are not used)",
)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (pip install -e .[test])")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _conversation(server, system: str, index: int, num_turns: int) -> list[dict]:
    client = server.client()
    messages = [{"role": "system", "content": system}]
    for turn in range(num_turns):
        messages.append({"role": "user", "content": long_text(f"user {index} turn {turn}", 20)})
        reply = client.chat.completions.create(model=server.model, messages=messages, max_tokens=24, temperature=0)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
    return messages


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{1000 * seconds:.1f} ms"


def _check_recent_times(server, page) -> None:
    """The recent-requests table shows each request's time in queue, TTFT from arrival and engine TTFT, as the API has them."""
    headers = page.locator("#recent-body").locator("xpath=../thead/tr/th").all_inner_texts()
    assert headers[7:11] == ["queue", "TTFT", "engine TTFT", "finish"]
    records = server.get("/v1/requests/recent", params={"limit": 20}).json()["data"]
    newest = str(records[0]["seq"])  # nothing runs now: the page shows these once it has polled again
    page.wait_for_function(f"document.querySelector('#recent-body tr').dataset.seq === '{newest}'", timeout=10_000)
    for record in records:
        row = page.locator(f'#recent-body tr[data-seq="{record["seq"]}"]')
        shown = [row.locator(f"td.{name}").inner_text() for name in ("queue", "ttft", "engine-ttft", "finish")]
        expected = [_ms(record["queue_s"]), _ms(record["ttft_s"]), _ms(record["engine_ttft_s"]), record["finish_reason"]]
        assert shown == expected
        if record["ttft_s"] is not None:
            assert record["ttft_s"] == pytest.approx(record["queue_s"] + record["engine_ttft_s"])


def test_dashboard_shows_live_numbers_and_clears_a_tier(server, browser, unique, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    page.goto(server.base_url + "/?interval=250")
    page.wait_for_function("document.getElementById('status').textContent === 'live'", timeout=10_000)
    requests_before = page.inner_text("#requests")
    saved_before = page.inner_text("#saved-tokens")

    system = long_text(f"shared system prompt {unique}", 40)
    with ThreadPoolExecutor(4) as pool:  # the load: four multi-turn chats sharing one system prompt
        futures = [pool.submit(_conversation, server, system, i, 5) for i in range(4)]
        page.wait_for_function(f"document.getElementById('requests').textContent !== '{requests_before}'", timeout=20_000)
        page.wait_for_function(f"document.getElementById('saved-tokens').textContent !== '{saved_before}'", timeout=20_000)
        page.wait_for_selector("#recent-body tr", timeout=10_000)
        page.wait_for_timeout(600)  # a few more polls, so the charts have points
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        conversations = [future.result(timeout=120) for future in futures]

    if os.environ.get("KVCELLAR_UPDATE_SCREENSHOTS") == "1":
        shutil.copyfile(tmp_path / "dashboard.png", DOCS / "dashboard.png")
    expected = int(requests_before.replace(",", "")) + 20  # 4 chats x 5 turns
    page.wait_for_function(f"Number(document.getElementById('requests').textContent.replace(/,/g, '')) >= {expected}",
                           timeout=10_000)  # fmt: skip
    cached_cells = page.locator("#recent-body td.cached").all_inner_texts()
    assert any(int(text.replace(",", "")) > 0 for text in cached_cells)
    _check_recent_times(server, page)

    # Clear the device tier through the page; the server forgets the conversations.
    probe = {"messages": conversations[0][:-1]}
    assert server.post("/v1/cache/probe", probe).json()["cached_tokens"] > 0
    page.click('button.clear-tier[data-tier="device"]')
    page.wait_for_function("document.getElementById('admin-message').textContent === 'device cleared'", timeout=10_000)
    assert server.post("/v1/cache/probe", probe).json()["cached_tokens"] == 0
    page.wait_for_function(
        "document.querySelector('#tiers-body tr[data-tier=\"device\"] .bytes').textContent.startsWith('0 B /')", timeout=10_000
    )
    page.close()
