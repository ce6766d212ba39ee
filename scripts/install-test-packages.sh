#!/bin/sh
# Installs the Debian packages listed in tests/debian-packages.txt (the real daemons and
# Prometheus binaries the tests run). Needs root; without it the tests that need a package
# skip with a reason. Services are installed but not started: the tests start their own
# private instances inside network namespaces.
set -eu
cd "$(dirname "$0")/.."
packages=$(grep -v '^\s*#' tests/debian-packages.txt | tr '\n' ' ')
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-test-packages: not root on a Debian system, skipping: $packages" >&2
    exit 0
fi
missing=""
for p in $packages; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -n "$missing" ] || exit 0
echo "install-test-packages: installing$missing" >&2
# Keep package scripts from starting the services on this machine (see invoke-rc.d(8)).
policy=/usr/sbin/policy-rc.d
own_policy=""
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && own_policy=1
fi
trap '[ -z "$own_policy" ] || rm -f "$policy"' EXIT
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq $missing >/dev/null
