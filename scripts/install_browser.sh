#!/usr/bin/env bash
# Headless Chromium + its matching chromedriver from Debian, for the generation page's browser
# test (tests/test_serve.py). Idempotent; never fails the build: where no browser can be
# installed (no apt-get, not root and no sudo) it says why and the test skips with that reason.
set -uo pipefail

if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "install_browser: no apt-get on this machine; tests/test_serve.py's browser test skips" >&2
  exit 0
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
  else
    echo "install_browser: not root and no passwordless sudo; run as root:" \
      "apt-get install chromium chromium-driver (the browser test skips until then)" >&2
    exit 0
  fi
fi
echo "install_browser: apt-get install chromium chromium-driver" >&2
if ! { "${sudo[@]}" apt-get update -qq &&
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
    chromium chromium-driver >/dev/null; }; then
  echo "install_browser: apt-get failed (see above); the browser test skips" >&2
fi
exit 0
