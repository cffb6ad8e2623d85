#!/usr/bin/env bash
# Two commits measured on this machine, one after the other, without Docker.
#
#   scripts/compare.sh BASE [HEAD]      e.g. scripts/compare.sh main HEAD (HEAD by default)
#
# Checks each commit out into a temporary worktree, runs `dvc repro --force` there with that
# commit's own code (so both are measured here and now, whatever figures they carry), and prints
# each one's headline table; exit 1 if either pipeline failed. Uncommitted changes are not measured: commit them first. The
# corpus comes as for `dvc repro` (the cache, or NEUROMANIFOLD_CORPUS when offline).
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:?usage: scripts/compare.sh BASE [HEAD]}
head=${2:-HEAD}
here=$PWD
tmp=$(mktemp -d)
cleanup() {
  for wt in "$tmp"/*/; do git -C "$here" worktree remove --force "$wt" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

status=0
declare -A sha
for rev in "$base" "$head"; do
  sha[$rev]=$(git rev-parse --verify "$rev^{commit}")
done
for rev in "$base" "$head"; do
  wt="$tmp/${sha[$rev]}"
  [[ -d $wt ]] && continue  # the same commit twice is measured once
  git worktree add --quiet --detach "$wt" "${sha[$rev]}"
  echo "== measuring $rev (${sha[$rev]:0:12}) in $wt" >&2
  (cd "$wt" && PYTHONPATH="$wt" dvc repro --force >&2) || status=1  # a failed verify still has a table
done
for rev in "$base" "$head"; do
  echo "## $rev (${sha[$rev]:0:12}), measured on this machine"
  echo
  PYTHONPATH="$here" python3 -m neuromanifold_gpt.results --table --root "$tmp/${sha[$rev]}" || status=1
  echo
done
exit "$status"
