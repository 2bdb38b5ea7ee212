"""A real browser renders the Space: headless Chromium, driven over the Chrome DevTools protocol, loads the
page served by a subprocess, shows the "untrained weights" banner and the Spatial QA tab, switches to the
Trajectory tab, and leaves screenshots of both under the test's temp dir. Skipped without Chromium
(`apt-get install -y --no-install-recommends chromium`)."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import websockets.sync.client as sync_client

from tests.test_space import build_tiny_checkpoint, launch_space, write_examples  # noqa: E402
from tests.tiny_assets import make_image  # noqa: E402

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,1400",
    "--remote-debugging-port=0",
]


class DevTools:
    """The smallest CDP client: one page target, synchronous calls, events ignored."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 40.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {expression}")

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))


@pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium: apt-get install -y --no-install-recommends chromium"
)
def test_browser_renders_both_tabs(tmp_path: Path) -> None:
    ckpt = build_tiny_checkpoint(tmp_path / "ckpt")
    proc, url = launch_space(ckpt, write_examples(tmp_path / "examples"), tmp_path / "app.log")
    profile = tmp_path / "chromium-profile"
    browser = subprocess.Popen(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stack = contextlib.ExitStack()
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        ws = stack.enter_context(sync_client.connect(page["webSocketDebuggerUrl"], max_size=2**26))
        cdp = DevTools(ws)
        cdp.call("Page.enable")
        cdp.call("Page.navigate", url=url)

        # rendered elements (not the config JSON embedded in the page): ids only exist once Svelte mounts them
        cdp.wait_for("!!document.querySelector('#qa-ask')")
        tabs = cdp.js("[...document.querySelectorAll('[role=tab]')].map(b => b.textContent.trim())")
        assert tabs[:2] == ["Spatial QA", "Trajectory"]
        banner = cdp.js("document.querySelector('#vipa-model-status')?.innerText || ''")
        assert "Untrained weights" in banner and "make demo" in banner
        assert cdp.js("!!document.querySelector('#qa-question textarea')")
        assert not cdp.js("!!document.querySelector('#traj-predict')")  # the hidden tab is not mounted yet
        cdp.screenshot(tmp_path / "spatial_qa.png")

        cdp.js("document.querySelector('[role=tab][data-tab-id=trajectory]').click()")
        cdp.wait_for("!!document.querySelector('#traj-predict')")
        text = cdp.js("document.body.innerText")
        assert "Predict trajectory" in text and "vertical" in text  # the documented default K

        # a real upload through the file input, then a prediction: the plotly figure and the overlay render
        frame = tmp_path / "frame.png"
        make_image(60, 80, seed=5).save(frame)
        root = cdp.call("DOM.getDocument")["root"]["nodeId"]
        node = cdp.call("DOM.querySelector", nodeId=root, selector="#traj-frame input[type=file]")["nodeId"]
        cdp.call("DOM.setFileInputFiles", files=[str(frame)], nodeId=node)
        cdp.wait_for("document.querySelector('#traj-frame').innerText.includes('frame.png')")
        cdp.js("document.querySelector('#traj-predict').click()")
        cdp.wait_for("!!document.querySelector('#traj-plot .js-plotly-plot, #traj-plot .plot-container')", 60)
        cdp.wait_for("!!document.querySelector('#traj-overlay img')")
        cdp.wait_for("document.querySelector('#traj-json').innerText.includes('trajectory')")
        cdp.screenshot(tmp_path / "trajectory.png")
        for name in ("spatial_qa.png", "trajectory.png"):
            assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert (tmp_path / name).stat().st_size > 5000
    finally:
        stack.close()
        browser.terminate()
        browser.wait(timeout=20)
        proc.terminate()
        proc.wait(timeout=20)
