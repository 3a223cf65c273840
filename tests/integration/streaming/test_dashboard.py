"""The operations dashboard (/dashboard) and the API docs (/docs), in headless Chromium (Debian's
``chromium`` through Playwright, as in test_browser.py; skipped where it is not installed).

A person pastes a key and watches: a credit shows in major units within a second of its command,
the page survives a restart of a real server process on the same port (saying so while it
reconnects), and the key is never in a URL the page requests nor in its storage.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pytest_aiohttp import AiohttpClient

from backend.app import create_app
from backend.domain.money import CURRENCIES
from backend.http.static import CSP
from tests.conftest import bearer, make_settings, mint_token
from tests.integration.streaming.conftest import MakeClient
from tests.integration.streaming.test_browser import api_of
from tests.support import Client, secret_of
from tests.system.procs import Process, create_key

pytestmark = pytest.mark.timeout(180)

LEAD_SCREENSHOT = Path(tempfile.gettempdir()) / "dashboard.png"
"""A copy of the dashboard test's screenshot where a person looks for it (/tmp/dashboard.png)."""


class Watched:
    """A page, the URLs it requested and what its console said (CSP violations land there)."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.urls: list[str] = []
        self.console: list[str] = []
        page.on("request", lambda request: self.urls.append(request.url))
        page.on("console", lambda message: self.console.append(message.text))
        page.on("pageerror", lambda error: self.console.append(f"pageerror: {error}"))


async def open_dashboard(browser: Any, base: str, key: str) -> Watched:
    page = await browser.new_page(viewport={"width": 1280, "height": 1000})
    watched = Watched(page)
    await page.goto(base + "/dashboard")
    await page.get_by_label("API key").fill(key)
    await page.get_by_label("API key").press("Enter")
    return watched


async def post(http: aiohttp.ClientSession | Client, key: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post(path, json=body, headers=bearer(key)) as response:
        assert response.status < 300, (path, response.status, await response.text())
        answer: dict[str, Any] = await response.json()
        return answer


async def assert_key_kept_secret(watched: Watched, *keys: str) -> None:
    assert watched.urls
    for key in keys:
        assert not [url for url in watched.urls if key in url]
        secret = secret_of(key)
        assert not [url for url in watched.urls if secret in url]
    stored = await watched.page.evaluate(
        "() => JSON.stringify([Object.entries(localStorage), Object.entries(sessionStorage)])")
    for key in keys:
        assert secret_of(key) not in stored
        assert not [line for line in watched.console if secret_of(key) in line]  # nor in its console
    assert stored == "[[],[]]"
    assert not [url for url in watched.urls if "tly_" in url]
    assert all("/v1/streams/" in url for url in watched.urls if "access_token=" in url)


async def test_the_pages_are_public_fixed_files_with_a_strict_policy(make_client: MakeClient) -> None:
    client = await make_client()
    for path, content_type in (("/dashboard", "text/html"), ("/dashboard/app.js", "text/javascript"),
                               ("/dashboard/app.css", "text/css"), ("/docs", "text/html"),
                               ("/docs/docs.js", "text/javascript"), ("/docs/swagger-ui-bundle.js", "text/javascript"),
                               ("/docs/swagger-ui.css", "text/css")):
        response = await client.get(path)
        assert response.status == 200, path
        assert response.content_type == content_type, path
        assert response.headers["Content-Security-Policy"] == CSP
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert (await response.read())
        head = await client.head(path)
        assert head.status == 200
    assert "script-src 'self';" in CSP and "unsafe-inline" not in CSP and "unsafe-eval" not in CSP
    html = await (await client.get("/dashboard")).text()
    assert "<script>" not in html and "onclick" not in html and "<form" not in html
    for path in ("/dashboard/", "/dashboard/index.html", "/dashboard/../app.py", "/dashboard/%2e%2e/static.py",
                 "/dashboard/..%2fstatic.py", "/dashboard/%2e%2e%2f%2e%2e%2fsetup.cfg", "/docs/swagger-ui/LICENSE",
                 "/docs/..%2f..%2fapp.py", "/dashboardx"):
        response = await client.get(path)
        assert response.status == 404, path
        assert response.content_type == "application/problem+json", path


def to_minor(text: str, exponent: int) -> int:
    """'1,234.56' at exponent 2 -> 123456, by string arithmetic (as the page formats)."""
    whole, _, fraction = text.replace(",", "").partition(".")
    assert len(fraction) == exponent, text
    return int(whole + fraction)


def to_major(minor: int, exponent: int) -> str:
    digits = str(minor).rjust(exponent + 1, "0")
    whole = f"{int(digits[:len(digits) - exponent]):,}"
    return whole + ("." + digits[len(digits) - exponent:] if exponent else "")


async def total(page: Any, currency: str, column: int = 2) -> int:
    """A figure of the totals table in minor units (0 while the currency has no row); column 2 is the balance."""
    cells = page.locator(f'#totals-body tr[data-currency="{currency}"] td')
    if not await cells.count():
        return 0
    return to_minor(await cells.nth(column).inner_text(), CURRENCIES[currency])


def total_cell(page: Any, currency: str, column: int = 2) -> Any:
    return page.locator(f'#totals-body tr[data-currency="{currency}"] td').nth(column)


async def test_a_credit_shows_in_major_units_within_a_second_and_no_key_leaks(
        aiohttp_client: AiohttpClient, own_database_url: str, browser: Any, tmp_path: Path) -> None:
    # a database of its own: the page's head position and per-minute counts see no other test's events
    client = await aiohttp_client(create_app(make_settings(own_database_url, sse_shutdown_window_s=0.2)))
    app = client.app
    admin = await mint_token(app, "operator", ["admin"])
    viewer = await mint_token(app, "ana", ["wallets:read", "audit:read"])  # ana's wallets, every total
    usd = (await post(client, admin, "/v1/wallets", {"owner": "ana", "currency": "USD"}))["wallet_id"]
    btc = (await post(client, admin, "/v1/wallets", {"owner": "ana", "currency": "BTC"}))["wallet_id"]
    opened = await post(client, admin, "/v1/wallets", {"owner": "ana", "currency": "JPY"})
    jpy = opened["wallet_id"]

    from playwright.async_api import expect

    watched = await open_dashboard(browser, api_of(client), viewer)
    page = watched.page
    await expect(page.locator("#status")).to_have_text("Live", timeout=10_000)
    await expect(page.locator("#stats-position")).to_have_text(f"as of log position {opened['position']}",
                                                                timeout=10_000)  # the log's head so far
    counted = {kind: int(await page.locator(f"#{kind}-minute").inner_text()) for kind in ("events", "commands")}
    before = {currency: await total(page, currency) for currency in ("USD", "BTC", "JPY")}
    usd_available = await total(page, "USD", 3)
    usd_locked = await total(page, "USD", 4)
    await post(client, admin, f"/v1/wallets/{btc}/credits", {"amount": 1234567, "reference": "b"})
    await post(client, admin, f"/v1/wallets/{jpy}/credits", {"amount": 5000, "reference": "j"})
    await expect(total_cell(page, "BTC")).to_have_text(to_major(before["BTC"] + 1234567, 8), timeout=5_000)
    await expect(total_cell(page, "JPY")).to_have_text(to_major(before["JPY"] + 5000, 0), timeout=5_000)
    await page.get_by_label("Wallet id").fill(usd)
    await page.get_by_role("button", name="Show").click()
    balance = page.locator("#wallet-balance .value")
    await expect(balance).to_have_text("0.00 USD", timeout=10_000)

    await post(client, admin, f"/v1/wallets/{usd}/credits", {"amount": 12345, "reference": "seen"})
    await expect(balance).to_have_text("123.45 USD", timeout=1_000)
    await expect(page.locator("#wallet-available .value")).to_have_text("123.45 USD", timeout=1_000)
    await expect(total_cell(page, "USD")).to_have_text(to_major(before["USD"] + 12345, 2), timeout=5_000)
    await post(client, admin, f"/v1/wallets/{usd}/locks", {"amount": 2345, "reason": "hold"})
    await expect(page.locator("#wallet-available .value")).to_have_text("100.00 USD", timeout=1_000)
    await expect(page.locator("#wallet-locked .value")).to_have_text("23.45 USD", timeout=1_000)
    await expect(total_cell(page, "USD", 3)).to_have_text(to_major(usd_available + 12345 - 2345, 2), timeout=5_000)
    await expect(total_cell(page, "USD", 4)).to_have_text(to_major(usd_locked + 2345, 2), timeout=5_000)

    feed = page.locator("#feed-body")
    await expect(feed).to_contain_text("123.45 USD", timeout=5_000)
    await page.locator("#feed-type").select_option("FundsLocked")
    await expect(feed.locator("tr").first).to_contain_text("23.45 USD")
    await expect(feed).not_to_contain_text("WalletCredited")
    await page.locator("#feed-type").select_option("")
    await page.get_by_label("Wallet", exact=True).fill(btc[:13])
    await expect(feed).to_contain_text("0.01234567 BTC")
    await expect(feed).not_to_contain_text("USD")
    await page.get_by_label("Wallet", exact=True).fill("")

    await expect(page.locator("#projections-body")).to_contain_text("stats", timeout=5_000)
    # since: three credits and a lock, one event each, each a command
    await expect(page.locator("#events-minute")).to_have_text(str(counted["events"] + 4), timeout=5_000)
    await expect(page.locator("#commands-minute")).to_have_text(str(counted["commands"] + 4))
    shot = tmp_path / "dashboard.png"
    await page.screenshot(path=str(shot), full_page=True)
    shutil.copyfile(shot, LEAD_SCREENSHOT)

    await assert_key_kept_secret(watched, viewer)
    assert not [line for line in watched.console if "Content Security Policy" in line or "pageerror" in line], \
        watched.console
    assert not [line for line in watched.console if "Failed to load resource" in line], watched.console  # favicon


async def test_a_deposit_shows_in_its_currency_whether_the_feed_saw_it_opened_or_not(
        aiohttp_client: AiohttpClient, own_database_url: str, browser: Any) -> None:
    """A deposit's events carry no currency of their own: the feed learns it from the deposit's first
    event when that is in the feed, else asks GET /v1/deposits/{id}."""
    client = await aiohttp_client(create_app(make_settings(own_database_url, sse_shutdown_window_s=0.2)))
    admin = await mint_token(client.app, "operator", ["admin"])
    viewer = await mint_token(client.app, "ana", ["wallets:read", "audit:read"])  # audit:read: every stream
    eur = (await post(client, admin, "/v1/wallets", {"owner": "ana", "currency": "EUR"}))["wallet_id"]
    early = (await post(client, admin, "/v1/deposits", {"wallet_id": eur, "currency": "EUR"}))["deposit_id"]
    for n in range(60):  # the feed starts 50 events before the head: the early deposit's opening is out of it
        await post(client, admin, f"/v1/wallets/{eur}/credits", {"amount": 1, "reference": f"fill-{n}"})

    from playwright.async_api import expect

    watched = await open_dashboard(browser, api_of(client), viewer)
    page = watched.page
    await expect(page.locator("#status")).to_have_text("Live", timeout=10_000)
    late = (await post(client, admin, "/v1/deposits", {"wallet_id": eur, "currency": "EUR"}))["deposit_id"]
    for deposit, amount in ((early, 5000), (late, 1234)):
        await post(client, admin, f"/v1/deposits/{deposit}/status", {"status": "confirming", "confirmations": 1})
        await post(client, admin, f"/v1/deposits/{deposit}/status",
                   {"status": "confirmed", "confirmations": 6, "amount": amount, "chain_tx_id": f"tx-{deposit}"})
    feed = page.locator("#feed-body")
    await expect(feed).to_contain_text("DepositConfirmed", timeout=5_000)
    await page.locator("#feed-type").select_option("DepositConfirmed")
    rows = feed.locator("tr")
    await expect(rows).to_have_count(2)
    await expect(rows.nth(0)).to_contain_text(f"deposit-{late}")
    await expect(rows.nth(0)).to_contain_text("12.34 EUR")
    await expect(rows.nth(1)).to_contain_text(f"deposit-{early}")
    await expect(rows.nth(1)).to_contain_text("50.00 EUR", timeout=5_000)  # once the lookup has answered
    await expect(feed).not_to_contain_text("minor units")
    await assert_key_kept_secret(watched, viewer)


async def test_a_hostile_owner_and_a_huge_balance_keep_the_wallet_view_in_shape(
        make_client: MakeClient, browser: Any) -> None:
    """An owner with an unclosed right-to-left override reversed the currency and version after it;
    a 128-character owner and a balance of 2^63 - 1 pushed the figures out of the panel."""
    client = await make_client()
    admin = await mint_token(client.app, "operator", ["admin"])
    from playwright.async_api import expect

    for owner, amount in (("\u202emallory", 5), ("A" * 128, 2**63 - 1)):
        wallet = (await post(client, admin, "/v1/wallets", {"owner": owner, "currency": "USD"}))["wallet_id"]
        await post(client, admin, f"/v1/wallets/{wallet}/credits", {"amount": amount, "reference": "r"})
        watched = await open_dashboard(browser, api_of(client), admin)
        page = watched.page
        await expect(page.locator("#status")).to_have_text("Live", timeout=10_000)
        await page.get_by_label("Wallet id").fill(wallet)
        await page.get_by_role("button", name="Show").click()
        await expect(page.locator("#wallet-balance .value")).to_contain_text("USD", timeout=10_000)
        assert await page.locator("#wallet-view bdi").inner_text() == owner  # isolated from what follows
        width = await page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], width
        await page.close()


async def test_the_dashboard_survives_a_server_restart(database_url: str, browser: Any, tmp_path: Path) -> None:
    key = await asyncio.to_thread(create_key, database_url)
    server = Process.serve("dashboard", database_url, SSE_RETRY_MS="500", SHUTDOWN_TIMEOUT_S="3",
                           SSE_SHUTDOWN_WINDOW_S="0.2")
    server.start()
    from playwright.async_api import expect

    try:
        await asyncio.to_thread(server.wait_ready)
        async with aiohttp.ClientSession(server.base) as http:
            wallet = (await post(http, key, "/v1/wallets", {"owner": "rita", "currency": "EUR"}))["wallet_id"]
            await post(http, key, f"/v1/wallets/{wallet}/credits", {"amount": 100, "reference": "before"})
        watched = await open_dashboard(browser, server.base, key)
        page = watched.page
        await expect(page.locator("#status")).to_have_text("Live", timeout=10_000)
        await page.get_by_label("Wallet id").fill(wallet)
        await page.get_by_label("Wallet id").press("Enter")
        balance = page.locator("#wallet-balance .value")
        await expect(balance).to_have_text("1.00 EUR", timeout=10_000)
        await expect(total_cell(page, "EUR")).not_to_be_empty(timeout=10_000)
        eur = await total(page, "EUR")

        assert await asyncio.to_thread(server.stop) == 0
        await expect(page.locator("#status")).to_contain_text("Reconnecting", timeout=10_000)
        await page.screenshot(path=str(tmp_path / "reconnecting.png"), full_page=True)
        server.start()
        await asyncio.to_thread(server.wait_ready)
        async with aiohttp.ClientSession(server.base) as http:
            await post(http, key, f"/v1/wallets/{wallet}/credits", {"amount": 2550, "reference": "after"})
        await expect(balance).to_have_text("26.50 EUR", timeout=15_000)
        await expect(page.locator("#status")).to_have_text("Live", timeout=15_000)
        await expect(total_cell(page, "EUR")).to_have_text(to_major(eur + 2550, 2), timeout=15_000)
        await expect(page.locator("#feed-body")).to_contain_text("25.50 EUR", timeout=15_000)  # resumed, no gap
        await page.screenshot(path=str(tmp_path / "after-restart.png"), full_page=True)
        await assert_key_kept_secret(watched, key)
        assert secret_of(key) not in server.output()
    finally:
        server.kill()


async def test_the_docs_render_the_operations_offline(make_client: MakeClient, browser: Any, tmp_path: Path) -> None:
    client = await make_client()
    base = api_of(client)
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    watched = Watched(page)
    await page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(base)
                     else route.abort())  # offline: nothing but this server answers
    await page.goto(base + "/docs")
    from playwright.async_api import expect

    await expect(page.locator(".opblock-summary-path").first).to_be_visible(timeout=20_000)
    for path in ("/v1/wallets/{wallet_id}/credits", "/v1/stream-tokens", "/v1/streams/dashboard"):
        await expect(page.locator(f'.opblock-summary-path[data-path="{path}"]').first).to_be_visible()
    await expect(page.locator(".opblock-summary-description").first).not_to_be_empty()
    await page.screenshot(path=str(tmp_path / "docs.png"))
    assert all(url.startswith(base) for url in watched.urls), watched.urls
    assert not [line for line in watched.console if "Content Security Policy" in line or "pageerror" in line], \
        watched.console


async def test_amounts_are_major_units_by_integer_arithmetic(make_client: MakeClient, browser: Any) -> None:
    client = await make_client()
    page = await browser.new_page()
    await page.goto(api_of(client) + "/dashboard")
    exponents = await page.evaluate("(codes) => codes.map((c) => window.tallyMoney.exponentOf(c))",
                                    sorted(CURRENCIES))
    assert dict(zip(sorted(CURRENCIES), exponents, strict=True)) == dict(CURRENCIES)  # the server's table
    cases = [("0", "USD", "0.00"), ("5", "USD", "0.05"), ("-1", "EUR", "-0.01"), ("123456789", "USD", "1,234,567.89"),
             ("5000", "JPY", "5,000"), ("1234", "BHD", "1.234"), ("1", "KWD", "0.001"), ("100", "XYZ", "1.00"),
             ("1", "BTC", "0.00000001"), (str(2**63 - 1), "USD", "92,233,720,368,547,758.07"),
             (str(2**63 - 1), "ETH", "9,223,372,036.854775807")]
    got = await page.evaluate("(cases) => cases.map(([v, c]) => window.tallyMoney.formatMoney(BigInt(v), c))", cases)
    assert got == [expected for *_, expected in cases]
    # a JSON integer beyond 2**53 stays exact (a float would round it to ...776000)
    exact = await page.evaluate("(text) => window.tallyMoney.formatMoney(window.tallyMoney.parseJSON(text).a, 'USD')",
                                f'{{"a": {2**63 - 1}}}')
    assert exact == "92,233,720,368,547,758.07"


async def test_a_refused_key_is_said_on_screen_not_retried_for_ever(make_client: MakeClient, browser: Any) -> None:
    client = await make_client()
    writer = await mint_token(client.app, "wendy", ["wallets:write"])  # may not follow any stream
    from playwright.async_api import expect

    watched = await open_dashboard(browser, api_of(client), writer)
    status = watched.page.locator("#status")
    await expect(status).to_have_text("This API key may not follow the dashboard: streams need an API key with "
                                      "the 'wallets:read' or 'audit:read' scope", timeout=10_000)
    await expect(watched.page.get_by_role("button", name="Connect")).to_be_visible()
    await assert_key_kept_secret(watched, writer)

    unknown = writer.removesuffix(secret_of(writer)) + "x" * 43  # same key id, another secret
    await watched.page.get_by_label("API key").fill(unknown)
    await watched.page.get_by_role("button", name="Connect").click()
    await expect(status).to_have_text("The API key was refused", timeout=10_000)
    await assert_key_kept_secret(watched, writer, unknown)
