"""Screenshots of the app's two tabs, for the README (headless Debian Chromium on a running ``magdiff app``).

magdiff app --port 7861 &
python scripts/app_screenshots.py --url http://127.0.0.1:7861/ --out docs
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_app import chromium_driver  # the tests' driver: same flags, fresh profile


def _wait(driver, css: str, timeout: float = 600.0):
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = driver.find_elements(By.CSS_SELECTOR, css)
        if found:
            return found
        time.sleep(1.0)
    raise SystemExit(f"timed out waiting for {css}")


def main() -> None:
    from selenium.webdriver.common.by import By

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:7861/")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--steps", default="25")
    parser.add_argument("--no-run", action="store_true", help="the tabs with an example's inputs, not run")
    args = parser.parse_args()
    driver = chromium_driver(1400, 1000)
    try:
        driver.get(args.url)
        _wait(driver, "#generate-button")
        driver.find_element(By.XPATH, "//td[contains(., 'moving left on a purple')]").click()  # the first example
        steps = driver.find_element(By.CSS_SELECTOR, "#generate-steps input")
        steps.clear()
        steps.send_keys(args.steps)
        time.sleep(5)
        if not args.no_run:
            driver.find_element(By.ID, "generate-button").click()
            _wait(driver, "#generate-result video[src]")
            time.sleep(2)
        driver.save_screenshot(str(Path(args.out) / "app_generate.png"))
        tab = driver.find_element(By.XPATH, "//button[normalize-space()='Edit']")
        driver.execute_script("window.scrollTo(0, 0); arguments[0].click();", tab)
        time.sleep(1)
        cells = driver.find_elements(By.XPATH, "//td[contains(., 'background')]")
        cell = next(cell for cell in cells if cell.is_displayed())  # the first editing example
        driver.execute_script("arguments[0].click();", cell)
        time.sleep(5)
        if not args.no_run:
            driver.find_element(By.ID, "edit-button").click()
            _wait(driver, "#edit-result video[src]")
            time.sleep(2)
        driver.save_screenshot(str(Path(args.out) / "app_edit.png"))
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
