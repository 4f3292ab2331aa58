#!/usr/bin/env bash
# Builds a QEMU guest (kernel + uncompressed cpio initramfs) from Debian packages for the
# interop tests: busybox, nvme-cli, fio, the NVMe/TCP host and target modules. See README.md.
#
#   tests/guest/build.sh FLAVOUR OUTDIR     FLAVOUR: bookworm (6.1) | backports (6.12)
#   tests/guest/build.sh --host-packages    only install the host packages (scripts/setup)
#
# Writes OUTDIR/vmlinuz, OUTDIR/vmlinux (the same kernel uncompressed, when it has a PVH entry:
# QEMU boots it directly, which saves the seconds TCG spends decompressing), OUTDIR/initramfs.cpio, OUTDIR/kernel-release, OUTDIR/manifest and
# OUTDIR/key (last). Idempotent: when OUTDIR/key matches the inputs (this directory's files and
# the package versions), it does nothing. Downloads go to OUTDIR/debs. Needs root only to install
# host packages, add the backports apt source or update the apt lists.
set -euo pipefail
export LC_ALL=C DEBIAN_FRONTEND=noninteractive

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Modules the guest needs (each with its dependencies; built-in ones are skipped).
MODULES="virtio_pci virtio_net virtio_blk 9pnet_virtio 9p configfs crc32c_generic
  nvme-core nvme-fabrics nvme-tcp nvme nvmet nvmet-tcp null_blk brd vfio vfio-pci vfio_iommu_type1
  ext4 softdog"
# Host packages whose files go into the initramfs (their versions are part of the cache key).
USERLAND_PKGS="busybox-static nvme-cli fio"
# Host tools the build and the harness use: package:command.
HOST_TOOLS="qemu-system-x86:qemu-system-x86_64 busybox-static:busybox nvme-cli:nvme fio:fio
  kmod:depmod cpio:cpio xz-utils:xz zstd:zstd binutils:readelf"

log() { echo "guest-build: $*" >&2; }
die() { echo "guest-build: error: $*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root to $1"; }

# apt quietly; its output is shown only when it fails. Waits for a dpkg lock held by others.
apt_quiet() {
  local out rc=0
  out=$(mktemp)
  apt-get -o DPkg::Lock::Timeout=600 "$@" >"$out" 2>&1 || rc=$?
  [ "$rc" = 0 ] || tail -n 30 "$out" >&2
  rm -f "$out"
  return "$rc"
}

apt_updated=0
apt_update() {
  if [ "$apt_updated" = 0 ]; then
    need_root "run apt-get update"
    log "apt-get update"
    apt_quiet update -qq || die "apt-get update failed"
    apt_updated=1
  fi
}

# bookworm-backports carries QEMU 10 and the 6.12 kernel.
ensure_backports_source() {
  if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    need_root "add a bookworm-backports apt source"
    log "adding a bookworm-backports apt source"
    cat >/etc/apt/sources.list.d/bookworm-backports.sources <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    apt_updated=0
    apt_update
  fi
}

