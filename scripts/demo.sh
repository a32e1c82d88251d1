#!/usr/bin/env bash
# Set up, then convert a built-in tiny Llama-3.2-1B-shaped model HF -> MCore (TP2 x PP2) -> HF and inspect it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${1:-/tmp/ckptbridge-demo}
rm -rf "$OUT" && mkdir -p "$OUT"
.venv/bin/ckptbridge example llama3.2-1b "$OUT/hf"
.venv/bin/ckptbridge convert --src hf --dst mcore --tp 2 --pp 2 "$OUT/hf" "$OUT/mcore"
.venv/bin/ckptbridge inspect --no-tensors "$OUT/mcore"
.venv/bin/ckptbridge convert --src mcore --dst hf "$OUT/mcore" "$OUT/hf-export"
.venv/bin/ckptbridge compare "$OUT/hf" "$OUT/hf-export"
