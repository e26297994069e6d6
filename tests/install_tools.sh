#!/usr/bin/env bash
# The tools that are not Python packages: Debian's chromium and chromium-driver (the browser tests,
# tests/test_netron_browser.py and tests/test_web.py, and web_infer.py), onnxruntime-web from the npm
# registry, pinned by web/package-lock.json, and Debian's wrk and h2load (nghttp2-client), the C load
# generators of loadgen.py and the serving tests (HTTP/1.1; HTTP/2 and gRPC).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v npm >/dev/null || missing+=(npm)
command -v wrk >/dev/null || missing+=(wrk)
command -v h2load >/dev/null || missing+=(nghttp2-client)
if [ ${#missing[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null; then
    echo "no apt-get here: install ${missing[*]} yourself; the browser tests and the C client's rows are skipped without them"
    exit 0
  fi
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
chromium --version
npm ci --prefix "$repo/web" --ignore-scripts --no-audit --no-fund --loglevel=error
