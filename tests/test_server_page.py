"""The server's web page, in a real browser (selenium and Debian's chromium)."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
import soundfile as sf

from csm_gguf.audio import SAMPLE_RATE
from server_fixtures import (
    wait_idle,
)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("Chromium is not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                 "--autoplay-policy=no-user-gesture-required",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",  # a microphone that beeps
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    yield browser
    browser.quit()


# The page's last request's result, once it is over (done, failed or stopped); None before.
LAST_RESULT = ("return window.lastResult && (window.lastResult.done || window.lastResult.error || "
               "window.lastResult.stopped) ? window.lastResult : null")


def open_page(browser, url: str):
    """The page at `url` once its voice list is in (the 13 built-in voices and none); a wait for it."""
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(url)
    wait = WebDriverWait(browser, 30)
    wait.until(lambda b: len(Select(b.find_element("id", "voice")).options) >= 13)
    return wait


def set_text(browser, text: str, fmt: str) -> None:
    from selenium.webdriver.support.ui import Select

    box = browser.find_element("id", "text")
    box.clear()
    box.send_keys(text)
    Select(browser.find_element("id", "format")).select_by_value(fmt)


def speak_in_page(browser, wait) -> dict:
    browser.find_element("id", "speak").click()
    return wait.until(lambda b: b.execute_script(LAST_RESULT))


@pytest.mark.parametrize("fmt", ["pcm", "mp3"])
def test_web_page_speaks_in_chromium(browser, base, engine, fmt, services):
    from selenium.webdriver.support.ui import Select

    wait = open_page(browser, base + "/")
    set_text(browser, "Hi there.", fmt)
    Select(browser.find_element("id", "voice")).select_by_value("fable")
    speed = browser.find_element("id", "speed")
    speed.clear()
    speed.send_keys("2" if fmt == "pcm" else "1")
    result = speak_in_page(browser, wait)
    assert result["error"] is None and result["bytes"] > 0 and result["firstAudioMs"] is not None
    if fmt == "pcm":  # the tiny model makes 25 frames for so short a text (its minimum budget)
        assert result["bytes"] == 25 * 2 * services.tts.codec.cfg.frame_size // 2  # at speed 2
    assert "done" in browser.find_element("id", "status").text
    wait_idle(engine)


def test_web_page_takes_a_blank_speed_as_1_and_says_stopped_when_stopped(browser, base, engine):
    """A blank Speed was sent as 0 ("'speed' is 0; it must lie from 0.25 to 4"); Stop said "error: signal is
    aborted without reason"."""
    wait = open_page(browser, base + "/")
    browser.find_element("id", "speed").clear()
    set_text(browser, "Hi there.", "pcm")
    result = speak_in_page(browser, wait)
    assert result["error"] is None and result["done"], result
    set_text(browser, "This is a sentence that goes on for a while. " * 40, "pcm")
    browser.find_element("id", "speak").click()
    wait.until(lambda b: "first audio" in b.find_element("id", "status").text)
    browser.find_element("id", "stop").click()
    result = wait.until(lambda b: b.execute_script(LAST_RESULT))
    assert result["stopped"] and result["error"] is None, result
    assert browser.find_element("id", "status").text.startswith("stopped after ")
    wait_idle(engine)


