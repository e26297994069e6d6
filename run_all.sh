#!/usr/bin/env bash
# The main job, end to end: fetch MNIST if needed, train, report test accuracy.
set -euo pipefail
cd "$(dirname "$0")"
python train.py "$@"
