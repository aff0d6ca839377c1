"""The labelling page in a real headless browser: Debian's chromium driven by selenium through chromium-driver
(scripts/setup.sh installs both). The test reads the page the way a person does (thumbnails, the highlighted
prediction, the counts) and presses keys; every step waits on a DOM condition, never on time, and checks the
files on disk."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgecv.tools.dataset_layout import JUNK, LABELS_LOG, UNLABELLED
from edgecv.tools.label.server import LabelServer
from edgecv.tools.label.store import LabelStore
from tests.tools.conftest import CollectedDataset

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Flags that work here as root and offline.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,900")
WAIT = 60.0  # seconds; the two CI cores are shared, so be generous: conditions end the waits, not the clock


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: install the Debian packages chromium and chromium-driver "
                    "(scripts/setup.sh does)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[dev]' (scripts/setup.sh does)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The labelling page as a person sees it, plus `settled()`: no request in flight."""

    def __init__(self, driver: Any) -> None:
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        self._actions = ActionChains
        self._wait = WebDriverWait(driver, WAIT, poll_frequency=0.05)

    def js(self, script: str) -> Any:
        return self.driver.execute_script(script)

    def wait(self, condition: Callable[[], Any], what: str) -> None:
        self._wait.until(lambda _: condition(), message=f"timed out waiting for {what}")

    def open(self, url: str) -> None:
        self.driver.get(url)
        self.wait(lambda: self.js("return document.body.dataset.ready") == "1", "the page to load its state")
        self.settled()

    def settled(self) -> None:
        self.wait(lambda: self.js("return document.body.dataset.pending") == "0", "the page's requests to finish")

    def keys(self, *keys: str) -> None:
        self._actions(self.driver).send_keys(*keys).perform()

    def ctrl(self, key: str) -> None:
        from selenium.webdriver.common.keys import Keys

        self._actions(self.driver).key_down(Keys.CONTROL).send_keys(key).key_up(Keys.CONTROL).perform()

    def images_loaded(self) -> bool:
        return bool(self.js("return [...document.querySelectorAll('#queue img, #current')]"
                            ".every(i => i.hidden || (i.complete && i.naturalWidth > 0))"))

    def queue(self) -> list[str]:
        return list(self.js("return [...document.querySelectorAll('#queue figure')].map(f => f.dataset.name)"))

    def current(self) -> str:
        return str(self.js("return document.getElementById('current').dataset.name"))

    def left(self) -> str:
        return str(self.js("return document.getElementById('left').textContent"))

    def classes(self) -> dict[str, dict[str, str]]:
        """name -> {key, count, selected, predicted} as shown in the class list."""
        rows = self.js("""return [...document.querySelectorAll('#classes li')].map(li => ({
            name: li.dataset.class, key: li.querySelector('kbd').textContent,
            count: li.querySelector('.count').textContent, selected: li.dataset.selected,
            predicted: li.dataset.predicted}))""")
        return {r["name"]: r for r in rows}

    def selected(self) -> str | None:
        return next((n for n, r in self.classes().items() if r["selected"] == "1"), None)

    def counts(self) -> dict[str, int]:
        shown = {n: int(r["count"]) for n, r in self.classes().items()}
        shown[JUNK] = int(self.js("return document.getElementById('junk-count').textContent"))
        return shown

    def status(self) -> str:
        return str(self.js("return document.getElementById('status').textContent"))


def images(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".jpg") if folder.is_dir() else []


