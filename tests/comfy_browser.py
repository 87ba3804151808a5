"""Headless Chromium driving the real ComfyUI front end, through chromedriver's WebDriver API.

Stdlib only: chromedriver (Debian package `chromium-driver`) speaks W3C WebDriver over HTTP
on loopback, and forwards Chrome DevTools commands (`goog/cdp/execute`). Tests skip when
Chromium or chromedriver is missing. Every process started here is stopped by its own id.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from comfy_server import HOST, free_port, stop

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
)
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")

# Installed before any page script runs: keeps every console message and uncaught error.
CONSOLE_RECORDER = """
window.__actConsole = [];
for (const level of ["error", "warn"]) {
  const original = console[level].bind(console);
  console[level] = (...args) => {
    window.__actConsole.push({level, text: args.map((a) => {
      try { return a instanceof Error ? a.stack || String(a)
                   : typeof a === "object" ? JSON.stringify(a) : String(a); }
      catch (e) { return String(a); }
    }).join(" ")});
    original(...args);
  };
}
window.addEventListener("error", (event) =>
  window.__actConsole.push({level: "uncaught", text: String(event.message)}));
window.addEventListener("unhandledrejection", (event) =>
  window.__actConsole.push({level: "unhandledrejection", text: String(event.reason)}));
"""


def chromium_binaries() -> tuple[str, str]:
    """(chromium, chromedriver) executables; else skip the calling test."""
    browser = next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("install Chromium and chromedriver (Debian: chromium chromium-driver)")
    return browser, driver


class Browser:
    """One WebDriver session: navigate, run JavaScript, take screenshots."""

    def __init__(self, driver_url: str, session_id: str) -> None:
        self.base = f"{driver_url}/session/{session_id}"

    def command(self, method: str, route: str, payload: Any = None, timeout: float = 60) -> Any:
        """Send one WebDriver command; returns its `value`.

        Raises:
            RuntimeError: WebDriver answered with an error (its message is included).
        """
        return _webdriver(method, self.base + route, payload, timeout)

    def cdp(self, command: str, **params: Any) -> Any:
        """Run a Chrome DevTools Protocol command in the current page."""
        return self.command("POST", "/goog/cdp/execute", {"cmd": command, "params": params})

    def open(self, url: str) -> None:
        """Load `url` with the console recorder installed before the page's own scripts."""
        self.cdp("Page.addScriptToEvaluateOnNewDocument", source=CONSOLE_RECORDER)
        self.command("POST", "/url", {"url": url})

    def run(self, script: str, *args: Any, timeout: float = 60) -> Any:
        """Evaluate `script` (a function body: `return ...`; may `await`) in the page."""
        body = f"const done = arguments[arguments.length - 1];\n(async () => {{ {script} }})()"
        body += ".then(done, (e) => done({__error: String(e && e.stack || e)}));"
        self.command("POST", "/timeouts", {"script": int(timeout * 1000)})
        value = self.command(
            "POST", "/execute/async", {"script": body, "args": list(args)}, timeout + 10
        )
        if isinstance(value, dict) and "__error" in value:
            raise RuntimeError(f"script failed in the page: {value['__error']}")
        return value

    def wait_for(self, condition: str, timeout: float = 60, interval: float = 0.25) -> Any:
        """Poll a JavaScript expression until it is truthy; returns its value.

        Raises:
            TimeoutError: still falsy after `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.run(f"return {condition};")
            if value:
                return value
            time.sleep(interval)
        raise TimeoutError(f"{condition!r} not true after {timeout} s")

    def set_viewport(self, width: int, height: int) -> None:
        """Size the page's viewport in CSS pixels (device scale factor 1)."""
        self.cdp(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def screenshot(self, path: Path) -> Path:
        """Save a PNG of the viewport to `path`."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.command("GET", "/screenshot")))
        return path

    def console(self) -> list[dict[str, str]]:
        """Console errors and warnings (and uncaught errors) recorded since the page loaded."""
        return self.run("return window.__actConsole || [];")


def _webdriver(method: str, url: str, payload: Any, timeout: float) -> Any:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read()).get("value")
    except urllib.error.HTTPError as error:
        body = error.read().decode(errors="replace")
        raise RuntimeError(f"WebDriver {method} {url}: HTTP {error.code}: {body[:2000]}") from None


def _wait_for_driver(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"chromedriver exited with code {process.returncode}")
        with contextlib.suppress(OSError, RuntimeError):
            if (_webdriver("GET", f"{url}/status", None, 5) or {}).get("ready"):
                return
        time.sleep(0.2)
    raise TimeoutError(f"chromedriver not ready after {timeout} s")


@contextlib.contextmanager
def chromium(width: int = 1600, height: int = 1000, timeout: float = 60) -> Iterator[Browser]:
    """A headless Chromium session on loopback; always closed, its processes stopped."""
    browser_binary, driver_binary = chromium_binaries()
    profile = Path(tempfile.mkdtemp(prefix="act-chromium-"))
    port = free_port()
    driver_url = f"http://{HOST}:{port}"
    log = (profile / "chromedriver.log").open("wb")
    process = subprocess.Popen(
        [driver_binary, f"--port={port}", f"--allowed-ips={HOST}"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    session_id = None
    try:
        _wait_for_driver(driver_url, process, timeout)
        options = {
            "binary": browser_binary,
            "args": [
                *CHROMIUM_FLAGS,
                f"--window-size={width},{height}",
                f"--user-data-dir={profile / 'user-data'}",
            ],
        }
        capabilities = {"browserName": "chrome", "goog:chromeOptions": options}
        answer = _webdriver(
            "POST",
            f"{driver_url}/session",
            {"capabilities": {"alwaysMatch": capabilities}},
            timeout,
        )
        session_id = answer["sessionId"]
        browser = Browser(driver_url, session_id)
        browser.set_viewport(width, height)
        yield browser
    finally:
        if session_id is not None:
            with contextlib.suppress(OSError, RuntimeError):
                _webdriver("DELETE", f"{driver_url}/session/{session_id}", None, 30)
        stop(process, grace=10)
        log.close()
        shutil.rmtree(profile, ignore_errors=True)


# Loads a workflow the way a dropped file is loaded (`app.handleFile`, which calls
# `loadGraphData`), then reports what the front end made of it.
LOAD_WORKFLOW = """
const [filename, text] = arguments;
const app = window.app;
const consoleStart = window.__actConsole.length;
await app.handleFile(new File([text], filename, {type: "application/json"}));
await new Promise((resolve) => setTimeout(resolve, 1000));  // missing-model checks are async
const graph = app.rootGraph;
const nodes = graph.nodes.map((node) => {
  const definition = node.constructor.nodeData;
  const required = Object.keys(definition?.input?.required || {});
  const missingInputs = required.filter((name) => {
    const slot = (node.inputs || []).find((input) => input.name === name);
    const widget = (node.widgets || []).find((w) => w.name === name);
    // an "autogrow" input (e.g. Batch Images) is a family of slots named "<name>.<n>"
    const grown = (node.inputs || []).some((i) => i.name.startsWith(name + ".") && i.link != null);
    return !widget && !grown && (!slot || slot.link == null);
  });
  return {id: node.id, type: node.type, title: node.title,
          registered: node.type in LiteGraph.registered_node_types,
          hasErrors: !!node.has_errors, missingInputs};
});
const workflow = app.extensionManager.workflow.activeWorkflow;
const warning = /\\b\\d+\\s+errors?\\s+found\\b|missing (nodes?|models?|inputs?)/i;
const overlay = [...document.querySelectorAll("body *")]
  .filter((element) => element.children.length === 0 && warning.test(element.textContent))
  .map((element) => element.textContent.trim());
const exported = await app.graphToPrompt();
return JSON.stringify({
  workflowName: workflow?.filename ?? null,
  pendingWarnings: workflow?.pendingWarnings ?? null,
  nodes, overlay, prompt: exported.output, saved: exported.workflow,
  console: window.__actConsole.slice(consoleStart),
});
"""

# Frames every node and group in the part of the canvas that no menu covers.
FIT_VIEW = """
const [insets] = arguments;  // [left, top, right, bottom] in CSS pixels
const canvas = window.app.canvas;
const graph = window.app.rootGraph;
const title = LiteGraph.NODE_TITLE_HEIGHT;
const boxes = [
  ...graph.nodes.map((n) => [n.pos[0], n.pos[1] - title, n.size[0], n.size[1] + title]),
  ...(graph.groups || []).map((g) => [g.pos[0], g.pos[1], g.size[0], g.size[1]]),
];
const left = Math.min(...boxes.map((b) => b[0])), top = Math.min(...boxes.map((b) => b[1]));
const width = Math.max(...boxes.map((b) => b[0] + b[2])) - left;
const height = Math.max(...boxes.map((b) => b[1] + b[3])) - top;
const rect = canvas.canvas.getBoundingClientRect();
const areaLeft = Math.max(insets[0] - rect.left, 0), areaTop = Math.max(insets[1] - rect.top, 0);
const areaWidth = rect.width - areaLeft - insets[2], areaHeight = rect.height - areaTop - insets[3];
const scale = Math.min(areaWidth / width, areaHeight / height, 1.5);
canvas.ds.scale = scale;
canvas.ds.offset[0] = (areaLeft + (areaWidth - width * scale) / 2) / scale - left;
canvas.ds.offset[1] = (areaTop + (areaHeight - height * scale) / 2) / scale - top;
canvas.setDirty(true, true);
await new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));
return scale;
"""
# The menus of the 2026 front end: the side toolbar (left) and the tab and run bars (top).
MENU_INSETS = (64, 100, 16, 16)


def load_workflow(browser: Browser, filename: str, text: str) -> dict[str, Any]:
    """Drop a UI-format workflow into the front end; report what it made of it.

    Returns:
        {"nodes": [{"id", "type", "title", "registered", "hasErrors", "missingInputs"}],
        "pendingWarnings" (missing nodes/models/media, or None), "overlay" (texts of error
        overlays), "prompt" (the API prompt the front end would queue: `graphToPrompt`),
        "saved" (the workflow as the front end would save it now), "console" (errors and
        warnings logged while loading), "workflowName"}.
    """
    return json.loads(browser.run(LOAD_WORKFLOW, filename, text))


def fit_view(browser: Browser, insets: tuple[int, int, int, int] = MENU_INSETS) -> float:
    """Frame the whole graph in the viewport, clear of the menus; returns the canvas scale."""
    return browser.run(FIT_VIEW, list(insets))


def load_problems(report: dict[str, Any]) -> list[str]:
    """Missing nodes, missing models or inputs, error overlays and console errors of a load."""
    problems = [
        f"node {node['id']} ({node['type']}): "
        + ("type not registered" if not node["registered"] else "")
        + ("marked with errors" if node["hasErrors"] else "")
        + (f"required inputs missing {node['missingInputs']}" if node["missingInputs"] else "")
        for node in report["nodes"]
        if not node["registered"] or node["hasErrors"] or node["missingInputs"]
    ]
    if report["pendingWarnings"]:
        problems.append(f"front-end warnings: {json.dumps(report['pendingWarnings'])[:2000]}")
    problems += [f"error overlay: {text}" for text in report["overlay"]]
    problems += [f"console {entry['level']}: {entry['text'][:500]}" for entry in report["console"]]
    return problems