ensure_host_packages() {
  # One installer at a time (two flavours may build at once).
  exec 8>"${TMPDIR:-/tmp}/duplex-guest-host-packages.lock"
  flock 8
  ensure_backports_source
  local need=() qemu=() entry
  for entry in $HOST_TOOLS; do
    if ! command -v "${entry#*:}" >/dev/null 2>&1 \
      || ! dpkg-query -W -f='${Status}' "${entry%%:*}" 2>/dev/null | grep -q 'ok installed'; then
      if [ "${entry%%:*}" = qemu-system-x86 ]; then qemu+=(qemu-system-x86); else need+=("${entry%%:*}"); fi
    fi
  done
  if [ ${#need[@]} -gt 0 ] || [ ${#qemu[@]} -gt 0 ]; then
    need_root "install ${need[*]} ${qemu[*]}"
    log "installing ${need[*]} ${qemu[*]}"
    apt_update
    if [ ${#qemu[@]} -gt 0 ]; then
      apt_quiet install -y -qq --no-install-recommends -t bookworm-backports "${qemu[@]}" \
        || die "installing qemu-system-x86 from bookworm-backports failed"
    fi
    if [ ${#need[@]} -gt 0 ]; then
      apt_quiet install -y -qq --no-install-recommends "${need[@]}" \
        || die "installing ${need[*]} failed"
    fi
  fi
  exec 8>&-
}

# The kernel package that linux-image-amd64 of the flavour's suite depends on: "NAME VERSION".
kernel_package() {
  local meta
  case "$flavour" in
    backports) meta=$(apt-cache madison linux-image-amd64 | awk -F'|' '$3 ~ /bookworm-backports/ {gsub(/ /,"",$2); print $2; exit}') ;;
    bookworm) meta=$(apt-cache madison linux-image-amd64 | awk -F'|' '$3 !~ /backports/ {gsub(/ /,"",$2); print $2; exit}') ;;
  esac
  [ -n "$meta" ] || return 1
  apt-cache show "linux-image-amd64=$meta" | sed -n 's/^Depends: //p' | head -n1 \
    | sed -E 's/^([^ ,]+) \(= ([^)]+)\).*/\1 \2/'
}

if [ "${1:-}" = --host-packages ]; then
  ensure_host_packages
  exit 0
fi

[ $# -eq 2 ] || die "usage: $0 bookworm|backports OUTDIR  (or $0 --host-packages)"
flavour=$1
case "$flavour" in bookworm | backports) ;; *) die "unknown flavour '$flavour' (bookworm|backports)" ;; esac
mkdir -p "$2"
out=$(cd "$2" && pwd)

# One build per output directory at a time; a second caller waits, then finds the cache.
exec 9>"$out/.lock"
flock 9

ensure_host_packages

kpkg=$(kernel_package || true)
if [ -z "$kpkg" ]; then
  apt_update
  kpkg=$(kernel_package || true)
fi
[ -n "$kpkg" ] || die "no linux-image-amd64 for flavour $flavour in the apt lists"
kname=${kpkg% *}
kver=${kpkg#* }

versions="kernel $kname $kver"
for p in $USERLAND_PKGS; do
  versions+=$'\n'"$p $(dpkg-query -W -f='${Version}' "$p")"
done
key=$(
  {
    printf '%s\n' "$flavour" "$MODULES" "$versions"
    cat "$here/build.sh" "$here/init"
  } | sha256sum | cut -d' ' -f1
)

if [ -f "$out/key" ] && [ "$(cat "$out/key")" = "$key" ] \
  && [ -f "$out/vmlinuz" ] && [ -f "$out/initramfs.cpio" ]; then
  log "$flavour: cached ($(cat "$out/kernel-release"), key ${key:0:12})"
  exit 0
fi

start=$(date +%s)
log "$flavour: building ($kname $kver, key ${key:0:12})"
rm -f "$out/key"

# --- kernel package ------------------------------------------------------------------------
mkdir -p "$out/debs"
deb=$(find "$out/debs" -maxdepth 1 -name "${kname}_*.deb" | head -n1)
want_deb="$out/debs/${kname}_${kver//:/%3a}_amd64.deb"
if [ "$deb" != "$want_deb" ] || [ ! -s "$deb" ]; then
  rm -f "$out/debs/"*.deb
  log "downloading $kname=$kver"
  if ! (cd "$out/debs" && apt_quiet download -qq -o APT::Sandbox::User=root "$kname=$kver"); then
    # The lists may name a version the mirror no longer has: refresh them and start over once.
    [ -z "${DUPLEX_GUEST_BUILD_RETRY:-}" ] || die "apt-get download $kname=$kver failed"
    log "download failed; refreshing the apt lists and starting over"
    apt_update
    export DUPLEX_GUEST_BUILD_RETRY=1
    exec bash "$here/build.sh" "$flavour" "$out"
  fi
  deb=$(find "$out/debs" -maxdepth 1 -name "${kname}_*.deb" | head -n1)
fi
[ -s "$deb" ] || die "no kernel package in $out/debs"

work="$out/work"
rm -rf "$work"
mkdir -p "$work/kernel" "$work/root"
dpkg-deb -x "$deb" "$work/kernel"
release=$(ls "$work/kernel/lib/modules")
[ "$(echo "$release" | wc -l)" = 1 ] || die "expected one kernel release in $deb, found: $release"
kmods="$work/kernel/lib/modules/$release"
[ -f "$work/kernel/boot/vmlinuz-$release" ] || die "no vmlinuz-$release in $deb"
depmod -b "$work/kernel" "$release"

# --- modules -------------------------------------------------------------------------------
root="$work/root"
mkdir -p "$root/lib/modules/$release"
for m in $MODULES; do
  modprobe -d "$work/kernel" -S "$release" --show-depends "$m" \
    || die "module $m: not in $kname (neither a module nor built in)"
done | awk '!seen[$0]++' >"$work/depends"
builtin=$(awk '$1 == "builtin" {print $2}' "$work/depends" | xargs)
awk '$1 == "insmod" {print $2}' "$work/depends" | while read -r ko; do
  rel=${ko#"$kmods"/}
  dst="$root/lib/modules/$release/${rel%.xz}"
  dst=${dst%.zst}
  mkdir -p "$(dirname "$dst")"
  case "$ko" in
    *.ko.xz) xz -dc "$ko" >"$dst" ;;
    *.ko.zst) zstd -qdc "$ko" >"$dst" ;;
    *.ko) cp "$ko" "$dst" ;;
    *) die "unexpected module file $ko" ;;
  esac
done
for f in modules.builtin modules.builtin.modinfo modules.order; do
  [ -f "$kmods/$f" ] && cp "$kmods/$f" "$root/lib/modules/$release/"
done
depmod -b "$root" "$release"
nmods=$(find "$root/lib/modules" -name '*.ko' | wc -l)

# --- userland ------------------------------------------------------------------------------
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc/nvme,proc,sys,dev,run,tmp,mnt,share,root,var/tmp}
cp /bin/busybox "$root/bin/busybox"
for b in /bin/busybox /usr/sbin/nvme /usr/bin/fio; do
  [ -x "$b" ] || die "$b missing (package not installed?)"
