# Sourced by ci/release: installs the release build's tools, each only when missing.
#  - Debian packages: file, rpm (rpmbuild), lintian, mmdebstrap, qemu-user-static (the aarch64
#    binary run here), systemd (systemd-analyze), python3-venv
#  - the Rust musl targets (rustup target add)
#  - zig and cargo-zigbuild, pinned by ci/release.d/requirements.txt, in a venv under the bench
#    cache: zig is the C compiler and linker for both musl targets (the SDK's aws-lc is C)
#  - actionlint and the image recipe's schema validator, pinned by ci/release.d/lint.txt

release_cache="${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/cps-bench"

# A venv holding exactly a requirements file; rebuilt only when the file changes.
release_venv() {
  local venv=$1 requirements=$2 want
  want=$(sha256sum "$requirements" | cut -d' ' -f1)
  if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" = "$want" ]; then
    return
  fi
  say "creating the venv at $venv (from $requirements)"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --only-binary :all: -r "$requirements"
  echo "$want" >"$venv/.requirements.sha256"
}

release_tools() {
  export PATH="$PATH:/usr/sbin:/sbin"
  declare -A tools=(
    [file]=file [readelf]=binutils [rpmbuild]=rpm [lintian]=lintian [mmdebstrap]=mmdebstrap
    [qemu-aarch64-static]=qemu-user-static [systemd-analyze]=systemd [dpkg-deb]=dpkg
    [man]=man-db [xz]=xz-utils
  )
  local missing=() tool
  for tool in "${!tools[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("${tools[$tool]}")
  done
  python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
  if ((${#missing[@]})); then
    if [ "$(id -u)" -ne 0 ]; then
      # ci/test's fast path may skip locally (one line), never under CI=true.
      if [ "${mode:-}" = quick ] && [ "${CI:-}" != "true" ]; then
        say "SKIP the release packaging check: missing packages ${missing[*]}; run as root to install them"
        exit 0
      fi
      say "missing packages: ${missing[*]}; run as root to install them" >&2
      exit 1
    fi
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  local arch installed
  installed=$(rustup target list --installed)
  for arch in "$@"; do
    grep -qx "$arch-unknown-linux-musl" <<<"$installed" \
      || rustup target add "$arch-unknown-linux-musl"
  done
  local zig="${CPS_ZIG_VENV:-$release_cache/zig-0.17.0}"
  release_venv "$zig" ci/release.d/requirements.txt
  release_venv "${CPS_RELEASE_LINT_VENV:-$release_cache/release-lint-1}" ci/release.d/lint.txt
  export PATH="$zig/bin:$PATH"
  export CPS_RELEASE_LINT_BIN="${CPS_RELEASE_LINT_VENV:-$release_cache/release-lint-1}/bin"
}
