#!/usr/bin/env bash
# build-kit.sh [OUTDIR]
#
# Builds the guest kit used by the vhostd guest tests: a Debian 6.1 kernel
# (OUTDIR/vmlinuz) and a busybox initramfs (OUTDIR/initrd.cpio.gz) holding
# virtio + ext4 modules, fio, iperf3 and an /init that runs /test.sh.
# Also writes OUTDIR/vmlinux (the same kernel as an uncompressed ELF, booted
# by QEMU through PVH) and OUTDIR/initrd.cpio (uncompressed), which boot
# about twice as fast under TCG.
#
# OUTDIR defaults to <repo>/.cache/guest-kit. The kernel is fetched with
# `apt-get download` and unpacked with `dpkg-deb -x` (nothing is installed on
# the host). busybox, fio and iperf3 are taken from the host, so these Debian
# packages must be installed: busybox-static fio iperf3 cpio (plus apt, dpkg,
# gzip, util-linux, coreutils, findutils which every Debian has).
#
# Idempotent: if OUTDIR/stamp matches the hash of this script, the kernel
# package version and the versions of the host packages copied in, nothing is
# done. Every missing piece is a hard error (non-zero exit).
set -euo pipefail

die() {
  echo "build-kit.sh: ERROR: $*" >&2
  exit 1
}
note() { echo "build-kit.sh: $*" >&2; }

SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
SCRIPT_DIR=$(dirname "$SCRIPT_PATH")
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
OUTDIR=${1:-$REPO_ROOT/.cache/guest-kit}

# Modules to load, in this order (dependencies found with modinfo's
# `depends` field are inserted before their users automatically).
# crc32c_generic goes before jbd2/ext4 because both carry
# `softdep=pre: crypto-crc32c`.
MODULES=(
  virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
  virtio_blk failover net_failover virtio_net virtio_console virtio-rng
  crc16 mbcache crc32c_generic jbd2 ext4
)
# Host packages whose files are copied into the initramfs.
HOST_PKGS=(busybox-static fio iperf3 libc6)
HOST_BINS=(/usr/bin/fio /usr/bin/iperf3)

# ---------------------------------------------------------------- checks
for tool in apt-cache apt-get dpkg-deb dpkg-query cpio gzip ldd sha256sum \
  find flock readlink install; do
  command -v "$tool" >/dev/null 2>&1 ||
    die "required host tool '$tool' not found (apt-get install cpio gzip coreutils findutils util-linux libc-bin)"
done
for pkg in "${HOST_PKGS[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  [ "$status" = "install ok installed" ] ||
    die "Debian package '$pkg' is not installed on the host (apt-get install busybox-static fio iperf3 cpio)"
done
[ -x /bin/busybox ] || die "/bin/busybox missing (apt-get install busybox-static)"
for b in "${HOST_BINS[@]}"; do
  [ -x "$b" ] || die "$b missing (apt-get install fio iperf3)"
done

# Concrete kernel package that linux-image-amd64 depends on (one apt-cache
# call: the meta package pins it with "(= VERSION)").
META_DEPENDS=$(apt-cache show --no-all-versions linux-image-amd64 2>/dev/null |
  sed -n 's/^Depends: //p' | head -n1)
KPKG=$(tr ',|' '\n\n' <<<"$META_DEPENDS" |
  sed -n 's/^ *\(linux-image-6\.1\.[^ ]*-amd64\).*/\1/p' | head -n1)
[ -n "$KPKG" ] ||
  die "could not resolve linux-image-amd64 to a linux-image-6.1.*-amd64 package (run apt-get update; is this Debian 12?)"
KVER=$(tr ',|' '\n\n' <<<"$META_DEPENDS" |
  sed -n "s/^ *$KPKG (= \([^)]*\)).*/\1/p" | head -n1)
if [ -z "$KVER" ]; then
  KVER=$(apt-cache show --no-all-versions "$KPKG" 2>/dev/null |
    sed -n 's/^Version: //p' | head -n1)
