#!/usr/bin/env bash
# The image's build steps without a Docker engine: copies exactly what deploy/Dockerfile's build
# stage COPYs (read from the Dockerfile itself, each source also let in by
# deploy/Dockerfile.dockerignore) into an empty directory, and runs the Dockerfile's
# `cargo build --locked --bin token-broker` there. A file the build needs but the Dockerfile
# does not copy (as benches/ once was) fails here. Then hadolint.
#   IMAGE_CHECK_PROFILE=release (default, as the Dockerfile) or dev (CI: reuses its dev build)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
profile="${IMAGE_CHECK_PROFILE:-release}"

# Sources of the build stage's COPY lines (not COPY --from), and the ignore file's allow list.
mapfile -t sources < <(awk '
  /^FROM / { stage++ }
  stage == 1 && /^COPY / && $2 !~ /^--from/ { for (i = 2; i < NF; i++) print $i }
' deploy/Dockerfile)
mapfile -t allowed < <(sed -n 's/^!//p' deploy/Dockerfile.dockerignore)
[ "${#sources[@]}" -gt 0 ] || { echo "image-check: no COPY sources found in deploy/Dockerfile" >&2; exit 1; }

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
for src in "${sources[@]}"; do
  src=${src%/}
  if ! printf '%s\n' "${allowed[@]}" | grep -qx "$src"; then
    echo "image-check: deploy/Dockerfile copies $src but deploy/Dockerfile.dockerignore keeps it out of the context" >&2
    exit 1
  fi
  [ -e "$src" ] || { echo "image-check: deploy/Dockerfile copies $src, which does not exist" >&2; exit 1; }
  cp -a "$src" "$ctx/"
done
echo "image-check: context = ${sources[*]}"

flags=(--locked --bin token-broker)
[ "$profile" = release ] && flags+=(--release)
# Dependencies compiled for the repository are reused; the crate itself is built from the copy.
(cd "$ctx" && CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}" cargo build --quiet "${flags[@]}")
echo "image-check: cargo build ${flags[*]} succeeds on exactly the image's context"

if command -v hadolint >/dev/null; then
  hadolint deploy/Dockerfile && echo "image-check: hadolint clean"
elif [ "${REQUIRE_TOOLS:-0}" = 1 ]; then
  echo "image-check: hadolint is required (REQUIRE_TOOLS=1) but not installed" >&2
  exit 1
else
  echo "image-check: hadolint not installed: skipped"
fi
