#!/usr/bin/env bash
# Refresh the dashboard's charting library (uPlot) from the npm registry, pinned and checked.
set -euo pipefail
VERSION=1.6.32
SHA256=4b8a8191e425658e3ea8c8c1314b0fc679c861ee3a1af2b20c7b16ba50b5133d
cd "$(dirname "$0")/.."
target=src/eztinker/server/ui/static/vendor/uplot
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "uplot@$VERSION" >/dev/null)
echo "$SHA256  $work/uplot-$VERSION.tgz" | sha256sum --check --quiet
tar -xzf "$work/uplot-$VERSION.tgz" -C "$work"
cp "$work/package/dist/uPlot.iife.min.js" "$work/package/dist/uPlot.min.css" "$work/package/LICENSE" "$target/"
echo "uPlot $VERSION -> $target"