def test_web_page_works_behind_a_path_prefix(browser, server, engine):
    """A proxy that serves the server under /tts/ (nginx's `location /tts/ { proxy_pass http://csm/; }`):
    the page's requests go to /tts/v1/..., not to /v1/... beside it."""
    import threading

    from werkzeug.serving import make_server

    app = server[0]

    def under_tts(environ, start_response):  # the proxy: strips its prefix, refuses anything else
        path = environ["PATH_INFO"]
        if not path.startswith("/tts/"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not under /tts/"]
        environ["PATH_INFO"] = path[len("/tts"):]
        return app(environ, start_response)

    proxy = make_server("127.0.0.1", 0, under_tts, threaded=True)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        wait = open_page(browser, f"http://127.0.0.1:{proxy.server_port}/tts/")
        set_text(browser, "Hi there.", "pcm")
        result = speak_in_page(browser, wait)
        assert result["error"] is None and result["bytes"] > 0, result
    finally:
        proxy.shutdown()
    wait_idle(engine)


def save_voice_in_page(browser, name: str, transcript: str) -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    for field, value in (("voice-name", name), ("voice-text", transcript)):
        browser.find_element("id", field).clear()
        browser.find_element("id", field).send_keys(value)
    browser.execute_script("window.lastVoice = null")
    browser.find_element("id", "save-voice").click()
    return WebDriverWait(browser, 60).until(lambda b: b.execute_script("return window.lastVoice"))


def test_web_page_adds_a_voice_from_a_file_and_from_the_microphone(browser, base, engine, tmp_path, monkeypatch,
                                                                   services):
    from selenium.webdriver.support.ui import Select

    from csm_gguf.voices import load_voice

    monkeypatch.setenv("PATH", str(tmp_path))  # no ffmpeg for the server: the page sends WAV (the browser runs)
    frame = services.tts.codec.cfg.frame_size
    stereo = tmp_path / "stereo48k.wav"  # the page sends 24 kHz mono
    sf.write(stereo, np.stack([np.sin(np.arange(96_000) / 9), np.zeros(96_000)], axis=1).astype(np.float32), 48_000)
    long = tmp_path / "long.wav"
    sf.write(long, np.zeros(70 * 8000, np.int16), 8000)
    wait = open_page(browser, base + "/")
    browser.find_element("id", "voice-file").send_keys(str(long))
    assert save_voice_in_page(browser, "long", "Words.") == "error: long.wav is 70 s long: a voice needs 5 to 30 s " \
                                                             "(at most 60); cut it"
    browser.find_element("id", "voice-file").send_keys(str(stereo))
    assert browser.find_element("id", "voice-sample").text == "sample: stereo48k.wav"
    assert save_voice_in_page(browser, "from-file", "Words from a file.") == "saved voice from-file"
    assert Select(browser.find_element("id", "voice")).first_selected_option.get_attribute("value") == "from-file"
    (segment,) = load_voice("from-file").segments
    assert segment.text == "Words from a file." and abs(len(segment.codes) - 2 * SAMPLE_RATE // frame) <= 1
    assert save_voice_in_page(browser, "from-file", "Again.").startswith("error: there is a voice named from-file")

    browser.find_element("id", "record").click()
    wait.until(lambda b: b.find_element("id", "voice-status").text == "recording…")
    assert not browser.find_element("id", "save-voice").is_enabled()  # until the recording stops
    time.sleep(1.5)
    browser.find_element("id", "record").click()
    wait.until(lambda b: b.find_element("id", "voice-status").text.startswith("recorded"))
    assert browser.find_element("id", "voice-sample").text.startswith("sample: recording-")
    assert save_voice_in_page(browser, "from-mic", "Beep beep.") == "saved voice from-mic"
    assert len(load_voice("from-mic").segments[0].codes) > SAMPLE_RATE // frame  # over a second
    assert save_voice_in_page(browser, "", "No name.").startswith("error: 'name' is required")

    for name in ("from-file", "from-mic"):  # deleted from the page
        Select(browser.find_element("id", "voice")).select_by_value(name)
        browser.find_element("id", "delete-voice").click()
        browser.switch_to.alert.accept()
        wait.until(lambda b: b.find_element("id", "status").text == f"deleted voice {name}")
    assert not {"from-file", "from-mic"} & set(load_voice_names(base))
    Select(browser.find_element("id", "voice")).select_by_value("alloy")
    assert not browser.find_element("id", "delete-voice").is_enabled()  # built-in


def load_voice_names(base: str) -> list[str]:
    return [v["id"] for v in httpx.get(f"{base}/v1/audio/voices").json()["voices"]]
