"""The web page of snapfusion serve in a real browser: headless Chromium (Debian's chromium and chromium-driver)
against a live server on 127.0.0.1 with a tiny model. Skipped where Chromium is absent, except under CI=true."""

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def _require_browser():
    """Selenium, Chromium and its driver, or a skip (a failure under CI=true, where .ci/run installs them)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium")
    if missing:
        message = f"the browser test needs {', '.join(missing)} (apt-get install chromium chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def browser(width: int = 1280, height: int = 900):
    """Headless Chromium through the system's chromedriver (nothing is downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def drive_page(url: str, prompt: str, *, size: str, seed: int | None = None, screenshot: Path | None = None,
               timeout: float = 120.0) -> dict:
    """Open the page, type ``prompt``, press Generate, wait for the image; its decoded size and what the page shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver = browser()
    try:
        driver.get(url)
        driver.find_element(By.ID, "prompt").send_keys(prompt)
        Select(driver.find_element(By.ID, "size")).select_by_visible_text(size)
        if seed is not None:
            driver.find_element(By.ID, "seed").send_keys(str(seed))
        driver.find_element(By.ID, "generate").click()
        busy = driver.execute_script("return !document.getElementById('progress').hidden")
        WebDriverWait(driver, timeout, poll_frequency=0.1).until(
            lambda d: d.execute_script("const i = document.querySelector('img.result-image');"
                                       "return i !== null && i.complete && i.naturalWidth > 0"))
        image = driver.execute_script(
            "const i = document.querySelector('img.result-image');"
            "return {w: i.naturalWidth, h: i.naturalHeight, src: i.src.slice(0, 22), alt: i.alt,"
            " caption: i.parentElement.querySelector('figcaption').innerText,"
            " download: i.parentElement.querySelector('a[download]').getAttribute('download'),"
            " status: document.getElementById('status').innerText,"
            " progress_hidden: document.getElementById('progress').hidden}")
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(screenshot))
        driver.refresh()  # the last results stay on the page
        WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "img.result-image"))
        image["kept_after_reload"] = len(driver.find_elements(By.CSS_SELECTOR, "img.result-image"))
        image["busy_while_running"] = busy
        return image
    finally:
        driver.quit()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def live_server(tiny_pipeline):
    """uvicorn on 127.0.0.1 in a thread, serving the tiny pipeline."""
    _require_browser()
    import uvicorn

    from snapfusion.serve.app import create_app
    from snapfusion.serve.engine import Engine

    class Paced:  # the tiny pipeline, taking a second per call so that the page's progress state can be seen
        def __getattr__(self, name):
            return getattr(tiny_pipeline, name)

        def generate(self, *args, **kwargs):
            time.sleep(1.0)
            return tiny_pipeline.generate(*args, **kwargs)

    engine = Engine({"tiny": Paced}, "tiny")
    engine.load("tiny")
    engine.start()
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, timeout=60), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/", engine
    server.should_exit = True
    thread.join(10)
    engine.stop()


def test_page_generates_an_image_in_headless_chromium(live_server, tmp_path):
    url, engine = live_server
    shot = tmp_path / "serve_page.png"
    shown = drive_page(url, "a red apple to the left of a cat", size="256x256", seed=42, screenshot=shot)
    assert (shown["w"], shown["h"]) == (256, 256)  # decoded by the browser at the requested size
    assert shown["src"] == "data:image/png;base64,"
    assert shown["alt"] == "a red apple to the left of a cat"
    assert "seed 42" in shown["caption"] and "tiny, 256x256, 4 steps" in shown["caption"]
    assert "UNet" in shown["caption"] and shown["download"] == "snapfusion_42.png"
    assert shown["status"].startswith("Done in") and shown["progress_hidden"] is True
    assert shown["busy_while_running"] is True
    assert shown["kept_after_reload"] == 1
    assert engine.counts["images"] == 1
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size[0] >= 1000 and im.getextrema() != ((255, 255),) * 3  # a real, non-blank screenshot


def test_a_missing_browser_skips_locally_but_fails_under_ci(monkeypatch):
    import sys

    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", "/nonexistent/chromium")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="chromium"):
        _require_browser()
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        _require_browser()