fi
[ -n "$KVER" ] || die "apt-cache knows no version of $KPKG"
KREL=${KPKG#linux-image-}

STAMP_TEXT=$(
  echo "script $(sha256sum "$SCRIPT_PATH" | cut -d' ' -f1)"
  echo "kernel $KPKG $KVER"
  for pkg in "${HOST_PKGS[@]}"; do
    echo "host $pkg $(dpkg-query -W -f='${Version}' "$pkg")"
  done
)

mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
# Serialise concurrent builders (parallel test processes).
exec 9>"$OUTDIR/.lock"
flock 9

if [ -s "$OUTDIR/vmlinuz" ] && [ -s "$OUTDIR/initrd.cpio.gz" ] &&
  [ -s "$OUTDIR/vmlinux" ] && [ -s "$OUTDIR/initrd.cpio" ] &&
  [ -f "$OUTDIR/stamp" ] && [ "$(cat "$OUTDIR/stamp")" = "$STAMP_TEXT" ]; then
  note "kit up to date in $OUTDIR"
  exit 0
fi

note "building guest kit in $OUTDIR ($KPKG $KVER)"
WORK=$(mktemp -d "$OUTDIR/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root
mkdir -p "$ROOT"

# ---------------------------------------------------------------- kernel
DEBDIR=$OUTDIR/debs
mkdir -p "$DEBDIR"
DEB=$DEBDIR/${KPKG}_${KVER//:/%3a}_amd64.deb
if [ ! -s "$DEB" ]; then
  APT_OPTS=()
  # Running as root, apt drops to _apt, which cannot write to our temp dir.
  [ "$(id -u)" -eq 0 ] && APT_OPTS=(-o APT::Sandbox::User=root)
  (cd "$WORK" && apt-get "${APT_OPTS[@]}" -q download "$KPKG=$KVER") >&2 ||
    die "apt-get download $KPKG=$KVER failed"
  debs=("$WORK"/"${KPKG}"_*.deb)
  [ -s "${debs[0]}" ] || die "apt-get download produced no .deb for $KPKG"
  rm -f "$DEBDIR"/*.deb
  mv "${debs[0]}" "$DEB"
fi
dpkg-deb -x "$DEB" "$WORK/kpkg" || die "dpkg-deb -x $DEB failed"
VMLINUZ=$WORK/kpkg/boot/vmlinuz-$KREL
[ -s "$VMLINUZ" ] || die "$KPKG holds no boot/vmlinuz-$KREL"
MODDIR=
for d in "$WORK/kpkg/lib/modules/$KREL" "$WORK/kpkg/usr/lib/modules/$KREL"; do
  [ -d "$d" ] && MODDIR=$d
done
[ -n "$MODDIR" ] || die "$KPKG holds no lib/modules/$KREL"
[ -f "$MODDIR/modules.builtin" ] || die "$KPKG holds no modules.builtin"

# ---------------------------------------------------------------- modules
# Regex matching a module name where '-' and '_' are interchangeable.
name_re() { printf '%s' "$1" | sed 's/[-_]/[-_]/g'; }

mod_depends() { # FILE (uncompressed .ko) -> comma separated names
  if command -v modinfo >/dev/null 2>&1; then
    modinfo -F depends "$1"
  else
    # Same field, read straight from the .modinfo section strings.
    tr '\0' '\n' <"$1" | sed -n 's/^depends=//p' | head -n1
  fi
}

declare -A MOD_STATE=() # name -> visiting | done
LOAD_ORDER=()
BUILTIN=()
mkdir -p "$ROOT/lib/modules"

resolve_mod() {
  local name=$1 canon re file tmp deps dep
  canon=${name//-/_}
  case "${MOD_STATE[$canon]:-}" in
  done) return 0 ;;
  visiting) die "module dependency cycle at $name" ;;
  esac
  MOD_STATE[$canon]=visiting
  re=$(name_re "$name")
  if grep -Eq "/${re}\.ko$" "$MODDIR/modules.builtin"; then
    BUILTIN+=("$name")
    MOD_STATE[$canon]=done
    return 0
  fi
  file=$(find "$MODDIR/kernel" -regextype posix-extended \
    -regex ".*/${re}\.ko(\.xz|\.zst|\.gz)?" | head -n1)
  [ -n "$file" ] || die "module $name is neither built into $KREL nor shipped in $KPKG"
  tmp=$WORK/mod.$canon.ko
  case "$file" in
  *.ko) cp "$file" "$tmp" ;;
  *.ko.xz) command -v xz >/dev/null || die "$file is xz-compressed: apt-get install xz-utils"
    xz -dc "$file" >"$tmp" ;;
  *.ko.zst) command -v zstd >/dev/null || die "$file is zstd-compressed: apt-get install zstd"
    zstd -qdc "$file" >"$tmp" ;;
  *.ko.gz) gzip -dc "$file" >"$tmp" ;;
  esac
  deps=$(mod_depends "$tmp")
  for dep in ${deps//,/ }; do
    resolve_mod "$dep"
  done
  # busybox insmod gets a plain .ko, whatever the package ships.
  mv "$tmp" "$ROOT/lib/modules/$name.ko"
  LOAD_ORDER+=("$name")
  MOD_STATE[$canon]=done
}
for m in "${MODULES[@]}"; do resolve_mod "$m"; done
printf '%s\n' "${LOAD_ORDER[@]}" >"$ROOT/lib/modules/load-order"
note "modules (load order): ${LOAD_ORDER[*]}"
[ ${#BUILTIN[@]} -eq 0 ] || note "built into the kernel: ${BUILTIN[*]}"

# ---------------------------------------------------------------- busybox
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,mnt,root,etc}
install -m 0755 /bin/busybox "$ROOT/bin/busybox"
"$ROOT/bin/busybox" true || die "/bin/busybox does not run"
if ldd "$ROOT/bin/busybox" >/dev/null 2>&1; then
  die "/bin/busybox is dynamically linked: install busybox-static, not busybox"
fi
n=0
while read -r applet; do
  [ -n "$applet" ] || continue
  [ -e "$ROOT/$applet" ] || [ -L "$ROOT/$applet" ] ||
    { ln -s /bin/busybox "$ROOT/$applet" && n=$((n + 1)); }
done < <("$ROOT/bin/busybox" --list-full)
[ -L "$ROOT/bin/sh" ] || die "busybox has no sh applet"
BB_APPLETS=$("$ROOT/bin/busybox" --list)
for a in mount insmod poweroff sync mke2fs sha256sum dd; do
  grep -qx "$a" <<<"$BB_APPLETS" || die "busybox lacks the $a applet"
done

# ---------------------------------------------------------------- fio, iperf3
copy_file() { # SRC -> same path inside ROOT, symlinks resolved
  local src=$1
  [ -e "$ROOT$src" ] && return 0
  mkdir -p "$ROOT$(dirname "$src")"
  cp -L "$src" "$ROOT$src" || die "cannot copy $src"
}
for bin in "${HOST_BINS[@]}"; do
  ldd_out=$(ldd "$bin") || die "ldd $bin failed"
  if grep -q 'not found' <<<"$ldd_out"; then
    die "$bin has missing libraries: $(grep 'not found' <<<"$ldd_out" | tr -s ' \t\n' ' ')"
  fi
  copy_file "$bin"
  while read -r lib; do
    copy_file "$lib"
  done < <(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$ldd_out")
done
# Check the copied binaries resolve entirely inside ROOT.
[ -e "$ROOT/lib64/ld-linux-x86-64.so.2" ] || die "dynamic loader was not copied"

# ---------------------------------------------------------------- /init
cat >"$ROOT/init" <<'EOF'
#!/bin/sh
# vhostd guest init: mount, load modules, run /test.sh, report, power off.
# Never exits to a shell: if anything below dies, PID 1 exits, the kernel
# panics (panic=-1) and QEMU (-no-reboot) stops.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
exec </dev/console >/dev/console 2>&1
while read -r m; do
  insmod "/lib/modules/$m.ko" || echo "init: insmod $m failed"
done </lib/modules/load-order
ip link set lo up 2>/dev/null
if [ -f /test.sh ]; then
  sh /test.sh
  status=$?
else
  echo "init: /test.sh is missing"
  status=127
fi
echo "VHOSTD-GUEST-EXIT $status"
sync
poweroff -f
# poweroff should not return; make sure we never linger.
echo o >/proc/sysrq-trigger
exit 1
EOF
chmod 0755 "$ROOT/init"

# waitfor PATH [SECONDS]: wait until PATH exists (device nodes appear
# asynchronously after insmod).
cat >"$ROOT/bin/waitfor" <<'EOF'
#!/bin/sh
p=$1; t=${2:-10}; i=0
while [ ! -e "$p" ]; do
  i=$((i + 1))
  [ "$i" -gt $((t * 10)) ] && { echo "waitfor: $p did not appear in ${t}s"; exit 1; }
  sleep 0.1
done
EOF
chmod 0755 "$ROOT/bin/waitfor"
echo "root:x:0:0:root:/root:/bin/sh" >"$ROOT/etc/passwd"
echo "root:x:0:" >"$ROOT/etc/group"
printf '%s\n' "$STAMP_TEXT" >"$ROOT/etc/vhostd-guest-kit"

# ---------------------------------------------------------------- archive
(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort |
  cpio --quiet -o -H newc -R 0:0 --reproducible) >"$WORK/initrd.cpio" ||
  die "creating the initramfs failed"
[ -s "$WORK/initrd.cpio" ] || die "initramfs is empty"
gzip -6 -n -c "$WORK/initrd.cpio" >"$WORK/initrd.cpio.gz" || die "gzip failed"
cp "$VMLINUZ" "$WORK/vmlinuz"

# Uncompressed ELF kernel for QEMU's PVH direct boot: under TCG, the bzImage
# spends ~4 s decompressing itself (xz), and the kernel ~1 s gunzipping the
# initramfs; vmlinux + initrd.cpio halve the boot time. Debian's kernel has
# CONFIG_PVH=y. vmlinuz/initrd.cpio.gz stay the portable pair.
extract_vmlinux() { # bzImage -> vmlinux (ELF) on stdout
  local img=$1 magic tool off i
  local magics=($'\xfd7zXZ' $'\x28\xb5\x2f\xfd' $'\x1f\x8b\x08')
  local tools=("xz -dc --single-stream" "zstd -qdc" "gzip -dc")
  for i in 0 1 2; do
    magic=${magics[$i]}
    tool=${tools[$i]}
    command -v "${tool%% *}" >/dev/null 2>&1 || continue
    while read -r off; do
      [ -n "$off" ] || continue
      if tail -c +$((off + 1)) "$img" | $tool 2>/dev/null >"$WORK/vmlinux.try" ||
        [ -s "$WORK/vmlinux.try" ]; then
        if [ "$(head -c 4 "$WORK/vmlinux.try" | od -An -c | tr -d ' ')" = "177ELF" ]; then
          cat "$WORK/vmlinux.try"
          rm -f "$WORK/vmlinux.try"
          return 0
        fi
      fi
    done < <(LC_ALL=C grep -abo "$magic" "$img" | cut -d: -f1 | head -n 5)
  done
  rm -f "$WORK/vmlinux.try"
  return 1
}
extract_vmlinux "$VMLINUZ" >"$WORK/vmlinux" ||
  die "could not extract an ELF vmlinux from $VMLINUZ (need xz-utils, zstd or gzip)"
LC_ALL=C grep -aq 'Xen' "$WORK/vmlinux" ||
  die "extracted vmlinux has no Xen/PVH ELF note: QEMU cannot boot it directly"

for f in vmlinuz vmlinux initrd.cpio initrd.cpio.gz; do
  mv -f "$WORK/$f" "$OUTDIR/$f"
done
printf '%s\n' "$STAMP_TEXT" >"$OUTDIR/stamp"
note "done: $(cd "$OUTDIR" && du -h vmlinuz vmlinux initrd.cpio.gz initrd.cpio | tr '\t\n' ' ')"
