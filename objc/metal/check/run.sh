#!/usr/bin/env bash
# run.sh — a syntax and type check of objc/metal/*.m that runs without a Mac: clang parses
# the Objective-C with ARC against the stand-in headers in this folder, which declare exactly
# the Apple API the backend uses (transcribed from Apple's SDK headers, see ../API_NOTES.md).
# It catches syntax, type and ARC errors and any selector the stand-ins do not declare; it
# cannot catch a stand-in that differs from the real SDK, nor anything at run time.
# Usage: bash objc/metal/check/run.sh   (needs clang, or the ziglang wheel's zig cc; exits 0 when
# every file passes)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"   # objc/
found="${CLANG:-$(command -v clang || command -v clang-18 || command -v clang-17 || command -v clang-16 \
      || command -v clang-15 || command -v clang-14 || true)}"
cc=()
[ -n "$found" ] && cc=("$found")
out=(-fsyntax-only)
if [ -z "$found" ] && python3 -m ziglang version >/dev/null 2>&1; then
    # no clang, but the ziglang wheel's `zig cc` (clang inside): it writes an object to check,
    # so compile to a scratch file instead of -fsyntax-only (which its cache cannot rename)
    cc=(python3 -m ziglang cc)
    scratch="$(mktemp -d)"
    trap 'rm -rf "$scratch"' EXIT
    out=(-c -o "$scratch/x.o" -Wno-unused-command-line-argument)
fi
if [ ${#cc[@]} -eq 0 ]; then
    echo "metal check: no clang found (apt-get install clang, or pip install ziglang); nothing checked" >&2
    exit 2
fi
status=0
for f in "$root"/metal/*.m; do
    if ! "${cc[@]}" "${out[@]}" -x objective-c -fobjc-arc -fobjc-runtime=macosx-13.0 -std=gnu11 \
         -Wall -Wextra -Wno-unused-parameter -Werror -DMPSCY_HAVE_METAL \
         -I "$here" -I "$root" "$f"; then
        status=1
    fi
done
[ $status -eq 0 ] && echo "metal check: $(ls "$root"/metal/*.m | wc -l) files pass ${cc[*]} -fobjc-arc against the stand-in headers"
exit $status
