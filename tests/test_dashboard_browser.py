"""The dashboard in a real headless Chromium while a simulated fleet trains: the round
counter and the accuracy chart advance without a reload, and a screenshot is kept.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them) and selenium (the
dev extra), pointed at both so Selenium Manager never downloads a browser or a driver.
Skipped, saying why, only where the browser is absent.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from simulator.broker import free_port
from simulator.fleet import Simulation, SimulationConfig

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
# Generous: a shared 2-core CI box can stall the browser or the fleet for seconds.
WAIT_S = 90.0

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                       reason="the dashboard's browser test needs chromium and chromedriver "
                              "(apt-get install chromium chromium-driver; .ci/run does)"),
]


@pytest.fixture
def browser(monkeypatch):
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager: never a download
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,800", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-sync"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def artifact_dir(tmp_path: Path) -> Path:
    """$FEDMQ_TEST_ARTIFACTS (kept by CI) if set, else the test's temporary directory."""
    path = Path(os.environ.get("FEDMQ_TEST_ARTIFACTS") or tmp_path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_the_dashboard_follows_a_simulated_fleet_live(browser, tmp_path, capsys):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # Each device trains for its 0.4 s time budget (many epochs, a small learning rate):
    # rounds take about half a second on any machine, so the page, polling every second,
    # sees the counter move several times while accuracy climbs.
    rounds = 12
    config = SimulationConfig(devices=2, rounds=rounds, hidden=32, epochs=100, max_steps=0,
                              time_budget_s=0.4, lr=0.002, dashboard_port=free_port())
    with Simulation(config, workdir=tmp_path / "sim") as sim:
        browser.get(sim.aggregator.dashboard.url)
        seen: list[int] = []  # each number the round counter showed, in order

        def counter_advanced_twice(driver) -> bool:
            shown = driver.find_element(By.ID, "round").text
            if shown.isdigit() and (not seen or int(shown) != seen[-1]):
                seen.append(int(shown))
            return len(seen) >= 3

        def accuracy_points(driver) -> int:
            points = driver.find_element(By.ID, "chart-accuracy").get_attribute("data-points")
            return int(points or 0)

        WebDriverWait(browser, WAIT_S, poll_frequency=0.05).until(
            counter_advanced_twice, f"the round counter to advance twice (saw {seen})")
        assert seen == sorted(seen) and seen[-1] <= rounds
        WebDriverWait(browser, WAIT_S).until(lambda d: accuracy_points(d) >= 2,
                                             "two points on the accuracy chart")
        sim.wait()
        WebDriverWait(browser, WAIT_S).until(
            lambda d: d.find_element(By.ID, "status").text == "finished",
            "the page to show the run finished")
        assert browser.find_element(By.ID, "round").text == str(rounds)
        assert accuracy_points(browser) == rounds
        assert browser.find_element(By.ID, "online").text == "2 / 2"
        assert len(browser.find_elements(By.CSS_SELECTOR, "#devices tbody tr")) == 2
        shot = artifact_dir(tmp_path) / "dashboard.png"
        assert browser.save_screenshot(str(shot))
        with capsys.disabled():
            print(f"\ndashboard screenshot: {shot}")
        # no script error, no blocked resource (the Content-Security-Policy reports one)
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
