#!/usr/bin/env bash
# Builds the Debian package from this checkout: packaging/debian/ becomes
# debian/ in a copy of the tracked files (the checkout itself is left as
# it is), `dpkg-buildpackage -us -uc -b` builds it there, and the .deb
# lands in OUTDIR (default: dist/).  Needs the build tools of
# packaging/setup-debian.sh; runs as any user.
#
#     packaging/build-deb.sh [OUTDIR]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
outdir=$(mkdir -p "${1:-$repo/dist}" && cd "${1:-$repo/dist}" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The files git knows (committed or staged) as they are in the working
# tree: what a clean clone has, plus the edits not yet committed.
mkdir "$work/policyd"
(cd "$repo" && git ls-files -z --cached | while IFS= read -r -d '' f; do
     if [ -e "$f" ]; then cp --parents -t "$work/policyd" "$f"; fi
 done)
cp -r "$repo/packaging/debian" "$work/policyd/debian"

# Debian's own tools and Python, whatever PATH the caller has.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
(cd "$work/policyd" && dpkg-buildpackage -us -uc -b)
cp "$work"/*.deb "$outdir"/
ls "$outdir"/*.deb
