#!/usr/bin/env python3
"""Check that the built book renders maths and widgets with the network cut, in headless Chromium.

    python scripts/check_offline_render.py _build/html                 # every page
    python scripts/check_offline_render.py _build/html --pages notebooks/explorers.html intro.html

The built HTML is served from 127.0.0.1 by this script. Run as root, the script puts itself into a new
network namespace (``unshare --net``) that has only the loopback interface, so nothing can leave the
machine; otherwise (or with ``--no-unshare``) Chromium is pointed at a dead proxy, which has the same effect
on the page. Chromium is driven through the DevTools protocol over a pipe (``--remote-debugging-pipe``),
so only the standard library and Debian's ``chromium`` package are needed.

For each page it prints PASS or FAIL with the reasons:
- requests: every request the page makes goes to the local server (or is a data:/blob: URL);
- maths: MathJax is loaded and every ``.math`` element holds a typeset ``mjx-container``, and no raw
  ``$$``, ``\\(`` or ``\\[`` is left in the page's text;
- widgets (pages with stored widget state): the widget manager is loaded, every stored widget view is
  rendered, no "Error displaying widget" appears, and every image stored in an Output widget is shown.
A local file that is missing (HTTP 404 or another error status) fails the page. A full-page screenshot of each page is
saved in ``--screenshots`` (default ``/tmp/offline-render``). Exit status 0 when every page passes.
"""

from __future__ import annotations

import argparse
import base64
import functools
import http.server
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
SKIP_PAGES = {"genindex.html", "search.html", "py-modindex.html"}
SKIP_DIRS = {"_static", "_sources", "_images", "_downloads", "vendor", "_assets"}
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
    "--remote-debugging-pipe",
]
_NETNS_MARK = "ENGRAM_OFFLINE_NETNS"


# ----------------------------------------------------------------------------------------------------------
# A minimal DevTools-protocol client over Chromium's pipe (fd 3: commands in, fd 4: replies out).


class Browser:
    """Headless Chromium driven through ``--remote-debugging-pipe``; one page (tab) at a time."""

    def __init__(self, executable: str, extra_flags: list[str] | None = None, timeout: float = 30.0):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="engram-chromium-")
        to_chrome_r, self._to_chrome_w = os.pipe()
        self._from_chrome_r, from_chrome_w = os.pipe()

        def wire_fds():  # in the child: the pipe ends must be fds 3 and 4
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        flags = CHROMIUM_FLAGS + [f"--user-data-dir={self.profile}"] + (extra_flags or [])
        self.proc = subprocess.Popen([executable, *flags, "about:blank"], preexec_fn=wire_fds, pass_fds=(3, 4),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next_id = 0
        self._replies: dict[int, dict] = {}
        self._events: queue.Queue = queue.Queue()
        self._cond = threading.Condition()
        threading.Thread(target=self._reader, daemon=True).start()
        self.session: str | None = None

    def _reader(self) -> None:
        buf = b""
        while True:
            chunk = os.read(self._from_chrome_r, 1 << 16)
            if not chunk:
                with self._cond:
                    self._cond.notify_all()
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    with self._cond:
                        self._replies[msg["id"]] = msg
                        self._cond.notify_all()
                else:
                    self._events.put(msg)

    def send(self, method: str, params: dict | None = None, session: bool = True, timeout: float | None = None) -> dict:
        """Send one command and wait for its result (raises RuntimeError on a protocol error)."""
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        with self._cond:
            while self._next_id not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise RuntimeError(f"Chromium did not answer {method} in time")
                self._cond.wait(min(left, 0.5))
            reply = self._replies.pop(self._next_id)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def events(self) -> list[dict]:
        """All protocol events received since the last call."""
        out = []
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                return out

    def new_page(self, width: int = 1280, height: int = 900) -> None:
        """Open a fresh tab and attach to it (network events on)."""
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]
        self.target = target
        for domain in ("Page", "Network", "Runtime"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def close_page(self) -> None:
        self.send("Target.closeTarget", {"targetId": self.target}, session=False)
        self.session = None

    def evaluate(self, expression: str, await_promise: bool = False, timeout: float | None = None):
        """Evaluate JavaScript in the page and return its (JSON-serialisable) value."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": await_promise}, timeout=timeout)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript error: {result['exceptionDetails'].get('text')}: "
                               f"{result['exceptionDetails'].get('exception', {}).get('description', '')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0, interval: float = 0.25) -> bool:
        """Poll a JavaScript expression until it is truthy; returns False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.evaluate(expression):
                return True
            time.sleep(interval)
        return False

    def screenshot(self, path: Path, max_height: int = 6000) -> None:
        """Save a full-page PNG screenshot (cut at ``max_height`` pixels)."""
        height = min(int(self.evaluate("document.documentElement.scrollHeight") or 900), max_height)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False})
        time.sleep(0.3)
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False, timeout=5)
        except RuntimeError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# What is checked inside the page.

