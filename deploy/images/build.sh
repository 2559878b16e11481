#!/usr/bin/env bash
# Builds raven's OCI images with podman, from Debian packages (no registry needed):
#
#   localhost/raven-hub:TAG           raven-hub; glibc only; runs as 65532
#   localhost/raven-edge:TAG          raven-edge + iptables/ip6tables (nft, and legacy on PATH
#                                     /usr/lib/raven/iptables-legacy) — the only commands it runs
#   localhost/raven-wireguard-go:TAG  wireguard-go alone, for the raven-wireguard DaemonSet
#
#   deploy/images/build.sh [--binaries DIR] [--tag TAG] [--label K=V] [--save DIR] [--print-conf]
#
# Without --binaries it builds stripped release binaries with cargo (CARGO_TARGET_DIR is
# honoured). Each image's root filesystem is made by mmdebstrap (variant `extract`: the
# listed packages and their dependencies, unpacked; no shell, no dpkg, no apt) and imported as
# localhost/raven-base-NAME:KEY, KEY being a hash of everything that goes into it. Bases and
# images are cached (tarballs under $RAVEN_IMAGE_CACHE, default /var/cache/raven-images; images
# in podman's storage) and reused while their inputs are unchanged; RAVEN_IMAGES_REFRESH=1
# rebuilds the bases (to pick up Debian updates). --save DIR writes each image as an OCI archive
# (DIR/raven-NAME-TAG.oci.tar) to load into a cluster's runtime or push to a registry.
#
# podman needs two settings on these machines (runc, and explicit rlimits below the hard limit):
# unless CONTAINERS_CONF is set, the script writes them to $RAVEN_IMAGE_CACHE/containers.conf
# and uses that (--print-conf prints the path and exits).
set -euo pipefail
shopt -s inherit_errexit
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${RAVEN_IMAGE_CACHE:-/var/cache/raven-images}
suite=bookworm
mirror=${RAVEN_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${RAVEN_DEBIAN_SECURITY:-http://deb.debian.org/debian-security}

binaries="" tag="" save="" labels=() print_conf=""
while [ $# -gt 0 ]; do
  case $1 in
  --binaries) binaries=${2:?}; shift 2 ;;
  --tag) tag=${2:?}; shift 2 ;;
  --label) labels+=("${2:?}"); shift 2 ;;
  --save) save=${2:?}; shift 2 ;;
  --print-conf) print_conf=1; shift ;;
  *) echo "build.sh: unknown argument $1 (see the comment at the top)" >&2; exit 2 ;;
  esac
done
mkdir -p "$cache"

if [ -z "${CONTAINERS_CONF:-}" ]; then
  nofile=$(ulimit -Hn); [ "$nofile" = unlimited ] && nofile=1048576
  cat >"$cache/containers.conf.new" <<CONF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
  mv "$cache/containers.conf.new" "$cache/containers.conf"
  export CONTAINERS_CONF=$cache/containers.conf
fi
if [ -n "$print_conf" ]; then echo "$CONTAINERS_CONF"; exit 0; fi
for t in podman mmdebstrap; do
  command -v "$t" >/dev/null || { echo "build.sh: $t not found (apt-get install -y --no-install-recommends podman buildah mmdebstrap runc uidmap containernetworking-plugins)" >&2; exit 1; }
done

version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -1)
tag=${tag:-$version}
revision=$(git -C "$repo" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)

if [ -z "$binaries" ]; then
  echo "--- cargo build --release (stripped)"
  (cd "$repo" && CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build --release --locked -p raven-hub -p raven-edge --bins)
  binaries=${CARGO_TARGET_DIR:-$repo/target}/release
fi

# The root filesystems. Variant `extract` runs no maintainer scripts, so what they would do
# is done here: iptables' alternatives (nft by default, like Debian), the directories the
# programs expect.
base_packages_hub="libc6 libgcc-s1 base-files netbase"
base_packages_edge="libc6 libgcc-s1 base-files netbase iptables"
base_packages_wireguard_go="libc6 base-files wireguard-go"
base_hook_edge='cd "$1/usr/sbin"
for f in iptables ip6tables; do for s in "" -restore -save; do ln -sf "$f-nft$s" "$f$s"; done; done
mkdir -p "$1/usr/lib/raven/iptables-legacy"
for f in iptables ip6tables; do for s in "" -restore -save; do
  ln -sf "/usr/sbin/$f-legacy$s" "$1/usr/lib/raven/iptables-legacy/$f$s"; done; done
