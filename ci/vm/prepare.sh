# Sourced by ci/vm/run and ci/demo --vm: what a guest needs before it boots.
#   vm_tools            QEMU (at least 10.0.2, from bookworm-backports), socat and mmdebstrap
#   vm_inputs BIN DIR   cps-attach BIN stripped to DIR/cps-attach (what the guests download) and
#                       the node's user data rendered by the Terraform module to DIR/user-data
#                       (ext4, the module's default) and DIR/user-data-xfs; exports CPS_VM_ATTACH,
#                       CPS_VM_USER_DATA and CPS_VM_USER_DATA_XFS for the bench
# The guest image itself is built (or found) by ci/vm/image, which the bench runs.

# QEMU from bookworm-backports, at least 10.0.2 (proven with 1:10.0.2+ds-2+deb13u1~bpo12+1): its
# NVMe controller hot-plugs into a PCIe root port and, removed, comes back under the same id
# (both used here); Debian 12's own 7.2 is not what the tier was proven with. Backports keeps
# only its newest upload, so the floor is pinned, not the exact version; the run logs which.
vm_qemu_floor='1:10.0.2'

vm_tools() {
  local have
  have=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
  if [ -n "$have" ] && dpkg --compare-versions "$have" ge "$vm_qemu_floor" \
    && command -v socat >/dev/null && command -v mmdebstrap >/dev/null; then
    echo "ci/vm: QEMU $have" >&2
    return
  fi
  echo "ci/vm: installing qemu-system-x86 (bookworm-backports, >= $vm_qemu_floor), socat, mmdebstrap" >&2
  if [ ! -f /etc/apt/sources.list.d/cps-backports.sources ]; then
    printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm-backports' \
      'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' \
      >/etc/apt/sources.list.d/cps-backports.sources
  fi
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -t bookworm-backports qemu-system-x86 socat mmdebstrap >/dev/null
  have=$(dpkg-query -W -f='${Version}' qemu-system-x86)
  dpkg --compare-versions "$have" ge "$vm_qemu_floor" \
    || { echo "ci/vm: bookworm-backports gave QEMU $have, older than $vm_qemu_floor" >&2; return 1; }
  echo "ci/vm: QEMU $have" >&2
}

vm_inputs() {
  local bin=$1 dir=$2 sha256
  [ -x "$bin" ] || { echo "ci/vm: $bin is missing" >&2; return 1; }
  # Stripped as a release is: the guests download it through QEMU's user network.
  objcopy --strip-all "$bin" "$dir/cps-attach"
  sha256=$(sha256sum "$dir/cps-attach" | cut -d' ' -f1)
  (
    export TF_CLI_CONFIG_FILE="$PWD/ci/terraform/cli.tfrc" TF_IN_AUTOMATION=1 CHECKPOINT_DISABLE=1
    export TF_DATA_DIR="$dir/tf"
    tf() { terraform -chdir=terraform/tests/vm "$@" -no-color; }
    tf init -backend=false -input=false >/dev/null
    for fs in ext4 xfs; do
      tf apply -auto-approve -input=false -state="$dir/vm-$fs.tfstate" -var "file_system_type=$fs" \
        -var "cps_attach_url=http://169.254.170.3/cps-attach" -var "cps_attach_sha256=$sha256" >/dev/null
      tf output -state="$dir/vm-$fs.tfstate" -raw user_data >"$dir/user-data-$fs"
    done
    mv "$dir/user-data-ext4" "$dir/user-data"
  )
  export CPS_VM_ATTACH="$dir/cps-attach" CPS_VM_USER_DATA="$dir/user-data" \
    CPS_VM_USER_DATA_XFS="$dir/user-data-xfs"
}