PAGE_REPORT_JS = r"""
(() => {
  const skip = new Set(['SCRIPT', 'STYLE', 'PRE', 'CODE', 'TEXTAREA', 'MJX-CONTAINER', 'MJX-ASSISTIVE-MML']);
  const raw = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    let p = n.parentElement, skipped = false;
    for (; p; p = p.parentElement) {
      if (skip.has(p.tagName) || p.classList.contains('highlight')) { skipped = true; break; }
    }
    if (!skipped && /\$\$|\\\(|\\\[/.test(n.textContent)) raw.push(n.textContent.trim().slice(0, 80));
  }
  const maths = [...document.querySelectorAll('.math')];
  const stateTag = document.querySelector('script[type="application/vnd.jupyter.widget-state+json"]');
  let outputImages = 0;
  if (stateTag) {
    const state = JSON.parse(stateTag.textContent).state || {};
    for (const m of Object.values(state)) {
      if (m.model_name === 'OutputModel')
        for (const o of (m.state.outputs || [])) if (o.data && o.data['image/png']) outputImages += 1;
    }
  }
  const views = document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]');
  const rendered = [...views].filter(v => {
    const area = v.previousElementSibling;
    return area && area.classList.contains('widget-subarea') && area.querySelector('.jupyter-widgets');
  }).length;
  return {
    title: document.title,
    mathjax: !!(window.MathJax && window.MathJax.version), mathjaxVersion: window.MathJax && window.MathJax.version,
    mathElements: maths.length,
    mathTypeset: maths.filter(m => m.querySelector('mjx-container')).length,
    rawMath: raw.slice(0, 5),
    widgetState: !!stateTag,
    widgetManager: typeof window.require === 'function' && !!document.querySelector('script[src*="embed-amd"]'),
    widgetViews: views.length, widgetViewsRendered: rendered,
    widgetErrors: (document.body.innerText.match(/Error displaying widget/g) || []).length,
    outputImagesStored: outputImages,
    outputImagesShown: document.querySelectorAll(
      '.widget-output img[src^="data:image/png"], .jupyter-widgets-output-area img[src^="data:image/png"]').length,
  };
})()
"""

READY_JS = r"""
(() => {
  if (document.readyState !== 'complete') return false;
  const needsMath = document.querySelector('.math') !== null;
  if (needsMath && !(window.MathJax && window.MathJax.startup && window.MathJax.startup.document
      && document.querySelectorAll('.math').length === document.querySelectorAll('.math mjx-container').length))
    return false;
  const views = document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]').length;
  if (views && document.querySelectorAll('.widget-subarea .jupyter-widgets').length === 0) return false;
  return true;
})()
"""


def check_page(browser: Browser, url: str, shot: Path | None, wait: float) -> tuple[bool, list[str], list[str], dict]:
    """Load ``url`` and return ``(passed, problems, warnings, report)``."""
    browser.new_page()
    browser.events()
    browser.send("Page.navigate", {"url": url})
    ready = browser.wait_for(READY_JS, timeout=wait)
    time.sleep(1.0)  # let late requests (fonts, lazy scripts) start
    report = browser.evaluate(PAGE_REPORT_JS)
    problems, warnings = [], []
    if not ready:
        problems.append(f"page did not finish rendering maths/widgets within {wait:.0f} s")
    requests, statuses = [], {}
    for ev in browser.events():
        if ev.get("method") == "Network.requestWillBeSent":
            requests.append(ev["params"]["request"]["url"])
        elif ev.get("method") == "Network.responseReceived":
            statuses[ev["params"]["response"]["url"]] = ev["params"]["response"]["status"]
        elif ev.get("method") == "Network.loadingFailed" and not ev["params"].get("canceled"):
            warnings.append(f"request failed: {ev['params'].get('errorText')}")
    foreign = sorted({u for u in requests if urlsplit(u).scheme in ("http", "https", "ws", "wss")
                      and urlsplit(u).hostname not in LOCAL_HOSTS and f"[{urlsplit(u).hostname}]" not in LOCAL_HOSTS})
    for u in foreign:
        problems.append(f"request to another host: {u}")
    for u, status in sorted(statuses.items()):
        if status >= 400 and urlsplit(u).path != "/favicon.ico":  # the browser asks for it by itself
            problems.append(f"missing local file (HTTP {status}): {urlsplit(u).path}")
    if report["mathElements"] or report["rawMath"]:
        if not report["mathjax"]:
            problems.append("maths on the page but MathJax is not loaded")
        if report["mathTypeset"] < report["mathElements"]:
            problems.append(f"only {report['mathTypeset']}/{report['mathElements']} maths elements typeset")
        if report["rawMath"]:
            problems.append(f"raw TeX left in the text: {report['rawMath']}")
    if report["widgetState"] or report["widgetViews"]:
        if not report["widgetManager"]:
            problems.append("widget state stored but the widget manager (embed-amd.js + RequireJS) is not loaded")
        if report["widgetViewsRendered"] < report["widgetViews"]:
            problems.append(f"only {report['widgetViewsRendered']}/{report['widgetViews']} widget views rendered")
        if report["widgetErrors"]:
            problems.append(f"{report['widgetErrors']} 'Error displaying widget' message(s)")
        if report["outputImagesShown"] < report["outputImagesStored"]:
            problems.append(f"only {report['outputImagesShown']}/{report['outputImagesStored']} images stored in "
                            "Output widgets are shown")
    report["requests"] = len(requests)
    if shot is not None:
        browser.screenshot(shot)
    browser.close_page()
    return not problems, problems, sorted(set(warnings)), report


