"""The page, the drawing pad and the review screen in a real headless Chromium.

Debian's chromium and chromium-driver, driven by selenium through /usr/bin/chromedriver
(selenium-manager never downloads anything). Skipped, with the reason, where they are
missing. `DIGITWATCH_SCREENSHOT=docs/serve.png` also saves the page after the drawing test
(how docs/serve.png is made).
"""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import digit_png
from serve_helpers import ServeProcess

from digitwatch import review
from digitwatch.results import Record

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(
        "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.actions import interaction  # noqa: E402
from selenium.webdriver.common.actions.action_builder import ActionBuilder  # noqa: E402
from selenium.webdriver.common.actions.pointer_input import PointerInput  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

TOKEN = "browser-test-token"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    root = tmp_path_factory.mktemp("browser")
    inbox, outbox = root / "inbox", root / "outbox"
    inbox.mkdir()
    outbox.mkdir()
    s = ServeProcess(inbox, outbox, "--token", TOKEN)
    try:
        yield s.wait_serving()
    finally:
        assert s.stop() == 0, s.log.read_text()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=900,800",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=str(CHROMEDRIVER))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(driver: WebDriver, what: str, condition: object, seconds: float = 20) -> None:
    WebDriverWait(driver, seconds).until(condition, f"timed out waiting for {what}")  # type: ignore[arg-type]


def _answered(driver: WebDriver) -> str:
    _wait(
        driver,
        "the answer",
        lambda d: (
            d.find_element(By.TAG_NAME, "body").get_attribute("data-state")
            in ("answered", "failed")
        ),
    )
    error = driver.find_element(By.ID, "error")
    assert not error.is_displayed(), error.text
    return str(driver.find_element(By.ID, "digit").text)


def _bar_width(driver: WebDriver, digit: int) -> float:
    fill = driver.find_element(By.ID, f"p{digit}")
    return float(fill.get_attribute("style").split("width:")[1].split("%")[0])


def _seen_size(driver: WebDriver) -> tuple[int, int]:
    seen = driver.find_element(By.ID, "seen")
    assert seen.is_displayed()
    w = driver.execute_script("return arguments[0].naturalWidth", seen)
    h = driver.execute_script("return arguments[0].naturalHeight", seen)
    return int(w), int(h)


def _reset(driver: WebDriver) -> None:
    driver.execute_script("document.body.dataset.state = 'asking'")


def test_an_uploaded_image_is_read_and_shown(
    server: ServeProcess, browser: WebDriver, tmp_path: Path
) -> None:
    browser.get(server.url + "/")
    image = tmp_path / "seven.png"
    image.write_bytes(digit_png(1, size=120))
    browser.find_element(By.ID, "file").send_keys(str(image))
    assert _answered(browser) == "7"
    confidence = browser.find_element(By.ID, "confidence").text
    assert confidence.endswith("%") and float(confidence.split()[0]) > 50
    assert _bar_width(browser, 7) > 50 and _bar_width(browser, 3) < 10
    assert _seen_size(browser) == (28, 28)
    assert "seven.png" in browser.find_element(By.ID, "input").text


def _stroke(driver: WebDriver, pad: WebElement, points: list[tuple[int, int]]) -> None:
    """One mouse stroke through `points` (offsets from the pad's centre)."""
    chain = ActionChains(driver)
    chain.move_to_element_with_offset(pad, *points[0]).click_and_hold()
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        for i in range(1, 6):
            chain.move_by_offset(
                (x1 - x0) // 5 if i < 5 else x1 - x0 - 4 * ((x1 - x0) // 5),
                (y1 - y0) // 5 if i < 5 else y1 - y0 - 4 * ((y1 - y0) // 5),
            )
    chain.release().perform()


def test_a_digit_drawn_with_the_mouse_or_a_finger_is_read(
    server: ServeProcess, browser: WebDriver
) -> None:
    browser.get(server.url + "/")
    pad = browser.find_element(By.ID, "pad")
    _reset(browser)
    _stroke(browser, pad, [(0, -95), (0, 95)])  # a 1
    assert _answered(browser) == "1"
    assert _seen_size(browser) == (28, 28)

    browser.find_element(By.ID, "clear").click()
    _reset(browser)
    # A finger: touch pointer events, drawing a 7.
    finger = PointerInput(interaction.POINTER_TOUCH, "finger")
    actions = ActionBuilder(browser, mouse=finger)
    box = pad.rect
    left, top = box["x"], box["y"]
    path = [(70, 55), (210, 55), (120, 235)]
    actions.pointer_action.move_to_location(int(left + path[0][0]), int(top + path[0][1]))
    actions.pointer_action.pointer_down()
    for (x0, y0), (x1, y1) in zip(path, path[1:], strict=False):
        for i in range(1, 11):
            x, y = x0 + (x1 - x0) * i / 10, y0 + (y1 - y0) * i / 10
            actions.pointer_action.move_to_location(int(left + x), int(top + y))
    actions.pointer_action.pointer_up()
    actions.perform()
    assert _answered(browser) == "7"
    shot = os.environ.get("DIGITWATCH_SCREENSHOT")
    if shot:
        browser.save_screenshot(shot)


def _record(name: str, digit: int | None, conf: float | None) -> Record:
    status = "ok" if digit is not None else "no_digit"
    when = "2026-12-03T06:00:00+00:00"
    sha = "ab" * 32
    return Record(name, sha, status, digit, conf, True, None, None, "m", 28, 28, 1.0, when, when)


def test_a_review_item_is_corrected_and_leaves_the_queue(
    server: ServeProcess, browser: WebDriver
) -> None:
    outbox = Path(str(server.proc.args[server.proc.args.index("--outbox") + 1]))  # type: ignore[union-attr]
    folder = outbox / "review"
    for item_id, digit in (("doubt1", 7), ("doubt2", None)):
        src = outbox.parent / f"{item_id}.png"
        src.write_bytes(digit_png(1, size=64))
        assert review.add(
            folder, item_id, _record(f"{item_id}.png", digit, 0.51), src, digit_png(1)
        )

    browser.get(server.url + "/review")
    _wait(
        browser,
        "the queue",
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "loaded",
    )
    rows = browser.find_elements(By.CSS_SELECTOR, "#items tr")
    assert {r.get_attribute("data-id") for r in rows} == {"doubt1", "doubt2"}
    row = browser.find_element(By.CSS_SELECTOR, "tr[data-id=doubt1]")
    assert "7 (51.0 %)" in row.find_element(By.CLASS_NAME, "guess").text
    images = row.find_elements(By.TAG_NAME, "img")
    assert all(browser.execute_script("return arguments[0].naturalWidth", i) > 0 for i in images)

    # Without the token the server refuses, and the page says so.
    row.find_element(By.CLASS_NAME, "correct-3").click()
    _wait(browser, "the refusal", lambda d: d.find_element(By.ID, "message").is_displayed())
    assert "401" in browser.find_element(By.ID, "message").text
    assert (folder / "doubt1").is_dir()

    browser.find_element(By.ID, "token").send_keys(TOKEN)
    row.find_element(By.CLASS_NAME, "correct-3").click()
    _wait(
        browser,
        "the row to leave",
        lambda d: not d.find_elements(By.CSS_SELECTOR, "tr[data-id=doubt1]"),
    )
    with (folder / review.LABELS).open(newline="") as f:
        rows_csv = {r["input"]: r for r in csv.DictReader(f)}
    assert rows_csv["doubt1.png"]["human_digit"] == "3"
    assert rows_csv["doubt1.png"]["model_digit"] == "7"

    browser.refresh()  # the token stays in this tab (sessionStorage), and doubt1 is gone
    _wait(
        browser,
        "the queue",
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "loaded",
    )
    assert [
        r.get_attribute("data-id") for r in browser.find_elements(By.CSS_SELECTOR, "#items tr")
    ] == ["doubt2"]
    browser.find_element(By.CSS_SELECTOR, "tr[data-id=doubt2] .reject").click()
    _wait(browser, "the empty queue", lambda d: d.find_element(By.ID, "empty").is_displayed())
