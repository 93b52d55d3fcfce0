#!/usr/bin/env bash
# The dashboard's browser test (tests/test_browser.py) drives Debian's Chromium at
# /usr/bin/chromium with Playwright (browser downloads are not possible on every machine, and
# the test never fetches one). Install it when it is missing and this machine can; otherwise
# fail with a message naming it. Never lets the test skip silently.
set -uo pipefail

chromium=/usr/bin/chromium
[ -x "$chromium" ] && exit 0

if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "Chromium is missing; installing it for the browser test (apt-get install chromium)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
    >/tmp/update-worker-chromium.log 2>&1 || tail -5 /tmp/update-worker-chromium.log >&2
fi
if [ ! -x "$chromium" ]; then
  echo "the browser test needs Chromium at $chromium (Debian: apt-get install chromium)" >&2
  exit 1
fi