# ----------------------------------------------------------------------------------------------------------


def find_pages(root: Path, pages: list[str] | None) -> list[Path]:
    if pages:
        found = [root / p for p in pages]
        missing = [str(p) for p in found if not p.is_file()]
        if missing:
            raise SystemExit(f"No such page(s) in {root}: {', '.join(missing)}")
        return found
    return sorted(p for p in root.rglob("*.html")
                  if p.name not in SKIP_PAGES and not SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))


def serve(root: Path) -> tuple[http.server.ThreadingHTTPServer, int]:
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def reexec_in_netns() -> None:
    """Run this script again inside a fresh network namespace with only loopback (root only)."""
    if os.environ.get(_NETNS_MARK) or os.geteuid() != 0 or not shutil.which("unshare"):
        return
    env = dict(os.environ, **{_NETNS_MARK: "1"})
    cmd = ["unshare", "--net", "sh", "-c", 'ip link set lo up 2>/dev/null || true; exec "$@"', "sh",
           sys.executable, *sys.argv]
    sys.exit(subprocess.call(cmd, env=env))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("build", type=Path, help="the built book's HTML folder, e.g. _build/html")
    parser.add_argument("--pages", nargs="*", help="pages relative to the folder (default: all pages)")
    parser.add_argument("--screenshots", type=Path, default=Path("/tmp/offline-render"),
                        help="folder for full-page PNG screenshots (default /tmp/offline-render)")
    parser.add_argument("--no-screenshots", action="store_true")
    parser.add_argument("--no-unshare", action="store_true", help="do not enter a new network namespace")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser")
                        or "/usr/bin/chromium")
    parser.add_argument("--wait", type=float, default=30.0, help="seconds to wait for maths and widgets per page")
    args = parser.parse_args(argv)

    root = args.build.resolve()
    if not (root / "index.html").is_file() and not args.pages:
        raise SystemExit(f"{root} has no index.html: build the book first (jupyter-book build .) and pass "
                         "its _build/html folder.")
    if not Path(args.chromium).exists():
        raise SystemExit(f"Chromium not found at {args.chromium}: apt-get install -y chromium (Debian), or "
                         "pass --chromium PATH.")
    if not args.no_unshare:
        reexec_in_netns()
    pages = find_pages(root, args.pages)
    netns = bool(os.environ.get(_NETNS_MARK))
    print(f"Checking {len(pages)} page(s) of {root} in {Path(args.chromium).name}; network: "
          f"{'cut (own network namespace, loopback only)' if netns else 'dead proxy for every non-local host'}")
    shots = None if args.no_screenshots else args.screenshots
    if shots:
        shots.mkdir(parents=True, exist_ok=True)

    server, port = serve(root)
    flags = [] if netns else [
        "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>;127.0.0.1;localhost"]
    # With the dead proxy, local pages must bypass it; "<-loopback>" removes the implicit bypass so that the
    # explicit list above is the whole list.
    browser = Browser(args.chromium, flags)
    n_fail = 0
    try:
        for page in pages:
            rel = page.relative_to(root).as_posix()
            shot = shots / (rel.replace("/", "__").removesuffix(".html") + ".png") if shots else None
            try:
                ok, problems, warnings, report = check_page(browser, f"http://127.0.0.1:{port}/{rel}", shot, args.wait)
            except RuntimeError as err:
                ok, problems, warnings, report = False, [f"browser error: {err}"], [], {}
            n_fail += not ok
            summary = (f"maths {report.get('mathTypeset', 0)}/{report.get('mathElements', 0)}, "
                       f"widgets {report.get('widgetViewsRendered', 0)}/{report.get('widgetViews', 0)}, "
                       f"output images {report.get('outputImagesShown', 0)}/{report.get('outputImagesStored', 0)}, "
                       f"requests {report.get('requests', 0)}")
            print(f"{'PASS' if ok else 'FAIL'}  {rel}  ({summary})")
            for p in problems:
                print(f"      problem: {p}")
            for w in warnings:
                print(f"      warning: {w}")
    finally:
        browser.close()
        server.shutdown()
    if shots:
        print(f"Screenshots in {shots}")
    print(f"{len(pages) - n_fail} passed, {n_fail} failed")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