rm -f "$1"/usr/sbin/arptables* "$1"/usr/sbin/ebtables* "$1"/usr/sbin/*-apply "$1"/usr/sbin/nfnl_osf \
  "$1"/usr/lib/*/xtables/libebt_* "$1"/usr/lib/*/xtables/libarpt_*'
base_hook_common='mkdir -p "$1/run" "$1/tmp" "$1/var/lib" "$1/var/run"; chmod 1777 "$1/tmp"
rm -rf "$1/usr/share/doc" "$1/usr/share/man" "$1/usr/share/lintian"'

# base NAME: makes (or reuses) localhost/raven-base-NAME:KEY; prints that reference.
base() {
  local name=$1 pkgs hook key ref tar
  local pkgs_var=base_packages_${name//-/_} hook_var=base_hook_${name//-/_}
  pkgs=${!pkgs_var}
  hook=${!hook_var:-}
  key=$(printf '%s\n' "$suite" "$mirror" "$security" "$pkgs" "$hook" "$base_hook_common" "$(declare -f base)" | sha256sum | cut -c1-16)
  ref=localhost/raven-base-$name:$key
  tar=$cache/base-$name-$key.tar
  if [ -n "${RAVEN_IMAGES_REFRESH:-}" ]; then rm -f "$tar"; podman rmi -f "$ref" >/dev/null 2>&1 || true; fi
  if podman image exists "$ref"; then echo "$ref"; return; fi
  if [ ! -s "$tar" ]; then
    rm -f "$cache"/partial-"$name"-*.tar
    echo "--- mmdebstrap $name: $pkgs" >&2
    mmdebstrap --quiet --variant=extract --include="${pkgs// /,}" \
      --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
      --aptopt='Acquire::Check-Valid-Until "false"' \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
      ${hook:+--extract-hook="$hook"} --extract-hook="$base_hook_common" \
      "$suite" "$cache/partial-$name-$key.tar" "deb $mirror $suite main" "deb $mirror $suite-updates main" \
      "deb $security $suite-security main" >"$cache/mmdebstrap-$name.log" 2>&1 \
      || { tail -30 "$cache/mmdebstrap-$name.log" >&2; echo "build.sh: mmdebstrap $name failed (log: $cache/mmdebstrap-$name.log)" >&2; exit 1; }
    mv "$cache/partial-$name-$key.tar" "$tar"
  fi
  podman import --quiet --change 'ENV PATH=/usr/sbin:/usr/bin' "$tar" "$ref" >/dev/null
  # Bases of earlier inputs are not used again: drop them (their images stay while an
  # application image still uses them).
  local old
  for old in $(podman images --format '{{.Repository}}:{{.Tag}}' "localhost/raven-base-$name"); do
    [ "$old" = "$ref" ] || podman rmi "$old" >/dev/null 2>&1 || true
  done
  find "$cache" -maxdepth 1 -name "base-$name-*.tar" ! -name "base-$name-$key.tar" -delete
  echo "$ref"
}

# image NAME CONTAINERFILE FILE...: builds localhost/NAME:$tag from the base and the files
# (copied into the build context), unless an image of that tag was built from the same inputs.
image() {
  local name=$1 containerfile=$2 base_ref=$3; shift 3
  local ctx inputs ref=localhost/$name:$tag f
  ctx=$(mktemp -d); trap 'rm -rf "$ctx"' RETURN
  for f in "$@"; do
    [ -x "$f" ] || { echo "build.sh: $f missing (build it, or pass --binaries DIR)" >&2; exit 1; }
    cp "$f" "$ctx/"; strip --strip-unneeded "$ctx/$(basename "$f")" 2>/dev/null || true
  done
  inputs=$( (echo "$base_ref" "${labels[@]}"; cat "$here/$containerfile"; find "$ctx" -type f -exec sha256sum {} + | cut -d' ' -f1 | sort) | sha256sum | cut -c1-16)
  if [ "$(podman image inspect --format '{{index .Labels "io.raven.inputs"}}' "$ref" 2>/dev/null)" = "$inputs" ]; then
    echo "$ref: unchanged (inputs $inputs)"
  else
    local args=(--quiet --pull=never --network=none --build-arg "BASE=$base_ref" --label "io.raven.inputs=$inputs"
      --label "org.opencontainers.image.version=$version" --label "org.opencontainers.image.revision=$revision")
    for l in "${labels[@]}"; do args+=(--label "$l"); done
    local old_id
    old_id=$(podman image inspect --format '{{.Id}}' "$ref" 2>/dev/null || true)
    podman build "${args[@]}" -f "$here/$containerfile" -t "$ref" "$ctx" >/dev/null
    # The image this tag named before, now untagged (kept while a container uses it).
    [ -z "$old_id" ] || podman rmi "$old_id" >/dev/null 2>&1 || true
    echo "$ref: built (inputs $inputs)"
  fi
  if [ -n "$save" ]; then
    mkdir -p "$save"
    podman save --quiet --format oci-archive -o "$save/$name-$tag.oci.tar" "$ref"
  fi
}

hub_base=$(base hub)
edge_base=$(base edge)
wireguard_go_base=$(base wireguard-go)
image raven-hub hub.Containerfile "$hub_base" "$binaries/raven-hub"
image raven-edge edge.Containerfile "$edge_base" "$binaries/raven-edge"
image raven-wireguard-go wireguard-go.Containerfile "$wireguard_go_base"
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "^localhost/raven-(hub|edge|wireguard-go):$tag " || true