done
copy_with_libs() {
  local bin=$1 lib
  mkdir -p "$root$(dirname "$bin")"
  cp -L "$bin" "$root$bin"
  # ldd resolves the whole closure; copy each library (dereferenced) under the path it was found.
  ldd "$bin" | awk '/=> \// {print $3} /^\t\/[^ ]+ \(/ {print $1}' | while read -r lib; do
    if [ ! -e "$root$lib" ]; then
      mkdir -p "$root$(dirname "$lib")"
      cp -L "$lib" "$root$lib"
    fi
  done
}
copy_with_libs /usr/sbin/nvme
copy_with_libs /usr/bin/fio
cp "$here/init" "$root/init"
chmod 755 "$root/init"
cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
EOF
echo 'root:x:0:' >"$root/etc/group"
echo 'hosts: files' >"$root/etc/nsswitch.conf"
printf '127.0.0.1 localhost\n10.0.2.2 host\n' >"$root/etc/hosts"
echo "$release" >"$root/etc/duplex-kernel"
echo "$builtin" >"$root/etc/duplex-builtin-modules"

# --- pack ----------------------------------------------------------------------------------
(cd "$root" && find . -mindepth 1 -print0 | sort -z \
  | cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) >"$work/initramfs.cpio"
cp "$work/kernel/boot/vmlinuz-$release" "$work/vmlinuz"
# The bzImage's payload (xz on 6.1, zstd on 6.12), if it is an ELF with a PVH entry note.
extract_vmlinux() {
  local magic=$1 tool=$2 off
  off=$(grep -obUaP "$magic" "$work/vmlinuz" | head -n1 | cut -d: -f1) || true
  [ -n "$off" ] || return 1
  tail -c +$((off + 1)) "$work/vmlinuz" | $tool -dcq >"$work/vmlinux" 2>/dev/null || true
  [ "$(head -c 4 "$work/vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] \
    && readelf -n "$work/vmlinux" 2>/dev/null | grep -q '(0x00000012)'
}
rm -f "$out/vmlinux"
if extract_vmlinux '\xfd\x37\x7a\x58\x5a\x00' xz || extract_vmlinux '\x28\xb5\x2f\xfd' zstd; then
  mv "$work/vmlinux" "$out/vmlinux"
  pvh="vmlinux (PVH entry) extracted"
else
  pvh="no PVH-bootable vmlinux (QEMU boots the bzImage)"
fi
{
  echo "flavour $flavour"
  echo "release $release"
  echo "$versions"
  echo "modules $nmods (built in: ${builtin:-none})"
  echo "$pvh"
} >"$work/manifest"
mv "$work/vmlinuz" "$out/vmlinuz"
mv "$work/initramfs.cpio" "$out/initramfs.cpio"
mv "$work/manifest" "$out/manifest"
echo "$release" >"$out/kernel-release"
rm -rf "$work"
echo "$key" >"$out/key"
size=$(du -m "$out/initramfs.cpio" | cut -f1)
log "$flavour: built $release, $nmods modules, initramfs ${size} MiB in $(($(date +%s) - start)) s"
