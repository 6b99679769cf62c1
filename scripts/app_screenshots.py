"""Screenshots of the app's two tabs, for the README (headless Debian Chromium on a running ``magdiff app``).

magdiff app --port 7861 &
python scripts/app_screenshots.py --url http://127.0.0.1:7861/ --out docs

Generate: the first example filled in and run (docs/app_generate.png). Edit: the tab selected by its button's text,
the first editing example's source video and masks uploaded (written by the library, as the app writes its examples)
with its prompt, run, and the page shot with the source and the result side by side (docs/app_edit.png).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_app import chromium_driver  # the tests' driver: same flags, fresh profile

TIMEOUT = 900.0  # a run of the default model on a loaded CPU


def _wait(condition: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(1.0)
    raise SystemExit(f"timed out waiting for {what}")


def _shown(elements: list) -> list:
    return [element for element in elements if element.is_displayed()]


def _select_tab(driver, name: str):
    """Click the tab whose button reads ``name`` (Gradio also renders a hidden overflow-menu button of that text,
    so the tab is the visible ``role=tab`` one) and return its panel once it is shown."""
    from selenium.webdriver.common.by import By

    tab = _wait(
        lambda: _shown(driver.find_elements(By.XPATH, f"//button[@role='tab' and normalize-space()='{name}']")),
        f"the {name} tab button",
    )[0]
    driver.execute_script("window.scrollTo(0, 0); arguments[0].click();", tab)
    _wait(lambda: tab.get_attribute("aria-selected") == "true", f"the {name} tab to be selected", 30)
    return _wait(lambda: _shown(driver.find_elements(By.CSS_SELECTOR, "[role=tabpanel]")), "the tab panel", 30)[0]


def _fields(panel, label: str, css: str) -> list:
    """The ``css`` elements of the component labelled ``label`` inside ``panel``: the block around the element
    that holds the label's text (not an Examples table's header of the same text)."""
    from selenium.webdriver.common.by import By

    text = f"normalize-space()={label!r}"
    holder = f".//*[{text}][not(*[{text}])][not(ancestor-or-self::table)]"
    block = "ancestor::*[contains(concat(' ', @class, ' '), ' block ')][1]"
    holders = panel.find_elements(By.XPATH, holder)
    return holders[0].find_element(By.XPATH, block).find_elements(By.CSS_SELECTOR, css) if holders else []


def _field(panel, label: str, css: str):
    found = _fields(panel, label, css)
    if not found:
        raise SystemExit(f"no {css} in the component labelled {label!r}: has the app's layout changed?")
    return found[0]


def _type(element, text: str) -> None:
    element.clear()
    element.send_keys(text)


def _video_shown(driver, css: str) -> bool:
    """The video element has a source and a decoded frame to show."""
    return bool(
        driver.execute_script(
            "const v = document.querySelector(arguments[0]); return v !== null && v.readyState >= 2;", css
        )
    )


def shoot_generate(driver, out: Path, steps: str, run: bool) -> Path:
    from selenium.webdriver.common.by import By

    panel = _select_tab(driver, "Generate")
    _wait(lambda: _shown(driver.find_elements(By.ID, "generate-button")), "the Generate button")
    driver.find_element(By.XPATH, "//td[contains(., 'moving left on a purple')]").click()  # the first example
    _type(_field(panel, "Steps", "input"), steps)
    time.sleep(5)
    if run:
        driver.find_element(By.ID, "generate-button").click()
        _wait(lambda: _video_shown(driver, "#generate-result video"), "the generated video")
        time.sleep(2)
    path = out / "app_generate.png"
    driver.save_screenshot(str(path))
    return path


def shoot_edit(driver, out: Path, steps: str, run: bool) -> Path:
    from selenium.webdriver.common.by import By

    from magdiff.app import write_examples

    _, editing = write_examples(tempfile.mkdtemp(prefix="magdiff_screenshot_"))
    source, masks, prompt = editing[0]  # the first editing example, uploaded as a user uploads it
    panel = _select_tab(driver, "Edit")
    _wait(lambda: _shown(driver.find_elements(By.ID, "edit-button")), "the Edit button")
    _field(panel, "Source video (mp4, gif, ...)", "input[type=file]").send_keys(source)
    _field(panel, "Masks (optional mask video; segmented when absent)", "input[type=file]").send_keys(masks)
    _type(_field(panel, "Prompt", "textarea"), prompt)
    _type(_field(panel, "Steps", "input"), steps)
    _wait(lambda: _shown(_fields(panel, "Masks over the frames", "img")), "the masks over the frames", 120)
    time.sleep(2)
    if run:
        driver.find_element(By.ID, "edit-button").click()
        _wait(lambda: _video_shown(driver, "#edit-result video"), "the edited video")
        time.sleep(2)
    # the source and the result sit below the inputs: a window as tall as the page shows the tab whole
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(driver.get_window_size()["width"], height + 120)
    driver.execute_script("window.scrollTo(0, 0);")
    time.sleep(2)
    path = out / "app_edit.png"
    driver.save_screenshot(str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:7861/")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--steps", default="25")
    parser.add_argument("--tabs", nargs="+", choices=["generate", "edit"], default=["generate", "edit"])
    parser.add_argument("--no-run", action="store_true", help="the tabs with an example's inputs, not run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shots = {"generate": shoot_generate, "edit": shoot_edit}
    for name in args.tabs:
        driver = chromium_driver(1400, 1000)  # a fresh page per tab: each shot starts from the app as loaded
        try:
            driver.get(args.url)
            print(shots[name](driver, out, args.steps, not args.no_run))
        finally:
            driver.quit()


if __name__ == "__main__":
    main()
