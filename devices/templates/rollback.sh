#!/bin/sh
# Go back to the release before the current one: its config, its models, its Python environment.
# install.sh keeps that release and points <prefix>/opt/edge-slm/previous at it. POSIX sh.
set -eu

PREFIX=""
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || { echo "rollback.sh: --prefix needs a directory" >&2; exit 2; }; PREFIX="$2"; shift 2 ;;
        --prefix=*) PREFIX="${1#--prefix=}"; shift ;;
        -h|--help) echo "usage: sh rollback.sh [--prefix DIR]   switch current back to previous and restart the agent"; exit 0 ;;
        *) echo "rollback.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
case "$PREFIX" in
    "" | "/") PREFIX="" ;;
    /*) PREFIX="${PREFIX%/}" ;;
    *) PREFIX="$(pwd -P)/$PREFIX" ;;
esac
APP="$PREFIX/opt/edge-slm"
ETC="$PREFIX/etc/edge-slm"
die() { echo "edge-slm rollback: error: $*" >&2; exit 1; }

[ -L "$APP/previous" ] || die "no previous release under $APP (only one release was ever installed)"
PREV=$(readlink "$APP/previous")
CUR=$(readlink "$APP/current")
[ -d "$APP/$PREV" ] || die "$APP/$PREV is gone; redeploy the release you want"
[ -f "$APP/$PREV/agent.toml.installed" ] || die "$APP/$PREV has no installed config; redeploy it instead"
cp "$APP/$PREV/agent.toml.installed" "$ETC/agent.toml.new"
mv "$ETC/agent.toml.new" "$ETC/agent.toml"
ln -sfn "$PREV" "$APP/current.new"
mv -T "$APP/current.new" "$APP/current" 2>/dev/null || { rm -f "$APP/current"; mv "$APP/current.new" "$APP/current"; }
ln -sfn "$CUR" "$APP/previous"
echo "edge-slm rollback: current is now ${PREV#releases/} (was ${CUR#releases/})"
if [ -z "$PREFIX" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl restart edge-slm.service
    echo "edge-slm rollback: service edge-slm restarted"
fi
