"""Flower in a real browser: a headless Chromium logs in, finds a provisioning on the tasks page.

End to end with real processes: the session's taskmanager, a real Flower with basic auth, a
provisioning started through Flower's API, and the system's Chromium driven through the
system's chromedriver (Debian's `chromium` and `chromium-driver`, which `make test` installs: `make browser`).
Selenium Manager is never used: nothing is downloaded. The test fails, it does not skip, when
the browser is missing. It leaves a screenshot of the tasks page in tests/artifacts/ (ignored by
git); `make screenshot` runs it with BERTH_SCREENSHOT=docs/flower-tasks.png to refresh the picture
the README shows.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from berth.paths import PROJECT_DIR
from berth.records import Records, Status
from tests.helpers import FLOWER_AUTH, FlowerClient, basic_auth, wait_for_status, wait_until

pytestmark = pytest.mark.usefixtures("taskmanager")
AUTH = FLOWER_AUTH
PASSWORD = "Br0wser-Secret-Value-77"
SCREENSHOT = Path(os.environ.get("BERTH_SCREENSHOT") or PROJECT_DIR / "tests" / "artifacts" / "flower-tasks.png")
CHAIN_STEPS = ["taskmanager.create_queue", "taskmanager.ping_guest", "taskmanager.send_prepare",
               "taskmanager.verify"]


def system_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `make test` (or `make browser`) installs Debian's chromium and "
                    "chromium-driver (apt-get, as root or through sudo)", pytrace=False)
    return path


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium through the system chromedriver; quit whatever happens."""
    chromium, chromedriver = system_binary("chromium"), system_binary("chromedriver")
    # The driver's path is given, so Selenium Manager is skipped; offline all the same, should it run.
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,900",
                "--disable-dev-shm-usage", "--no-first-run", "--disable-extensions", "--disable-background-networking",
                "--disable-component-update", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    service = Service(executable_path=chromedriver, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()


def document_status(driver: Any, url: str) -> int | None:
    """The HTTP status the browser got for url, from its DevTools network log."""
    status = None
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.responseReceived":
            response = message["params"]["response"]
            if response["url"] == url:
                status = int(response["status"])
    return status


def task_rows(driver: Any) -> list[dict[str, str]]:
    """What the tasks table shows: per row its task id (the row's id), name and state."""
    rows = []
    try:
        for row in driver.find_elements(By.CSS_SELECTOR, "#tasks-table tbody tr"):
            badges = row.find_elements(By.CSS_SELECTOR, "span.badge")
            links = row.find_elements(By.CSS_SELECTOR, "td a")
            rows.append({"uuid": row.get_attribute("id") or "", "text": row.text,
                         "name": links[0].text if links else "", "state": badges[0].text if badges else ""})
    except StaleElementReferenceException:
        return []  # redrawn while read: read again
    return rows


def task_details(driver: Any, uuid: str) -> dict[str, str]:
    """A task's page as label -> text ({} until that task's page is shown)."""
    try:
        shown = driver.find_elements(By.ID, "taskid")
        if not shown or shown[0].get_attribute("textContent") != uuid:
            return {}
        return {row.find_element(By.TAG_NAME, "dt").text: row.find_element(By.TAG_NAME, "dd").text
                for row in driver.find_elements(By.CSS_SELECTOR, "#task-page div.detail-row")}
    except (StaleElementReferenceException, NoSuchElementException):
        return {}  # the page changed while read: read again


def search_tasks(driver: Any, query: str) -> None:
    box = wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, "#tasks-table_filter input"), 15,
                     message="the tasks page's search box")[0]
    box.clear()
    box.send_keys(query)


def test_a_provisioning_started_from_flower_shows_on_its_tasks_page_in_a_real_browser(
        flower: FlowerClient, browser: Any, new_id: Callable[[str], str], records: Records) -> None:
    started = time.monotonic()
    instance_id = new_id("web")
    reply = flower.call("/api/task/send-task/workflows.provision", {"args": [instance_id], "kwargs": {
        "datastore": "redis", "users": [{"name": "app", "password": PASSWORD}], "databases": ["app"]}})
    assert wait_for_status(records, instance_id, [Status.ACTIVE]).status is Status.ACTIVE

    # Without credentials Flower refuses the page: the browser gets 401 and no tasks table.
    browser.execute_cdp_cmd("Network.enable", {})
    assert flower.status_without_auth("/tasks") == 401
    browser.get(flower.base + "/tasks")
    assert document_status(browser, flower.base + "/tasks") == 401
    assert "tasks-table" not in browser.page_source

    # Logged in (basic auth on every request the page makes, its table's XHR included).
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": basic_auth()}})
    browser.get(flower.base + "/tasks")
    assert document_status(browser, flower.base + "/tasks") == 200
    search_tasks(browser, instance_id)

    def provisioning_shown() -> list[dict[str, str]]:
        rows = task_rows(browser)
        ours = [r for r in rows if instance_id in r["uuid"]]
        if any(r["name"] == "taskmanager.verify" and r["state"] == "SUCCESS" for r in ours) and \
                {r["name"] for r in ours} >= set(CHAIN_STEPS):
            return rows
        # Flower's task table does not refresh itself: ask it again, as a user would.
        browser.execute_script("$('#tasks-table').DataTable().ajax.reload(null, false)")
        return []

    rows = wait_until(provisioning_shown, 30, interval_s=0.3, message=f"{instance_id}'s steps on the tasks page")
    verify = next(r for r in rows if r["name"] == "taskmanager.verify" and instance_id in r["uuid"])
    assert verify["state"] == "SUCCESS" and verify["uuid"].startswith(f"{instance_id}.verify.")
    assert instance_id in verify["text"]
    # The search shows this instance's tasks only: its steps (the instance id in their task ids)
    # and the request itself (workflows.provision, its id the request id), found by its args.
    request = [r for r in rows if r["uuid"] == reply["task-id"]]
    assert request and request[0]["name"] == "workflows.provision" and request[0]["state"] == "SUCCESS"
    assert all(instance_id in r["uuid"] for r in rows if r is not request[0]), rows
    assert PASSWORD not in browser.page_source
    browser.execute_script("document.activeElement.blur()")  # no text cursor in the picture
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT))

    # A row opens its task: the verify step's args are the instance id, its result the ACTIVE summary.
    browser.find_element(By.ID, verify["uuid"]).find_element(By.CSS_SELECTOR, "a[href*='/task/']").click()
    details = wait_until(lambda: task_details(browser, verify["uuid"]), 15, message="verify's page")
    assert details["Name"] == "taskmanager.verify" and details["Status"] == "SUCCESS", details
    assert instance_id in details["Arguments"] and "'ACTIVE'" in details["Result"], details
    # The request's page shows its users with the password masked.
    browser.get(flower.base + "/task/" + reply["task-id"])
    details = wait_until(lambda: task_details(browser, reply["task-id"]), 15, message="the request's page")
    assert details["Name"] == "workflows.provision" and instance_id in details["Arguments"], details
    assert "'********'" in details["Keyword arguments"], details
    assert PASSWORD not in browser.page_source
    assert time.monotonic() - started < 60
