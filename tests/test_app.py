"""``magdiff app``: the Gradio app on a tiny saved model, through its API (``gradio_client``) and in headless Chromium.

The browser tests drive Debian's ``chromium`` with its ``chromedriver`` (``.ci/run`` installs them when missing) and
are skipped where neither is installed."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

pytest.importorskip("gradio")
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
PROMPT = "a cat moving left on a red background"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _frames_of(path: str) -> int:
    import av

    with av.open(path) as container:
        return sum(1 for _ in container.decode(video=0))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("app_inputs")
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[4:12, 4:12, 3] = 255
    PIL.Image.fromarray(rgba, "RGBA").save(folder / "subject.png")
    PIL.Image.fromarray(np.full((10, 10), 255, dtype=np.uint8)).save(folder / "small_mask.png")
    return folder


@pytest.fixture(scope="module")
def server(saved_tiny_model, tmp_path_factory):
    """The app on the tiny model, served on a free local port for the module's tests."""
    from magdiff.app import build_app
    from magdiff.loading import load_pipeline

    pipeline = load_pipeline(str(saved_tiny_model), device="cpu")
    pipeline.set_progress_bar_config(disable=True)
    demo = build_app(pipeline, tmp_path_factory.mktemp("app"))
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, ssr_mode=False, quiet=True)
    yield {"url": f"http://127.0.0.1:{port}/", "pipeline": pipeline}
    demo.close()


def test_the_app_loads_no_model_at_import():
    import subprocess
    import sys

    code = "import sys, magdiff.app, magdiff.cli; print('gradio' in sys.modules, 'diffusers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_generate_through_the_api_gives_a_video_of_the_asked_length(server, files):
    from gradio_client import Client, handle_file

    client = Client(server["url"], verbose=False)
    inputs = [handle_file(str(files / "subject.png")), None, PROMPT, "", 6, 2, 7.5, 0, "auto", ""]
    cutout, video = client.predict(*inputs, api_name="/generate")
    assert _frames_of(video["video"] if isinstance(video, dict) else video) == 6
    assert np.asarray(PIL.Image.open(cutout)).shape[:2] == (16, 16)


def test_two_users_at_once_both_get_their_results(server, files):
    from gradio_client import Client, handle_file

    client = Client(server["url"], verbose=False)
    jobs = [
        client.submit(
            handle_file(str(files / "subject.png")),
            None,
            PROMPT,
            "",
            frames,
            2,
            7.5,
            1,
            "off",
            "",
            api_name="/generate",
        )
        for frames in (3, 5)
    ]
    results = [job.result(timeout=300) for job in jobs]
    lengths = [_frames_of(video["video"] if isinstance(video, dict) else video) for _, video in results]
    assert lengths == [3, 5]


def test_a_bad_upload_is_the_clis_message_and_the_app_keeps_serving(server, files):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(server["url"], verbose=False)
    subject, small = handle_file(str(files / "subject.png")), handle_file(str(files / "small_mask.png"))
    with pytest.raises(AppError, match=r"10x10.*16x16"):
        client.predict(subject, small, PROMPT, "", 4, 1, 7.5, 0, "auto", "", api_name="/generate")
    with pytest.raises(AppError, match=r"--trajectory"):
        client.predict(subject, None, PROMPT, "", 4, 1, 7.5, 0, "path", "[[0, 0], [1,", api_name="/generate")
    _, video = client.predict(subject, None, PROMPT, "", 2, 1, 7.5, 0, "auto", "", api_name="/generate")
    assert _frames_of(video["video"] if isinstance(video, dict) else video) == 2


