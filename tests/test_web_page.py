"""The web chat page end to end in headless Chromium (Debian's chromium + chromium-driver, via selenium)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.api_live import KEY_A, LiveServer, live_api, tiny_worker

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).parent / "artifacts"
INSTALL = "apt-get install -y chromium chromium-driver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
         "--window-size=1100,800"]


@pytest.fixture(scope="module")
def server(redis_url: str) -> Iterator[LiveServer]:
    # queue_without_workers: the page also shows a turn waiting for a model no worker serves yet
    with tiny_worker(redis_url), live_api(redis_url, queue_without_workers=True) as s:
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"headless Chromium is needed for this test: {', '.join(missing)} missing; run: {INSTALL}")
    os.environ["SE_OFFLINE"] = "true"  # selenium must not try to fetch a driver or a browser
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def models(d: WebDriver) -> list[str]:
    return [o.get_attribute("value") or "" for o in Select(d.find_element(By.ID, "model")).options]


def status(d: WebDriver) -> str:
    return d.find_element(By.ID, "status").text


def send(d: WebDriver, text: str) -> None:
    d.find_element(By.ID, "input").send_keys(text)
    d.find_element(By.ID, "send").click()


def done_replies(d: WebDriver) -> list[str]:
    boxes = d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-state='done'] .text")
    return [b.get_attribute("textContent") or "" for b in boxes]


def test_page_streams_a_reply(server: LiveServer, browser: WebDriver) -> None:
    d = browser
    d.get(server.url + "/")
    wait = WebDriverWait(d, 30)
    key = d.find_element(By.ID, "apikey")
    wait.until(lambda _: key.is_displayed())  # auth is on: the page asks for a key
    assert "API key" in status(d) and models(d) == []
    key.send_keys(KEY_A)
    d.execute_script("document.getElementById('apikey').dispatchEvent(new Event('change'))")
    wait.until(lambda _: "tiny-neox" in models(d))
    assert Select(d.find_element(By.ID, "model")).first_selected_option.get_attribute("value") == "tiny-neox"

    d.find_element(By.ID, "max-tokens").send_keys("24")
    d.find_element(By.ID, "system").send_keys("Be brief.")
    send(d, "Hello from the browser")
    wait.until(lambda _: len(done_replies(d)) == 1)
    assert done_replies(d)[0], "the streamed reply is empty"
    assert d.find_element(By.CSS_SELECTOR, ".msg.user .text").text == "Hello from the browser"
    assert status(d).startswith("Done: length, 24 tokens"), status(d)
    ARTIFACTS.mkdir(exist_ok=True)
    d.save_screenshot(str(ARTIFACTS / "web_chat.png"))

    send(d, "And again")  # the same conversation goes on
    wait.until(lambda _: len(done_replies(d)) == 2)
    d.find_element(By.ID, "new").click()
    assert d.find_elements(By.CSS_SELECTOR, ".msg") == []
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_page_shows_queue_position_while_waiting(server: LiveServer, browser: WebDriver) -> None:
    d = browser
    d.get(server.url + "/")
    wait = WebDriverWait(d, 30)
    wait.until(lambda _: "smollm2-135m" in models(d))  # the key is remembered
    Select(d.find_element(By.ID, "model")).select_by_value("smollm2-135m")  # no worker serves it here
    send(d, "Anyone there?")
    wait.until(lambda _: "Waiting in the queue: position 1" in status(d))
    assert d.find_element(By.ID, "stop").is_enabled()
    d.find_element(By.ID, "new").click()
    wait.until(lambda _: d.find_element(By.ID, "send").is_enabled())
