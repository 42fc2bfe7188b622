"""The report in a real browser: headless Chromium (Debian's `chromium`; `.ci/run` installs it)
opens a demo run's report from disk with the network blocked, and the page must have loaded
every figure (each `img` has a natural size above zero), logged no console error, fetched
nothing, and rendered a screenshot that is not blank.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON
messages, each ended by a NUL byte, read from fd 3 and written to fd 4), so no websocket client
or browser driver is needed. The same checks run first on a page made to fail them, so they
cannot pass by seeing nothing."""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from test_viz_report import demo_report  # noqa: F401  (the fixture, shared)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)",
)
TIMEOUT = 60.0  # seconds for any one answer of the browser
WIDTH, HEIGHT = 1280, 1600  # the window, and the screenshot
# argv: READ_FD WRITE_FD PROGRAM ARGS...: run PROGRAM with READ_FD on fd 3, WRITE_FD on fd 4.
EXEC_ON_3_AND_4 = (
    "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
    "os.execv(sys.argv[3], sys.argv[3:])"
)
BLANK = 10.0  # grey-level spread below which a screenshot counts as blank


class Browser:
    """Headless Chromium on a DevTools pipe, with every host name unresolvable and a dead
    proxy: a page can reach nothing but files and data URIs."""

    def __init__(self, profile: str):
        # Chromium reads the protocol on fd 3 and writes it on fd 4. The pipe ends are moved
        # above 9 here and onto 3 and 4 by a small Python that execs Chromium: no preexec_fn,
        # so nothing runs between fork and exec in this multithreaded (JAX) process.
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        theirs = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_chrome_r, from_chrome_w)]
        for fd in (to_chrome_r, from_chrome_w):
            os.close(fd)
        args = [
            CHROMIUM,
            "--headless",
            "--remote-debugging-pipe",
            "--no-sandbox",  # CI runs as root, where the sandbox refuses to start
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--proxy-server=http://127.0.0.1:9",
            "--proxy-bypass-list=<-loopback>",
            f"--window-size={WIDTH},{HEIGHT}",
            "about:blank",
        ]
        self.process = subprocess.Popen(
            [sys.executable, "-c", EXEC_ON_3_AND_4, str(theirs[0]), str(theirs[1]), *args],
            pass_fds=theirs,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fd in theirs:
            os.close(fd)
        self._buffer = b""
        self._id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=self.session)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            session=self.session,
            width=WIDTH,
            height=HEIGHT,
            deviceScaleFactor=1,
            mobile=False,
        )

    def _next_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_chrome], [], [], deadline - time.monotonic())
            if not ready:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium exited (status {self.process.poll()})")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, session: str | None = None, **params) -> dict:
        """Send a command; returns its result (events that arrive meanwhile are kept)."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT
        while True:
            answer = self._next_message(deadline)
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]
            self.events.append(answer)

    def open(self, url: str) -> dict:
        """Load `url` in the tab, wait for its load event; returns what the page shows: `images`
        [(natural width, natural height)], `errors` (console and network errors), `requests`
        (the URLs asked for) and `screenshot` (PNG bytes)."""
        self.events = []
        self.call("Page.navigate", session=self.session, url=url)
        deadline = time.monotonic() + TIMEOUT
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._next_message(deadline))
        found = self.call(
            "Runtime.evaluate",
            session=self.session,
            expression="JSON.stringify(Array.from(document.images, "
            "i => [i.naturalWidth, i.naturalHeight]))",
            returnByValue=True,
        )
        shot = self.call("Page.captureScreenshot", session=self.session, format="png")
        errors = []
        for e in self.events:
            method, p = e.get("method"), e.get("params", {})
            if method == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                errors.append(
                    " ".join(str(a.get("value", a.get("description"))) for a in p["args"])
                )
            elif method == "Runtime.exceptionThrown":
                errors.append(p["exceptionDetails"].get("text", "exception"))
            elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
                errors.append(p["entry"]["text"])
        return {
            "images": json.loads(found["result"]["value"]),
            "errors": errors,
            "requests": [
                e["params"]["request"]["url"]
                for e in self.events
                if e.get("method") == "Network.requestWillBeSent"
            ],
            "screenshot": base64.b64decode(shot["data"]),
        }

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self.process.wait(timeout=10)
        except (RuntimeError, TimeoutError, OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        finally:
            os.close(self._to_chrome)
            os.close(self._from_chrome)


def pixel_spread(png: bytes) -> float:
    """The standard deviation of the screenshot's grey levels (0 for a blank page)."""
    with Image.open(io.BytesIO(png)) as image:
        return float(np.asarray(image.convert("L"), np.float64).std())


def test_the_report_loads_every_figure_in_a_browser_offline(demo_report, tmp_path):  # noqa: F811
    workdir, _, _ = demo_report
    report = workdir / "report.html"
    # A page made to fail every check: a broken inline image, one from the network, an error.
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<html><body style="background:#fff"><img src="data:image/png;base64,AAAA">'
        '<img src="http://example.com/a.png"><script>console.error("boom")</script>'
        "</body></html>"
    )
    browser = Browser(str(tmp_path / "profile"))
    try:
        control = browser.open(bad.as_uri())
        page = browser.open(report.as_uri())
    finally:
        browser.close()
    assert control["images"] == [[0, 0], [0, 0]]
    assert "boom" in control["errors"] and len(control["errors"]) >= 2
    assert "http://example.com/a.png" in control["requests"]
    assert pixel_spread(control["screenshot"]) < BLANK  # white, and two broken-image icons

    expected = len(re.findall(r"<img ", report.read_text()))
    assert expected >= 10 and len(page["images"]) == expected
    assert all(w > 0 and h > 0 for w, h in page["images"]), page["images"]
    assert page["errors"] == []
    assert [u for u in page["requests"] if not u.startswith(("file:", "data:"))] == []
    with Image.open(io.BytesIO(page["screenshot"])) as image:
        assert image.size == (WIDTH, HEIGHT)
    assert pixel_spread(page["screenshot"]) > BLANK
