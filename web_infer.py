"""ONNX Runtime Web in headless Chromium: the exported model runs in a web page on onnxruntime-web's
WebAssembly provider (and on WebGPU where the browser offers it), over the test images, timed in the
page. Prints the block every backend prints: accuracy, test-set time, batch-1 latency, and the
browser, provider and threads that really ran.

python web_infer.py --demo serves a page where you draw a digit and see the class, the ten scores and
the experts the gate chose, computed in the page by the same model file.

onnxruntime-web comes from the npm registry: npm ci --prefix web (the README's main command runs it).
The InferenceSession is built in web/moe.mjs and called by web/bench.mjs, the page that
moebench/web.py, measure_in_page(), drives."""
import sys
import time

from moebench import backend_script, contract, netron, web
from moebench.cli import UserError, non_negative_float, non_negative_int, port_number, run
from moebench.measuring.block import print_block
from moebench.measuring.compare import compare
from moebench.runners import onnx_runtime
from moebench.test_set import load_test_set

PROVIDERS = {"wasm": "WebAssembly SIMD", "webgpu": "WebGPU"}


def parse_args(argv=None):
    from moebench.cli import ArgumentParser
    parser = ArgumentParser(description=__doc__)
    backend_script.add_model_args(parser)
    parser.add_argument("--provider", choices=("wasm", "webgpu", "both"), default="both",
                        help="onnxruntime-web execution provider; both: wasm, then WebGPU if the browser offers "
                             "it, else one line saying it does not (default both)")
    parser.add_argument("--threads", type=non_negative_int, default=0,
                        help="WebAssembly threads (default 0: onnxruntime-web's own choice); the block says "
                             "how many ran")
    parser.add_argument("--demo", action="store_true",
                        help="serve the drawing page until Ctrl-C instead of measuring")
    parser.add_argument("--host", default="127.0.0.1", help="address the pages are served on (default 127.0.0.1)")
    parser.add_argument("--port", type=port_number,
                        help="port for the pages (default: 8070 with --demo, a free one otherwise)")
    parser.add_argument("--browser-timeout", type=non_negative_float, default=900,
                        help="seconds the measurement page may take (default 900)")
    args = parser.parse_args(argv)
    args.model = backend_script.model_path(args.model, args.routing)
    return args


def model_bytes(path):
    contract.check_onnx(path)
    with open(path, "rb") as f:
        return f.read()


def demo(args):
    model = contract.check_onnx(args.model)
    if contract.GATES not in [output.name for output in model.graph.output]:
        raise UserError(f"{args.model} has no 'gates' output, which the drawing page shows; export it with "
                        "export_onnx.py")
    server = web.PageServer({"/model.onnx": model.SerializeToString()}, args.host,
                            8070 if args.port is None else args.port)
    print(f"serving the drawing page for {args.model} at {server.url}/ (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.close()
        print("stopped", flush=True)


def progress_bar(args):
    from tqdm import tqdm
    bar = tqdm(total=1, unit="step", leave=False, disable=None if not args.quiet else True)

    def show(progress):
        if progress:
            bar.total = progress["total"]
            bar.n = progress["done"]
            bar.set_description(progress["stage"])
            bar.refresh()
    return bar, show


def measure_provider(args, browser, server, provider, images, labels, reference):
    bar, show = progress_bar(args)
    settings = {"sizes": min(args.batch_size, len(images)), "runs": args.latency_runs, "threads": args.threads}
    with bar:
        page = web.measure_in_page(browser, server.url, provider, settings, args.browser_timeout, show)
    if not page["available"]:
        print(f"== ONNX Runtime Web, {PROVIDERS[provider]}: not available here: {page['reason']}", flush=True)
        return None
    result = web.as_measurement(page, labels)
    threads = page["threads"]
    details = {
        "browser": f"headless Chromium {browser.version}",
        "provider": f"{provider} ({PROVIDERS[provider]}), {', '.join(page['wasmFiles']) or 'no .wasm file'} loaded",
        "threads": f"{threads} (cross-origin isolated: {'yes' if page['crossOriginIsolated'] else 'no'}; "
                   f"{page['hardwareConcurrency']} logical cores seen by the page)",
        "vs Python": compare_line(result["logits"], reference),
    }
    label = f"ONNX Runtime Web, {PROVIDERS[provider]} ({threads} thread{'s' if threads != 1 else ''}, Chromium)"
    versions = {"onnxruntime-web": page["ortVersion"], "Chromium": browser.version}
    return print_block(label, args.model, result, versions, page["setupMs"] / 1e3, details, args.json)


def compare_line(logits, reference):
    found = compare(logits, reference)
    return (f"max |logit difference| {found['max_logit_diff']:.2e}, {found['agreement']:.2f}% the same "
            "class as ONNX Runtime CPU in Python")


def main(argv=None):
    args = parse_args(argv)
    if args.demo:
        return demo(args)
    payload = model_bytes(args.model)
    web.require_ort_web()
    web.chromium_paths()  # before the test set is loaded
    images, labels = load_test_set(args.data_dir, args.test_limit)
    with onnx_runtime.runner(args.model) as python_side:
        reference = python_side.logits(images)
    server = web.PageServer(web.test_set_files(payload, images), args.host, args.port or 0)
    browser = web.Browser()
    records = []
    try:
        for provider in ("wasm", "webgpu") if args.provider == "both" else (args.provider,):
            records.append(measure_provider(args, browser, server, provider, images, labels, reference))
    finally:
        browser.close()
        server.close()
    netron.serve_if_asked(args.model, netron.asked(args))
    if args.provider != "both" and records[0] is None:
        sys.exit(1)  # the one provider asked for is not here
    return records


if __name__ == "__main__":
    run(main)