def test_label_with_the_keyboard_add_a_class_and_undo_across_a_reload(browser: Any,
                                                                      collected: CollectedDataset) -> None:
    from selenium.webdriver.common.keys import Keys

    root = collected.root
    server = LabelServer(LabelStore(root), port=0).start()
    try:
        page = Page(browser)
        page.open(server.url)

        # thumbnails of every waiting sample, oldest first, all decoded; the first one is current
        page.wait(page.images_loaded, "the thumbnails and the current image to load")
        assert page.queue() == [f"{i}.jpg" for i in collected.ids]
        assert page.current() == "s00.jpg"
        assert page.left() == "6 of 6 left"
        shown = page.classes()
        assert [(n, r["key"]) for n, r in shown.items()] == [("circle", "1"), ("square", "2"), ("triangle", "3")]
        # the prediction (circle) is preselected and marked
        assert page.selected() == "circle" and shown["circle"]["predicted"] == "1"
        assert page.counts() == {"circle": 2, "square": 0, "triangle": 0, JUNK: 0}

        # Enter accepts the preselected label
        page.keys(Keys.ENTER)
        page.settled()
        page.wait(lambda: page.left() == "5 of 6 left", "5 left")
        assert images(root / "circle") == ["s00.jpg"] and (root / "circle" / "s00.json").is_file()
        assert page.counts()["circle"] == 3

        # s01 is predicted square; ↓ highlights the next class, Enter takes it
        assert page.current() == "s01.jpg" and page.selected() == "square"
        page.keys(Keys.ARROW_DOWN)
        assert page.selected() == "triangle"
        page.keys(Keys.ENTER)
        page.settled()
        assert images(root / "triangle") == ["s01.jpg"]

        # x sends s02 to junk, s skips s03 to the end of the queue
        page.keys("x")
        page.settled()
        page.wait(lambda: page.counts()[JUNK] == 1, "the junk count to show 1")
        assert images(root / JUNK) == ["s02.jpg"]
        assert page.current() == "s03.jpg"
        page.keys("s")
        assert page.current() == "s04.jpg" and page.queue() == ["s04.jpg", "s05.jpg", "s03.jpg"]

        # n opens the new-class field; the new class gets the next key and the highlight
        page.keys("n")
        page.wait(lambda: page.js("return document.activeElement.id") == "new-class", "the new-class field")
        page.keys("hexagon", Keys.ENTER)
        page.settled()
        page.wait(lambda: "hexagon" in page.classes(), "the new class row")
        assert (root / "hexagon").is_dir()
        assert page.classes()["hexagon"]["key"] == "4" and page.selected() == "hexagon"
        page.keys("4")
        page.settled()
        assert images(root / "hexagon") == ["s04.jpg"]
        assert page.counts() == {"circle": 3, "square": 0, "triangle": 1, "hexagon": 1, JUNK: 1}
        assert page.left() == "2 of 6 left"

        # u takes back the last label: s04 is current again, with its prediction highlighted
        page.keys("u")
        page.settled()
        page.wait(lambda: page.current() == "s04.jpg", "s04 to come back")
        assert images(root / "hexagon") == [] and "s04.jpg" in images(root / UNLABELLED)
        assert page.selected() == "square" and page.counts()["hexagon"] == 0
        # Ctrl+Z takes back the new class
        page.ctrl("z")
        page.settled()
        page.wait(lambda: "hexagon" not in page.classes(), "the hexagon row to go")
        assert not (root / "hexagon").exists()

        # the undo history lives on the server: after a reload, undo goes on where it was
        page.open(server.url)
        page.wait(page.images_loaded, "the thumbnails after the reload")
        assert page.queue() == ["s03.jpg", "s04.jpg", "s05.jpg"]
        page.keys("u")
        page.settled()
        page.wait(lambda: page.current() == "s02.jpg", "s02 back from junk")
        assert images(root / JUNK) == [] and page.counts()[JUNK] == 0
        page.keys("u")
        page.settled()
        page.wait(lambda: page.current() == "s01.jpg", "s01 back from triangle")
        assert not (root / "triangle").exists()  # its first image made the folder, so undo removed it
        assert page.selected() == "square"
        page.wait(page.images_loaded, "the restored samples' images")

        # what the page shows is what is on disk
        assert page.left() == "5 of 6 left"
        assert page.counts() == {"circle": 3, "square": 0, "triangle": 0, JUNK: 0}
        assert images(root / UNLABELLED) == [f"{i}.jpg" for i in collected.ids[1:]]
        assert images(root / "circle") == ["s00.jpg"]
        assert "s01" in page.status()
        log = [json.loads(line) for line in (root / LABELS_LOG).read_text().splitlines()]
        assert [(e["op"], e.get("to") or e.get("name") or e.get("undoes")) for e in log] == [
            ("move", "circle"), ("move", "triangle"), ("move", JUNK), ("add_class", "hexagon"), ("move", "hexagon"),
            ("undo", 5), ("undo", 4), ("undo", 3), ("undo", 2)]
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []  # no script error, no CSP violation, no failed request
    finally:
        server.stop()


def test_clicks_and_a_refused_action_show_the_server_truth(browser: Any, collected: CollectedDataset) -> None:
    root = collected.root
    server = LabelServer(LabelStore(root), port=0).start()
    try:
        page = Page(browser)
        page.open(server.url)
        # someone else (a second tab, a shell) moves s00 away: the page's label is refused, it says so and
        # reloads the queue from the server
        shutil.move(root / UNLABELLED / "s00.jpg", root / "s00.jpg.bak")
        page.keys("2")
        page.settled()
        page.wait(lambda: "queue reloaded" in page.status(), "the refusal to be shown")
        assert "s00.jpg is not (or no longer) waiting" in page.status()
        assert page.js("return document.getElementById('status').classList.contains('error')")
        assert page.queue()[0] == "s01.jpg" and page.left() == "5 of 5 left"
        # clicking a thumbnail makes it current; clicking a class row labels it
        page.driver.find_element("css selector", '#queue figure[data-name="s03.jpg"]').click()
        assert page.current() == "s03.jpg" and page.selected() == "triangle"
        page.driver.find_element("css selector", '#classes li[data-class="triangle"]').click()
        page.settled()
        assert images(root / "triangle") == ["s03.jpg"]
        page.wait(lambda: page.counts()["triangle"] == 1, "the triangle count")
    finally:
        server.stop()
