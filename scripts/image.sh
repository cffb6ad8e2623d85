#!/usr/bin/env bash
# The image's steps, run as the README's "Docker and GitHub Actions" section writes them. The
# GPU workflow's steps are these phases with GPUS=all; CI runs the same phases on the CPU.
#
#   scripts/image.sh build               docker build the image of this checkout
#   scripts/image.sh check               import the package in it, print torch's version
#   scripts/image.sh repro [OPTIONS]     dvc repro [OPTIONS] in it (the checkout mounted at /work)
#   scripts/image.sh diff                dvc metrics diff main --targets metrics/verify.json: the
#                                        headline figures against main's committed ones
#   scripts/image.sh compare REV [OPTIONS]
#       measure commit REV here too (its own image, dvc repro [OPTIONS]) and print, as Markdown,
#       what changed in this checkout's figures (run `repro` first) against REV's
#   scripts/image.sh reclaim             hand every file under the checkout back to the caller
#
# GPUS=all passes --gpus all to the runs; BASE_IMAGE=NAME builds on NAME instead of the
# Dockerfile's pinned python image.
set -euo pipefail
cd "$(dirname "$0")/.."

gpus=()
[[ -n ${GPUS:-} ]] && gpus=(--gpus "$GPUS")
build_args=()
[[ -n ${BASE_IMAGE:-} ]] && build_args=(--build-arg "BASE=$BASE_IMAGE")

# The tag names the image's content: checkouts with other Dockerfiles or requirements never swap
# images on one host, and an unchanged image keeps its cached layers (torch is GBs).
tag() { echo "neuromanifold-gpt:$(cat Dockerfile requirements.txt | sha256sum | cut -c1-16)"; }
IMAGE=$(tag)

build() {
  docker build "${build_args[@]}" -t "$IMAGE" .
}

# The README's `docker run` line, in the current directory's checkout.
run() {
  mkdir -p ~/.cache/neuromanifold_gpt
  docker run --rm "${gpus[@]}" --user "$(id -u):$(id -g)" -v "$PWD":/work -w /work \
    -v "$HOME/.cache/neuromanifold_gpt":/home/neuromanifold/.cache/neuromanifold_gpt \
    "$IMAGE" "$@"
}

# The devices that measured a checkout's training figures, one line.
devices() { sed -n 's/^ *"device_name": "\(.*\)",*$/\1/p' "$1"/metrics/train/*/*.json | sort -u | paste -sd/; }

compare() {
  local rev=${1:?compare needs the base commit}
  shift
  local sha measured head_on base_on
  sha=$(git rev-parse --verify "$rev^{commit}")
  base=$(mktemp -d)  # global: the EXIT trap removes it
  trap 'rm -rf "$base"' EXIT
  git clone --quiet --no-checkout . "$base"
  git -C "$base" checkout --quiet --detach "$sha"
  mkdir -p "$base/wheels" && cp -a wheels/. "$base/wheels/"  # the same local wheelhouse
  (
    cd "$base"
    IMAGE=$(tag)
    docker image inspect "$IMAGE" >/dev/null 2>&1 || build >&2
    run dvc repro "$@" >&2
    # The base's figures as a commit, so `dvc metrics diff` here can name them.
    git add --all
    git -c user.name=neuromanifold-gpt -c user.email=neuromanifold-gpt@localhost \
      commit --quiet --allow-empty -m "figures of $sha measured on this machine"
  )
  git fetch --quiet "$base" HEAD
  measured=$(git rev-parse FETCH_HEAD)
  head_on=$(devices .)
  base_on=$(devices "$base")
  if [[ $head_on != "$base_on" ]]; then
    echo "error: the base's figures come from $base_on and this checkout's from $head_on;" \
      "measure both here: run \`repro\` before \`compare\`, both with --force" >&2
    return 1
  fi
  echo "Base \`${sha:0:12}\` (its figures measured here: column \`${measured:0:12}\`) against" \
    "head \`$(git rev-parse --short=12 HEAD)\`, both measured on this machine in one run: $head_on."
  echo
  run dvc metrics diff "$measured" --targets metrics/verify.json --md
}

case ${1:-} in
  build) build ;;
  check) run python3 -c "import neuromanifold_gpt, torch; print(torch.__version__, torch.cuda.is_available())" ;;
  repro) run dvc repro "${@:2}" ;;
  diff) run dvc metrics diff main --targets metrics/verify.json ;;
  compare) compare "${@:2}" ;;
  reclaim) docker run --rm --user 0:0 -v "$PWD":/work "$IMAGE" chown -R "$(id -u):$(id -g)" /work ;;
  *)
    echo "error: unknown phase '${1:-}'; use build, check, repro, diff, compare or reclaim" >&2
    exit 2
    ;;
esac
