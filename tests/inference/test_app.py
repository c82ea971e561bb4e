"""The Gradio app (bagel-app, bagel/cli/app.py) on the tiny official fixture (random weights: the images are
noise, which is all these tests need).

- its argument defaults and request functions, called directly (no gradio needed);
- end to end: the app in a subprocess on a free 127.0.0.1 port, Debian's headless Chromium driven
  by selenium + chromedriver opens it, types a prompt in the Generate tab, sets 64x64 and 3 steps,
  clicks Generate and waits for the output image. Skipped, saying what is missing, without gradio,
  selenium, chromium or chromedriver. Every wait is bounded and a watchdog kills the app and the
  browser after BUDGET_S, so the test cannot hang.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUDGET_S = 80  # the whole browser test, after which the watchdog kills everything it started
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1400"]


@pytest.fixture(scope="module")
def app():
    from bagel.cli import app

    return app


def test_binds_loopback_unless_told(app, official_dir):
    args = app.build_parser().parse_args(["--model", str(official_dir)])
    assert (args.host, args.port, args.dtype, args.device) == ("127.0.0.1", 7860, "fp32", "cpu")
    args = app.build_parser().parse_args(["--model", "m", "--host", "0.0.0.0", "--port", "8000", "--dtype", "bf16"])
    assert (args.host, args.port, args.dtype) == ("0.0.0.0", 8000, "bf16")


def test_requests(app, official_dir):
    """Each tab's request function on the tiny model: sizes, guidance settings, chat turns."""
    args = app.build_parser().parse_args(["--model", str(official_dir)])
    engine = app.load_engine(args)
    assert app.max_image_px(engine) == 256  # max_latent_size 16 x 16 px

    cfg = app.gen_config(3, 3.0, 4.0, 1.0, 0.4, 1.0, "global", 0.0)
    image, plan = app.generate(engine, "a red cube", 64, 48, seed=1, think=False, max_think_tokens=8, cfg=cfg)
    assert image.size == (64, 48) and plan == ""
    with pytest.raises(ValueError, match="multiples of 16"):
        app.generate(engine, "a red cube", 72, 64, seed=1, think=False, max_think_tokens=8, cfg=cfg)
    with pytest.raises(ValueError, match="interval"):
        app.gen_config(3, 3.0, 4.0, 1.0, 0.8, 0.2, "global", 0.0)

    cfg = app.gen_config(3, 3.0, 4.0, 2.0, 0.0, 1.0, "text_channel", 0.0)
    edited, plan = app.edit(engine, image, "make it blue", seed=0, think=True, max_think_tokens=4, cfg=cfg)
    assert edited.size == image.size and isinstance(plan, str)
    with pytest.raises(ValueError, match="upload an image"):
        app.edit(engine, None, "make it blue", seed=0, think=False, max_think_tokens=4, cfg=cfg)

    turn = dict(think=False, max_new_tokens=4, temperature=0.0, top_k=0, top_p=1.0)
    first = app.chat(engine, image, [], "What is this?", **turn)
    assert isinstance(first, str)
    assert isinstance(app.chat(engine, image, [("What is this?", first)], "And the colour?", **turn), str)
    with pytest.raises(ValueError, match="question"):
        app.chat(engine, None, [], "  ", **turn)


def test_named_endpoints_with_named_parameters(app, official_dir, capfd):
    """The API a client sees: /generate, /edit, /chat, /interleave with the parameters' own names;
    a call through it gives the engine's image, enlarged for display; bad input is a clean error
    for the client and no traceback in the server's log."""
    pytest.importorskip("gradio")
    from gradio_client import Client
    from PIL import Image

    engine = app.load_engine(app.build_parser().parse_args(["--model", str(official_dir)]))
    demo = app.build_ui(engine, "tiny")
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        api = client.view_api(return_format="dict", print_info=False)
        assert set(api["named_endpoints"]) == {"/generate", "/edit", "/chat", "/interleave"}
        assert not api["unnamed_endpoints"]
        names = {name: [p["parameter_name"] for p in ep["parameters"]] for name, ep in api["named_endpoints"].items()}
        guidance = ["steps", "timestep_shift", "cfg_text_scale", "cfg_img_scale", "cfg_interval_start",
                    "cfg_interval_end", "cfg_renorm_type", "cfg_renorm_min", "cache", "upscale"]
        assert names["/generate"] == ["prompt", "width", "height", "seed", "think", "max_think_tokens", *guidance]
        assert names["/interleave"] == ["prompt", "image", "seed", "max_blocks", *guidance]
        assert names["/chat"][:3] == ["image", "question", "think"]
        settings = dict(zip(guidance, [3, 3.0, 4.0, 1.0, 0.4, 1.0, "global", 0.0, "off", 0]))
        path, plan = client.predict(prompt="a red cube", width=64, height=48, seed=1, think=False, max_think_tokens=16,
                                    **settings, api_name="/generate")
        shown = Image.open(path)
        direct, _ = app.generate(engine, "a red cube", 64, 48, seed=1, think=False, max_think_tokens=8,
                                 cfg=app.gen_config(3, 3.0, 4.0, 1.0, 0.4, 1.0, "global", 0.0))
        assert shown.size == (384, 288)  # auto: 6x, the smallest factor that shows 48 px as >= 256 px
        assert shown.convert("RGB").resize((64, 48), Image.NEAREST).tobytes() == direct.tobytes()
        capfd.readouterr()
        with pytest.raises(Exception, match="type a prompt first"):
            client.predict(prompt="  ", width=64, height=48, seed=1, think=False, max_think_tokens=16, **settings,
                           api_name="/generate")
        assert "Traceback" not in "".join(capfd.readouterr())
    finally:
        demo.close()


