"""The model in a browser: a local server for the pages in web/, onnxruntime-web from web/node_modules
(installed from the npm registry by `npm ci --prefix web`), the model file and the test images; and
headless Chromium, driven by Selenium, to run the measurement page. Nothing the pages load comes
from anywhere but this server (the Content-Security-Policy header forbids it)."""
import base64
import os
import shutil
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from .cli import UserError, error_line, require_module

ORT_WEB_VERSION = "1.30.0"  # the version web/package.json pins
WEB_FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "web")
ORT_FOLDER = os.path.join(WEB_FOLDER, "node_modules", "onnxruntime-web", "dist")
PAGES = {"/": "demo.html", "/bench": "bench.html"}
PAGE_FILES = ("bench.html", "bench.mjs", "demo.html", "demo.mjs", "moe.mjs")
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".mjs": "text/javascript", ".js": "text/javascript",
                 ".wasm": "application/wasm", ".onnx": "application/octet-stream", ".bin": "application/octet-stream"}
HEADERS = {
    # cross-origin isolation: without it WebAssembly gets no shared memory, so no threads
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Content-Security-Policy": "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; worker-src 'self' blob:; "
                               "style-src 'self' 'unsafe-inline'; img-src 'self' data:",
    "Cache-Control": "no-store",
}
TIMING = "in the page: session.run from Float32Arrays made before the clock, performance.now()"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-default-apps")


def require_ort_web():
    if not os.path.isfile(os.path.join(ORT_FOLDER, "ort.wasm.min.mjs")):
        raise UserError(f"onnxruntime-web {ORT_WEB_VERSION} is not installed in {os.path.relpath(ORT_FOLDER)}: "
                        "run 'npm ci --prefix web' (npm comes with Node.js; the README's main command does it)")


class PageServer:
    """The pages, onnxruntime-web's files, and the in-memory `files` ({"/model.onnx": bytes, ...}),
    on host:port in a thread of its own; anything else is a 404."""

    def __init__(self, files, host="127.0.0.1", port=0):
        require_ort_web()
        routes = {path: os.path.join(WEB_FOLDER, name) for path, name in PAGES.items()}
        routes.update({f"/web/{name}": os.path.join(WEB_FOLDER, name) for name in PAGE_FILES})
        routes.update({f"/ort/{name}": os.path.join(ORT_FOLDER, name) for name in os.listdir(ORT_FOLDER)
                       if name.endswith((".mjs", ".wasm"))})

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.split("?", 1)[0]
                if path in files:
                    body = files[path]
                elif path in routes:
                    with open(routes[path], "rb") as f:
                        body = f.read()
                else:
                    return self.answer(404, b"not found", ".txt")
                self.answer(200, body, os.path.splitext(path)[1] if "." in path else ".html")

            def answer(self, status, body, extension):
                self.send_response(status)
                self.send_header("Content-Type", CONTENT_TYPES.get(extension, "text/plain"))
                self.send_header("Content-Length", str(len(body)))
                for name, value in HEADERS.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # one line per file would bury the results
                pass

        try:
            self.httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as error:
            raise UserError(f"--host {host} --port {port}: cannot serve there ({error.strerror or error}); "
                            "choose another port, or 0 for a free one")
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_set_files(model_bytes, images):
    """The in-memory files the measurement page reads: the model and the test images as uint8."""
    pixels = np.round(np.asarray(images).reshape(len(images), -1) * 255).astype(np.uint8)
    return {"/model.onnx": model_bytes, "/test-images.bin": pixels.tobytes()}


def chromium_paths():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        missing = " and ".join(name for name, path in (("Chromium", chromium), ("chromedriver", driver)) if not path)
        raise UserError(f"no {missing} on the PATH: install them (Debian: apt-get install chromium chromium-driver, "
                        "or bash tests/install_tools.sh)")
    return chromium, driver


class Browser:
    """Headless Chromium under Selenium, with a profile of its own that is removed afterwards."""

    def __init__(self, flags=(), window=(1400, 900)):
        chromium, driver = chromium_paths()
        require_module("selenium", "the browser backend")
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        self.profile = tempfile.mkdtemp(prefix="moe-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in CHROMIUM_FLAGS + tuple(flags) + (f"--window-size={window[0]},{window[1]}",
                                                     f"--user-data-dir={self.profile}"):
            options.add_argument(flag)
        try:
            self.driver = webdriver.Chrome(service=Service(driver), options=options)
        except Exception as error:
            shutil.rmtree(self.profile, ignore_errors=True)
            raise UserError(f"Chromium did not start under chromedriver ({error_line(error)})")
        self.version = self.driver.capabilities.get("browserVersion", "unknown")

    def wait_for(self, expression, timeout_s, progress=None):
        """Poll a JavaScript expression until it is not null; `progress(value)` sees window.benchProgress."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            value = self.driver.execute_script(f"return {expression};")
            if value is not None:
                return value
            if progress:
                progress(self.driver.execute_script("return window.benchProgress || null;"))
            time.sleep(0.2)
        raise UserError(f"the page did not finish within {timeout_s:.0f} s (--browser-timeout)")

    def close(self):
        self.driver.quit()
        shutil.rmtree(self.profile, ignore_errors=True)


def measure_in_page(browser, url, provider, settings, timeout_s, progress=None):
    """The measurement page's result for one provider and model: a dict with the logits decoded,
    or {"available": False, "reason": ...} when the browser lacks the provider."""
    query = "&".join(f"{key}={value}" for key, value in {"provider": provider, **settings}.items())
    browser.driver.get(f"{url}/bench?{query}")
    result = browser.wait_for("window.benchResult || null", timeout_s, progress)
    if "error" in result:
        raise UserError(f"onnxruntime-web ({provider}) failed in the page: {result['error'][:300]}")
    if result.get("available"):
        logits = np.frombuffer(base64.b64decode(result.pop("logits")), dtype=np.float32)
        result["logits"] = logits.reshape(result["images"], -1)
    return result


def as_measurement(page, labels):
    """The page's numbers (one batch size) as clock.measure() returns them, for a printed block."""
    from .measuring import clock
    (size, passes_ms), = page["passesMs"].items()
    return clock.summary(page["logits"], labels, int(size), [ms / 1e3 for ms in passes_ms],
                         [ms / 1e3 for ms in page["latenciesMs"]], TIMING)


def time_against_floor(browser, url, sizes, repeats, latency_runs, threads=0):
    """benchmark.py's row for the wasm provider: blocks that alternate the model and the floor MLP
    (served as /floor.onnx), each a page load of its own in the same browser, as floor.py times the
    other rows."""
    from .measuring.floor import against_floor
    latency = {"model": [], "floor": []}
    full = {who: {str(size): [] for size in sizes} for who in latency}
    for _ in range(repeats):
        for who in ("model", "floor"):
            settings = {"model": f"/{who}.onnx", "sizes": ",".join(map(str, sizes)), "runs": latency_runs,
                        "repeats": 1, "threads": threads}
            page = measure_in_page(browser, url, "wasm", settings, 900)
            latency[who] += [ms / 1e3 for ms in page["latenciesMs"]]
            for size, passes_ms in page["passesMs"].items():
                full[who][size] += [ms / 1e3 for ms in passes_ms]
            if who == "model":
                model_page = page
    described = {"engine": f"onnxruntime-web {model_page['ortVersion']} in headless Chromium {browser.version}",
                 "provider": f"wasm ({', '.join(model_page['wasmFiles'])})", "precision": "fp32",
                 "threads": model_page["threads"]}
    return against_floor(latency, full, model_page["images"]), described, model_page["logits"]
