#!/usr/bin/env bash
# The public site with 1,000 submissions (4 jobs of 250): how long the validator takes to
# render the competition page, and how long headless Chromium takes to load it, beside an
# empty page loaded the same way (the browser's own start-up). Needs chromium.
# Usage: scripts/bench-web.sh [runs]   (default 5)
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-5}"
command -v chromium >/dev/null || { echo "needs chromium (Debian: apt-get install chromium)"; exit 1; }
out=$(mktemp -d)
TUNENET_WEB_PAGE_OUT="$out" cargo test --release -q -p tunenet-node --lib \
    web::tests::a_thousand_submissions_render_in_one_page -- --nocapture 2>&1 | grep rendered
echo '<!doctype html><html><body><main>x</main></body></html>' > "$out/empty.html"
load() {
    local s e
    s=$(date +%s%N)
    chromium --headless --no-sandbox --disable-gpu --disable-dev-shm-usage \
        --window-size=1280,1600 --dump-dom "file://$out/$1.html" >/dev/null 2>&1
    e=$(date +%s%N)
    echo $(( (e - s) / 1000000 ))
}
printf "%-10s %s\n" page "chromium load ms (runs)"
for f in empty thousand; do
    ms=()
    for _ in $(seq "$runs"); do ms+=("$(load "$f")"); done
    printf "%-10s %s\n" "$f" "${ms[*]}"
done
rm -rf "$out"