# End to end in a browser ------------------------------------------------------------------------
def browser_tools() -> tuple[str, str]:
    """(chromium, chromedriver) paths, or skip saying what is missing."""
    for module, install in (("gradio", 'pip install -e ".[app]"'), ("selenium", "pip install selenium")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed ({install})")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromium-driver", driver)) if path is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (apt-get install chromium chromium-driver)")
    return chromium, driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url: str, proc: subprocess.Popen, log: Path, deadline: float) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the app exited with status {proc.returncode}:\n{log.read_text()}")
        try:
            with opener.open(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    pytest.fail(f"the app did not serve {url} in time:\n{log.read_text()}")


def kill_group(proc) -> None:
    """SIGKILL a process this test started in its own session, with everything it started."""
    if proc is not None and proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def check_not_blank(png: bytes) -> None:
    """A rendered page, not an empty one: many distinct colours and real contrast."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert colours > 50 and pixels.std() > 10, f"the screenshot looks blank ({colours} colours, std {pixels.std():.1f})"


def test_generate_in_headless_chromium(official_dir, tmp_path):
    chromium, chromedriver = browser_tools()
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    start = time.monotonic()
    deadline = start + BUDGET_S - 10
    port, log = free_port(), tmp_path / "app.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(tmp_path / "gradio"),
           "PYTHONUNBUFFERED": "1", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "bagel.cli.app", "--model", str(official_dir), "--port", str(port)],
                                  cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True)
    # chromedriver in its own session too: chromium joins its group, so one kill ends both
    service = Service(chromedriver, log_output=str(tmp_path / "chromedriver.log"), popen_kw={"start_new_session": True})
    kill_all = lambda: [kill_group(p) for p in (server, getattr(service, "process", None))]  # noqa: E731
    watchdog = threading.Timer(BUDGET_S, kill_all)
    watchdog.daemon = True
    watchdog.start()
    driver = None
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_serving(url, server, log, deadline)
        served = time.monotonic()

        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
            options.add_argument(flag)
        driver = webdriver.Chrome(service=service, options=options)
        driver.set_page_load_timeout(20)
        driver.get(url)

        def wait(seconds: float) -> WebDriverWait:  # never past the deadline
            return WebDriverWait(driver, max(1.0, min(seconds, deadline - time.monotonic())), poll_frequency=0.2)

        tab = wait(20).until(lambda d: next(
            (b for b in d.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text.strip() == "Generate"), None))
        tab.click()
        prompt = wait(10).until(lambda d: d.find_element(By.CSS_SELECTOR, "#t2i-prompt textarea"))
        prompt.send_keys("a red cube on a blue table")
        for elem_id, value in (("t2i-width", 64), ("t2i-height", 64), ("t2i-steps", 3)):
            box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(str(value), Keys.TAB)
            slider = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=range]")
            wait(5).until(lambda d: slider.get_attribute("value") == str(value))
        driver.find_element(By.ID, "t2i-run").click()
        clicked = time.monotonic()

        def loaded_image(d):
            for img in d.find_elements(By.CSS_SELECTOR, "#t2i-image img"):
                if img.get_attribute("src") and d.execute_script("return arguments[0].complete", img):
                    return img
            return None

        try:
            img = wait(45).until(loaded_image)
        except TimeoutException:
            toasts = [t.text for t in driver.find_elements(By.CSS_SELECTOR, "[data-testid=toast-body]")]
            pytest.fail(f"no output image; messages on the page: {toasts}\napp log:\n{log.read_text()}")
        size = driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img)
        assert size == [256, 256], "the width/height controls did not reach the engine (64 px, shown 4x)"
        shown = driver.execute_script("return [arguments[0].clientWidth, arguments[0].clientHeight]", img)
        assert min(shown) >= 256, f"the image is displayed at {shown} px"
        check_not_blank(driver.get_screenshot_as_png())
        print(f"app served after {served - start:.1f} s; image {time.monotonic() - clicked:.1f} s after the click")
    finally:
        watchdog.cancel()
        if driver is not None:
            quitter = threading.Thread(target=driver.quit, daemon=True)  # bounded: a stuck quit is killed below
            quitter.start()
            quitter.join(timeout=10)
        kill_all()
