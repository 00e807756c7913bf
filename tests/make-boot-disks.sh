#!/usr/bin/env bash
# Disks that really boot, made from Debian packages (no downloads):
#   bios.raw    a 4 MiB disk whose boot sector prints BLOCKFERRY-BOOT-SECTOR-OK to COM1
#   broken.raw  the same with its boot signature gone (the firmware finds nothing to boot)
#   linux.raw   a 96 MiB disk: MBR, syslinux, a FAT partition with Debian's kernel and a
#               busybox initramfs whose init prints BLOCKFERRY-LINUX-UP and powers off
#
#   tests/make-boot-disks.sh OUTDIR
# Needs: busybox-static syslinux syslinux-common mtools dosfstools cpio fdisk
# linux-image-amd64 (the first two disks need nothing).
set -euo pipefail
out=${1:?usage: make-boot-disks.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)

# 1. The boot sector, assembled by hand (org 0x7c00, 16-bit): the text through the BIOS
#    (int 0x10 teletype: on the screen, and on the serial console SeaBIOS mirrors it to)
#    cld; xor ax,ax; mov ds,ax; mov si,msg
#    l: lodsb; test al,al; jz d; mov ah,0x0e; mov bx,7; int 0x10; jmp l
#    d: sti; hlt; jmp d   (interrupts on: SeaBIOS goes on mirroring the screen)
#    msg: "BLOCKFERRY-BOOT-SECTOR-OK\r\n", 0
sector() {
  local f=$1 sig=$2
  rm -f "$f"
  truncate -s 4M "$f"
  printf '\xfc\x31\xc0\x8e\xd8\xbe\x1a\x7c\xac\x84\xc0\x74\x09\xb4\x0e\xbb\x07\x00\xcd\x10\xeb\xf2\xfb\xf4\xeb\xfc' \
    | dd of="$f" conv=notrunc status=none
  printf 'BLOCKFERRY-BOOT-SECTOR-OK\r\n\0' | dd of="$f" bs=1 seek=26 conv=notrunc status=none
  if [ "$sig" = yes ]; then
    printf '\x55\xaa' | dd of="$f" bs=1 seek=510 conv=notrunc status=none
  fi
  # Some data further on, so that the disk is more than one chunk.
  printf 'second megabyte' | dd of="$f" bs=1 seek=$((1024 * 1024 + 17)) conv=notrunc status=none
}
sector "$out/bios.raw" yes
sector "$out/broken.raw" no

# 2. Linux.
kernel=$(ls /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1 || true)
busybox=$(command -v busybox || true)
if [ -z "$kernel" ] || [ -z "$busybox" ] || ! command -v syslinux >/dev/null \
   || ! command -v mcopy >/dev/null || ! command -v mkfs.vfat >/dev/null; then
  echo "make-boot-disks: no kernel, busybox, syslinux, mtools or dosfstools: linux.raw not made" >&2
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/initrd/bin" "$work/initrd/dev" "$work/initrd/proc"
cp "$busybox" "$work/initrd/bin/busybox"
cat > "$work/initrd/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox echo "BLOCKFERRY-LINUX-UP on $(/bin/busybox uname -r)"
/bin/busybox sleep 1
/bin/busybox poweroff -f
EOF
chmod +x "$work/initrd/init"
(cd "$work/initrd" && find . | cpio --quiet -o -H newc | gzip -1 > "$work/initrd.gz")
part="$work/part.img"
truncate -s 95M "$part"
mkfs.vfat -n BFBOOT "$part" > /dev/null
syslinux --install "$part"
cat > "$work/syslinux.cfg" <<'EOF'
DEFAULT linux
LABEL linux
  KERNEL vmlinuz
  APPEND initrd=initrd.gz console=ttyS0 panic=-1 loglevel=4
EOF
mcopy -i "$part" "$kernel" ::vmlinuz
mcopy -i "$part" "$work/initrd.gz" ::initrd.gz
mcopy -i "$part" "$work/syslinux.cfg" ::syslinux.cfg
disk="$out/linux.raw"
rm -f "$disk"
truncate -s 96M "$disk"
printf 'label: dos\nstart=2048, type=c, bootable\n' | sfdisk -q "$disk"
mbr=/usr/lib/syslinux/mbr/mbr.bin
dd if="$mbr" of="$disk" bs=440 count=1 conv=notrunc status=none
dd if="$part" of="$disk" bs=1M seek=1 conv=notrunc,sparse status=none
echo "made $out/bios.raw $out/broken.raw $out/linux.raw"
