"""The dashboard in a real headless Chromium, after an attack on a live server."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from defense.training import train_detectors
from mlaas.apiclient import AdminClient
from mlaas.datasets import load_dataset
from mlaas.images import InputShape
from mlaas.wire import NPY_MEDIA_TYPE, encode_npy
from testbed.serverproc import ServerProcess
from tests.helpers import ADMIN_TOKEN, wait_until

pytestmark = pytest.mark.slow
ARTIFACTS = Path(__file__).parent.parent / "var" / "test-artifacts"


def chrome():
    webdriver = pytest.importorskip("selenium.webdriver")
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver are missing: .ci/run installs them")
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)  # fmt: skip
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(service=Service(driver), options=options)


def wait_for(browser, predicate, timeout: float = 20.0):
    """``wait_until`` on the page, with what the page does show when it times out."""
    try:
        return wait_until(lambda: predicate(browser), timeout, interval=0.2, what="the page")
    except AssertionError as timed_out:
        raise AssertionError(
            f"the page never showed it; it shows:\n{browser.page_source[:3000]}"
        ) from timed_out


def log_in(browser, url: str) -> None:
    """The login form, as a person fills it in; then the dashboard's first data."""
    from selenium.webdriver.common.by import By

    browser.get(f"{url}/dashboard")
    browser.find_element(By.ID, "token").send_keys(ADMIN_TOKEN)
    browser.find_element(By.ID, "login").click()
    wait_for(browser, lambda b: b.find_elements(By.ID, "clients"))
    assert "token" not in browser.current_url


def chart(browser, level: str, detector: str):
    from selenium.webdriver.common.by import By

    selector = f'svg.chart[data-level="{level}"][data-detector="{detector}"]'
    found = browser.find_elements(By.CSS_SELECTOR, selector)
    return found[0] if found else None


def test_the_dashboard_shows_the_attack(tiny_victim, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    defense_dir = tmp_path / "defense"
    train_detectors(["ood-binary"], tiny_victim, size=1500, out_dir=defense_dir)
    env = {
        "MLAAS_DATABASE_URL": f"sqlite:///{tmp_path / 'mlaas.db'}",
        "MLAAS_ADMIN_TOKEN": ADMIN_TOKEN,
        "MLAAS_DETECTORS": "ood-binary,prada",
        "MLAAS_DEFENSE_DIR": str(defense_dir),
    }
    shape = InputShape(1, 28, 28)
    crops = load_dataset("natural-crops", shape).get_batch(np.arange(160))
    pool = load_dataset("fashion-mnist:pool", shape).get_batch(np.arange(100))
    # Two keys of one account, each sending benign images then a few crops: the account's
    # stream holds twice the crops of either key's.
    mixed = np.concatenate([pool[40:70], crops[:10]])
    senders = (("thief", None, crops), ("shopper", None, pool[:40]))
    senders += (("acme-1", "acme", mixed), ("acme-2", "acme", mixed))
    with ServerProcess(tiny_victim, env=env, log_file=tmp_path / "server.log") as server:
        form = httpx.get(f"{server.url}/dashboard")  # admin only: a login form
        assert 'name="token"' in form.text and "clients, detectors, alerts" not in form.text
        assert httpx.get(f"{server.url}/admin/dashboard/data").status_code == 401
        with AdminClient(server.url, ADMIN_TOKEN) as admin:
            for name, account, images in senders:
                key = admin.create_key(name, account=account)
                for start in range(0, len(images), 20):
                    httpx.post(
                        f"{server.url}/v1/predict",
                        content=encode_npy(images[start : start + 20]),
                        headers={"Authorization": f"Bearer {key}", "Content-Type": NPY_MEDIA_TYPE},
                    ).raise_for_status()
            assert admin.wait_for_log(280)
            alerts = admin.alerts()
        fired = {(a["level"], a["client"], a["detector"]): a["query_count"] for a in alerts}
        browser = chrome()
        try:
            log_in(browser, server.url)
            assert browser.get_cookie("mlaas_session")["value"] != ADMIN_TOKEN  # a session id
            clients = wait_for(browser, lambda b: "thief" in b.find_element(By.ID, "clients").text
                               and b.find_element(By.ID, "clients").text)  # fmt: skip
            thief_row = next(line for line in clients.splitlines() if line.startswith("thief"))
            assert "160" in thief_row and "ood-binary" in thief_row
            shopper_row = next(line for line in clients.splitlines() if line.startswith("shopper"))
            assert "40" in shopper_row and "ood-binary" not in shopper_row
            alerts = browser.find_element(By.ID, "alerts").text
            assert "thief" in alerts and "ood-binary" in alerts and "shopper" not in alerts

            # Why and when: each detector's statistic against its threshold, the alert marked.
            Select(browser.find_element(By.ID, "client")).select_by_value("thief")
            wait_for(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, "#images img")) == 16)
            wait_for(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, "svg.chart")) == 2)
            ood = chart(browser, "key", "ood-binary")
            for part in ("polyline.statistic", "line.threshold", "line.alert-marker"):
                assert ood.find_elements(By.CSS_SELECTOR, part), part
            at = fired[("key", "thief", "ood-binary")]
            assert f"alert at query {at}" in ood.text and "alarms >" in ood.text
            prada = chart(browser, "key", "prada")  # W at its tests, over 100 distances
            for part in ("polyline.statistic", "circle", "line.threshold"):
                assert prada.find_elements(By.CSS_SELECTOR, part), part
            assert "alarms <" in prada.text
            assert chart(browser, "account", "ood-binary") is None  # a key alone
            browser.find_element(By.ID, "filter").send_keys("thief\n")
            wait_for(browser, lambda b: "thief" in b.find_element(By.ID, "queries").text)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))

            # A key of a shared account: its own charts, and its account's.
            Select(browser.find_element(By.ID, "client")).select_by_value("acme-2")
            wait_for(browser, lambda b: chart(b, "account", "ood-binary"))
            account = chart(browser, "account", "ood-binary")
            at = fired[("account", "acme-1", "ood-binary")]  # acme-1 sent first
            assert account.find_elements(By.CSS_SELECTOR, "line.alert-marker")
            assert f"alert at query {at}" in account.text
            assert chart(browser, "key", "ood-binary") is not None
            assert "account acme" in browser.find_element(By.ID, "charts").text
            browser.save_screenshot(str(ARTIFACTS / "dashboard-account.png"))

            # A session ended elsewhere: the page's next refresh is refused, it shows the form.
            session = {"Cookie": f"mlaas_session={browser.get_cookie('mlaas_session')['value']}"}
            httpx.post(f"{server.url}/dashboard/logout", headers=session)
            wait_for(browser, lambda b: b.find_elements(By.ID, "token"))
            # The logout button ends the session and the cookie.
            log_in(browser, server.url)
            browser.find_element(By.ID, "logout").click()
            wait_for(browser, lambda b: b.find_elements(By.ID, "token"))
            assert browser.get_cookie("mlaas_session") is None
            refused = httpx.get(f"{server.url}/admin/dashboard/data", headers=session)
            assert refused.status_code == 401
        finally:
            browser.quit()
