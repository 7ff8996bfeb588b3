#!/bin/sh
# Remove what an edge-slm bundle's install.sh added: the service, <prefix>/opt/edge-slm, the config.
# The state directory (outbox, sequence numbers) is kept unless --purge is given. POSIX sh.
set -eu

PREFIX=""
PURGE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || { echo "uninstall.sh: --prefix needs a directory" >&2; exit 2; }; PREFIX="$2"; shift 2 ;;
        --prefix=*) PREFIX="${1#--prefix=}"; shift ;;
        --purge) PURGE=1; shift ;;
        -h|--help) echo "usage: sh uninstall.sh [--prefix DIR] [--purge]   (--purge also deletes the state directory)"; exit 0 ;;
        *) echo "uninstall.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
case "$PREFIX" in
    "" | "/") PREFIX="" ;;
    /*) PREFIX="${PREFIX%/}" ;;
    *) PREFIX="$(pwd -P)/$PREFIX" ;;
esac
if [ -z "$PREFIX" ] && [ "$(id -u)" != "0" ]; then
    echo "edge-slm uninstall: error: needs root: sudo sh uninstall.sh (or --prefix DIR)" >&2
    exit 1
fi
APP="$PREFIX/opt/edge-slm"
ETC="$PREFIX/etc/edge-slm"
STATE="$PREFIX/var/lib/edge-slm"
UNIT="$PREFIX/etc/systemd/system/edge-slm.service"

if [ -z "$PREFIX" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now edge-slm.service >/dev/null 2>&1 || true
fi
rm -f "$UNIT"
if [ -z "$PREFIX" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload || true
fi
CREATED_USER=0
[ -f "$APP/.created-user" ] && CREATED_USER=1
rm -rf "$APP"
rm -f "$ETC/agent.toml" "$ETC/agent.toml.previous" "$ETC/agent.toml.new"
rm -rf "$ETC/files"
rmdir "$ETC" 2>/dev/null || echo "edge-slm uninstall: kept $ETC (it holds files install.sh did not write)"
if [ "$PURGE" = 1 ]; then
    rm -rf "$STATE"
    if [ -z "$PREFIX" ] && [ "$CREATED_USER" = 1 ]; then userdel edge-slm 2>/dev/null || true; fi
else
    [ -d "$STATE" ] && echo "edge-slm uninstall: kept the state directory $STATE (--purge deletes it)"
fi
echo "edge-slm uninstall: removed edge-slm from ${PREFIX:-/}"
