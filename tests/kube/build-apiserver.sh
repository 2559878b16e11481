#!/usr/bin/env bash
# Builds kube-apiserver v1.20.2 from Debian bookworm's `kubernetes` source package
# (the only complete Kubernetes tree reachable from these machines) and caches the
# binary outside the work tree. Reuses the cached binary when present.
#
#   tests/kube/build-apiserver.sh        # prints the binary's path
#
# Cache: $RAVEN_KUBE_CACHE (default /var/cache/raven-kube). Needs root for apt.
# Costs 6-11 min on 2 cores the first time, ~1.3 GB RSS, ~1.5 GB disk.
set -euo pipefail

VERSION=1.20.5+really1.20.2-1.1+deb12u1
GIT_VERSION=v1.20.2
CACHE=${RAVEN_KUBE_CACHE:-/var/cache/raven-kube}
BIN=$CACHE/bin/kube-apiserver-$GIT_VERSION
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi

log() { echo "build-apiserver: $*" >&2; }
export DEBIAN_FRONTEND=noninteractive
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
mkdir -p "$CACHE/bin" "$CACHE/src"

if [ ! -x /usr/lib/go-1.19/bin/go ]; then
  log "installing golang-1.19-go"
  $SUDO apt-get install -y -qq --no-install-recommends golang-1.19-go >/dev/null
fi

# Source package through a private apt configuration: the system's stays untouched.
APT=$CACHE/apt
if [ ! -f "$CACHE/src/kubernetes_${VERSION%%-*}.orig.tar.gz" ] && ! ls "$CACHE"/src/kubernetes_*.orig.tar.gz >/dev/null 2>&1; then
  log "fetching the kubernetes source package"
  mkdir -p "$APT/lists/partial"
  cat >"$APT/sources.list" <<SRC
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-updates main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
SRC
  opts=(-o "Dir::Etc::SourceList=$APT/sources.list" -o Dir::Etc::SourceParts=/nonexistent
        -o "Dir::State::Lists=$APT/lists" -o Debug::NoLocking=1)
  apt-get "${opts[@]}" -qq update
  (cd "$CACHE/src" && apt-get "${opts[@]}" -qq source --download-only "kubernetes=$VERSION")
fi
ORIG=$(ls "$CACHE"/src/kubernetes_*.orig.tar.gz | head -1)

GOPATH=$CACHE/gopath
TREE=$GOPATH/src/k8s.io/kubernetes
if [ ! -f "$TREE/.unpacked" ]; then
  log "unpacking $(basename "$ORIG")"
  rm -rf "$TREE"; mkdir -p "$TREE"
  tar -xzf "$ORIG" -C "$TREE" --strip-components=1
  # vendor/github.com/modern-go/reflect2 1.0.1 breaks on Go >= 1.18: take Debian's 1.0.2.
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download -qq golang-github-modern-go-reflect2-dev && dpkg -x ./*.deb x)
  r2=$TREE/vendor/github.com/modern-go/reflect2
  rm -f "$r2"/*.go "$r2"/*.s
  cp "$tmp"/x/usr/share/gocode/src/github.com/modern-go/reflect2/*.go "$r2"/
  cp "$tmp"/x/usr/share/gocode/src/github.com/modern-go/reflect2/*.s "$r2"/ 2>/dev/null || true
  rm -rf "$tmp"
  touch "$TREE/.unpacked"
fi

export PATH=/usr/lib/go-1.19/bin:$PATH GOPATH GO111MODULE=off GOPROXY=off CGO_ENABLED=0
export GOCACHE=$CACHE/gocache GOFLAGS=
cd "$TREE"

OPENAPI=pkg/generated/openapi/zz_generated.openapi.go
if [ ! -f "$OPENAPI" ]; then
  log "generating $OPENAPI"
  go build -o "$CACHE/bin/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
  # Every package carrying a +k8s:openapi-gen= tag, as upstream's Makefile finds them:
  # the tree without vendor/, plus the staging repositories (seen through vendor/k8s.io).
  # The staging repositories are the vendor/k8s.io entries that link into staging/.
  staging=$(find vendor/k8s.io -maxdepth 1 -type l | sort)
  pkgs=$( { find . -path ./vendor -prune -o -path ./staging -prune -o -name '*.go' -print;
            for s in $staging; do find -L "./$s" -name '*.go'; done; } \
          | { xargs grep -l -e '+k8s:openapi-gen=' 2>/dev/null || true; } | xargs -n1 dirname \
          | sort -u | grep -v -e vendor/k8s.io/code-generator -e vendor/k8s.io/sample-apiserver \
          | sed -e 's|^\./|k8s.io/kubernetes/|' | paste -sd, -)
  "$CACHE/bin/openapi-gen" --input-dirs "$pkgs" \
    --output-package k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
    --go-header-file hack/boilerplate/boilerplate.generatego.txt \
    --output-base "$GOPATH/src" --report-filename "$CACHE/api-rules.report" >&2
  # The API-rule report equals upstream's list when the inputs are upstream's.
  if ! diff -q "$CACHE/api-rules.report" api/api-rules/violation_exceptions.list >/dev/null; then
    log "warning: API rule report differs from api/api-rules/violation_exceptions.list"
  fi
fi

# The source archive's version strings say v0.0.0-master (git archive substitution), and
# -X cannot override initialised variables here: write the release's version in place.
for f in staging/src/k8s.io/component-base/version/base.go staging/src/k8s.io/client-go/pkg/version/base.go; do
  sed -i -e "s|^\(\s*gitVersion\s*\(string\s*\)\?=\s*\)\"[^\"]*\"|\1\"$GIT_VERSION\"|" \
         -e "s|^\(\s*gitMajor\s\+string\)\(\s*=\s*\"[^\"]*\"\)\?|\1 = \"1\"|" \
         -e "s|^\(\s*gitMinor\s\+string\)\(\s*=\s*\"[^\"]*\"\)\?|\1 = \"20\"|" \
         -e "s|^\(\s*gitTreeState\s*\(string\s*\)\?=\s*\)\"\"|\1\"clean\"|" "$f"
done

log "building kube-apiserver $GIT_VERSION (6-11 min on 2 cores)"
go build -o "$BIN.tmp" -ldflags "-s -w" ./cmd/kube-apiserver
mv "$BIN.tmp" "$BIN"
echo "$BIN"