def test_edit_through_the_api_keeps_the_source_length(server, tmp_path):
    import torch
    from gradio_client import Client, handle_file

    from magdiff.media import save_video

    frames = torch.full((5, 3, 16, 16), -0.6)
    masks = torch.zeros(5, 1, 16, 16)
    masks[:, :, 4:12, 4:12] = 1
    frames[:, 0:1][masks.bool()] = 0.8
    source = save_video(frames, tmp_path / "source.mp4")
    mask_video = save_video(masks, tmp_path / "masks.gif")
    client = Client(server["url"], verbose=False)
    overlay, shown, edited = client.predict(
        handle_file(str(source)),
        handle_file(str(mask_video)),
        "a cat on a blue background",
        "subject",
        False,
        2,
        7.5,
        0,
        api_name="/edit",
    )
    assert _frames_of(edited["video"] if isinstance(edited, dict) else edited) == 5
    assert _frames_of(shown["video"] if isinstance(shown, dict) else shown) == 5
    assert np.asarray(PIL.Image.open(overlay)).shape[0] == 16


# ---------------------------------------------------------------------- a real browser


def chromium_driver(width: int = 1400, height: int = 1000):
    """Headless Debian Chromium through its chromedriver, with a fresh profile and no background traffic."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='magdiff_chromium_')}")
    options.add_argument(f"--window-size={width},{height}")
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


needs_chromium = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists() and shutil.which("chromedriver")),
    reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them)",
)


def _wait(condition, timeout: float = 240.0, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
@needs_chromium
def test_in_a_browser_generate_shows_a_video_of_the_asked_length_and_a_bad_upload_its_error(server, files, tmp_path):
    from selenium.webdriver.common.by import By

    driver = chromium_driver()
    try:
        driver.get(server["url"])
        _wait(lambda: driver.find_elements(By.ID, "generate-button"), what="the Generate button")
        uploads = driver.find_elements(By.CSS_SELECTOR, "input[type=file]")
        uploads[0].send_keys(str(files / "subject.png"))
        _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "img"), what="the subject preview")
        driver.find_element(By.CSS_SELECTOR, "#generate-prompt textarea").send_keys(PROMPT)
        frames = driver.find_element(By.CSS_SELECTOR, "#generate-frames input")
        frames.clear()
        frames.send_keys("6")
        steps = driver.find_element(By.CSS_SELECTOR, "#generate-steps input")
        steps.clear()
        steps.send_keys("2")
        driver.find_element(By.ID, "generate-button").click()
        video = _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#generate-result video[src]"), what="the video")
        source = video[0].get_attribute("src")
        path = tmp_path / "result.mp4"
        urllib.request.urlretrieve(source, path)
        assert _frames_of(str(path)) == 6

        uploads = driver.find_elements(By.CSS_SELECTOR, "input[type=file]")
        uploads[1].send_keys(str(files / "small_mask.png"))  # the mask, of another size than the subject
        _wait(lambda: "10x10" in driver.find_element(By.TAG_NAME, "body").text, what="the error")
        body = driver.find_element(By.TAG_NAME, "body").text
        assert "is 10x10 (width x height) but the subject image" in body and "is 16x16" in body
        assert "Traceback" not in body
    finally:
        driver.quit()


def test_an_edit_without_masks_segments_the_source_once(saved_tiny_model, tmp_path, monkeypatch):
    import torch

    from magdiff import segmentation
    from magdiff.app import MagDiffApp
    from magdiff.loading import load_pipeline
    from magdiff.media import save_video

    frames = torch.full((4, 3, 16, 16), -0.6)
    frames[:, 0, 4:12, 4:12] = 0.8
    source = save_video(frames, tmp_path / "source.mp4")
    calls: list[int] = []
    segment = segmentation.segment_video

    def counting(video, *args, **kwargs):
        calls.append(len(video))
        return segment(video, *args, **kwargs)

    monkeypatch.setattr(segmentation, "segment_video", counting)
    app = MagDiffApp(load_pipeline(str(saved_tiny_model), device="cpu"), tmp_path / "out")
    seen: dict = {}
    monkeypatch.setattr(app, "_run", lambda progress, seed, **inputs: seen.update(inputs) or "edited.mp4")
    app.edit(str(source), None, "a cat on a blue background", "subject", False, 2, 7.5, 0)
    assert calls == [4]  # the preview's segmentation is the edit's: not run again by the pipeline
    assert seen["video_masks"] is not None and seen["video_masks"].shape[0] == 4
