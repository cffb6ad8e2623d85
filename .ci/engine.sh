# Sourced by .ci/image and .ci/cuda-image, from the checkout's root: a container engine that works
# on this machine, the Dockerfile's base or a stand-in for it, and an EXIT trap that removes what
# the run added to the machine, after a failure or an interrupt too.
#
# The engine is Docker where it answers (a GitHub-hosted runner), else podman, installed with apt
# (a Debian machine run as root, with no Docker daemon). Commands that need root run as they are
# where the caller is root, else through `sudo -n`. Where the Dockerfile's python base cannot be
# pulled (no image registry in reach), a stand-in made from Debian's archive (.ci/base.Dockerfile)
# takes its place, named by BASE_IMAGE.
as_root=()
[[ $EUID -eq 0 ]] || as_root=(sudo -n)
engine_conf=/etc/containers/containers.conf.d/neuromanifold-ci.conf
stand_in=localhost/python:3.11-bookworm
stand_in_root=localhost/debian:bookworm
work=$(mktemp -d /var/tmp/neuromanifold-image.XXXXXX)
chmod 755 "$work"
added=()  # what this run added to the machine, for the EXIT trap: KIND:NAME (apt's: .ci/apt-tools)
images_before=()
engine=()
podman_added=

# The tools' chatter (mmdebstrap's, the stand-in's certificate rehash) goes to a log that is
# printed only when the step fails.
quietly() {
  local log=$work/$1.log
  "${@:2}" >"$log" 2>&1 || { cat "$log" >&2; return 1; }
}

cleanup() {
  local rc=$? entry image
  trap - EXIT INT TERM
  set +e
  echo "== cleanup"
  if ((${#engine[@]})); then
    # The images that were not there before: those built, imported or pulled, and their layers.
    for image in $("${engine[@]}" image ls -a -q --no-trunc); do
      [[ " ${images_before[*]} " == *" $image "* ]] && continue
      "${engine[@]}" ps -aq --filter "ancestor=$image" | xargs -r "${engine[@]}" rm -f >/dev/null
      "${engine[@]}" rmi -f "$image" >/dev/null 2>&1
    done
  fi
  wait  # for the phase that an interrupt left, now that its container is gone
  # podman's storage, where this run installed podman: nothing of it was there before.
  [[ -n $podman_added ]] && "${as_root[@]}" podman system reset --force >/dev/null 2>&1
  for entry in "${added[@]}"; do
    case $entry in
      user:*) "${as_root[@]}" userdel --remove "${entry#user:}" 2>/dev/null ;;
      file:*) "${as_root[@]}" rm -f "${entry#file:}" ;;
    esac
  done
  [[ -d $work/apt ]] && "${as_root[@]}" bash .ci/apt-tools remove "$work/apt"
  "${as_root[@]}" rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

times=()
phase() {  # phase NAME COMMAND...: run it, record its wall time
  local start=$SECONDS
  echo "== $1"
  "${@:2}"
  times+=("$(printf '%-10s %4d s' "$1" $((SECONDS - start)))")
}

apt_install() {  # the packages among $@ that are missing, installed for this run
  "${as_root[@]}" bash .ci/apt-tools add "$work/apt" "$@"
}

install() {
  if docker info >/dev/null 2>&1; then
    engine=(docker)
  else
    command -v podman >/dev/null || podman_added=1
    apt_install podman runc
    # crun, podman's default runtime on bookworm, fails where the cgroups are hybrid and
    # setrlimit is refused; runc works once the limits are explicit.
    if [[ ! -e $engine_conf ]]; then
      added+=("file:$engine_conf")
      "${as_root[@]}" mkdir -p "$(dirname "$engine_conf")"
      printf '%s\n' '[containers]' 'default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]' \
        '[engine]' 'runtime = "runc"' | "${as_root[@]}" tee "$engine_conf" >/dev/null
    fi
    engine=("${as_root[@]}" podman)
  fi
  echo "engine: ${engine[*]}"
  mapfile -t images_before < <("${engine[@]}" image ls -a -q --no-trunc)
}

# The Dockerfile's python base, pulled; where no registry answers, the stand-in.
base() {
  local pinned
  pinned=$(sed -n 's/^ARG BASE=//p' Dockerfile)
  if timeout 300 "${engine[@]}" pull --quiet "$pinned" >/dev/null 2>"$work/pull.log"; then
    echo "base: $pinned"
    return
  fi
  echo "base: $pinned cannot be pulled ($(tail -1 "$work/pull.log")); a stand-in from Debian's archive"
  BASE_IMAGE=$stand_in
  "${engine[@]}" image inspect "$stand_in" >/dev/null 2>&1 && return
  apt_install mmdebstrap
  mkdir -p "$work/base"
  # The suite and mirrors apt uses here.
  quietly mmdebstrap "${as_root[@]}" mmdebstrap --quiet --variant=minbase --mode=root bookworm \
    "$work/rootfs.tar" /etc/apt/sources.list.d/debian.sources
  "${engine[@]}" import --quiet "$work/rootfs.tar" "$stand_in_root" >/dev/null
  # This machine's extra CA certificates, which its HTTPS to PyPI needs (none: an empty folder).
  cp /usr/local/share/ca-certificates/*.crt "$work/base/" 2>/dev/null || touch "$work/base/none.crt"
  quietly base-build "${engine[@]}" build -t "$stand_in" -f .ci/base.Dockerfile "$work/base"
}
