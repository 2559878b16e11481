#!/usr/bin/env bash
# The first command on a fresh Debian machine (12 or newer), as root:
#
#   ./lab.sh --install   install the Debian packages the lab needs that are
#                        missing, build, and run the lab (target/debug/raven-lab)
#   ./lab.sh             the same, but never installs: it names every missing
#                        tool with the exact apt-get line and exits 1 before
#                        building anything
#
# Other arguments go to raven-lab (`--keep`, `down`). Rust (cargo) 1.89 or
# newer is needed and is not a Debian package (Debian 12 ships 1.63): without
# it the script says how to get it (rustup) and stops.
set -euo pipefail
cd "$(dirname "$0")"

install=0
args=()
for a in "$@"; do
  case "$a" in
    --install) install=1 ;;
    *) args+=("$a") ;;
  esac
done

if [ "$(id -u)" != 0 ]; then
  echo "the lab builds network namespaces and needs root: sudo $0 $*" >&2
  exit 1
fi

# Debian tools: tests/lab-tools.txt (raven-lab checks the same list).
missing_tools=()
missing_pkgs=()
while read -r tool pkg; do
  case "$tool" in '' | '#'*) continue ;; esac
  if ! command -v "$tool" >/dev/null 2>&1; then
    missing_tools+=("$tool (Debian package $pkg)")
    case " ${missing_pkgs[*]} " in *" $pkg "*) ;; *) missing_pkgs+=("$pkg") ;; esac
  fi
done < tests/lab-tools.txt
# Building needs a C compiler and linker as well (ring, the libc bindings).
if ! command -v cc >/dev/null 2>&1; then
  missing_tools+=("cc (Debian packages gcc libc6-dev)")
  missing_pkgs+=(gcc libc6-dev)
fi

if [ ${#missing_pkgs[@]} -gt 0 ]; then
  apt_line="apt-get install -y --no-install-recommends ${missing_pkgs[*]}"
  if [ "$install" = 1 ]; then
    echo "--- installing ${missing_pkgs[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $apt_line
  else
    echo "the lab needs tools this machine does not have:" >&2
    printf '  %s\n' "${missing_tools[@]}" >&2
    echo "install them with:" >&2
    echo "  $apt_line" >&2
    echo "(or run $0 --install, which does that and goes on)" >&2
    exit 1
  fi
fi

# Rust: the workspace's rust-version, from Cargo.toml.
need=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml)
if [ -z "${CARGO:-}" ]; then
  CARGO=$(command -v cargo || true)
  [ -z "$CARGO" ] && [ -x "$HOME/.cargo/bin/cargo" ] && CARGO="$HOME/.cargo/bin/cargo"
fi
have=""
if [ -n "$CARGO" ]; then
  have=$("$CARGO" --version 2>/dev/null | awk '{print $2}' | cut -d- -f1)
fi
if [ -z "$have" ] || [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -1)" != "$need" ]; then
  echo "raven needs Rust $need or newer (cargo: ${have:-not found}); Debian's rustc is older." >&2
  echo "install it with rustup (https://rustup.rs), then run this again:" >&2
  echo "  apt-get install -y --no-install-recommends curl ca-certificates gcc libc6-dev" >&2
  echo "  curl --proto '=https' -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal" >&2
  echo "  . \"\$HOME/.cargo/env\"" >&2
  exit 1
fi

"$CARGO" build --workspace --bins
exec "${CARGO_TARGET_DIR:-target}"/debug/raven-lab "${args[@]}"
