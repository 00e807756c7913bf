#!/usr/bin/env bash
# Seeds fuzz/corpus/<target>/ from images qemu-img makes and from the real-world corpus.
# Usage: fuzz/seed.sh   (needs qemu-img; fetches the corpus with tests/fetch-corpus.sh)
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p corpus/{vhd,vhdx,vmdk_descriptor,vmdk_sparse,store_objects,ova,change_list,vm_config,guest}
head -c 3M /dev/urandom > "$tmp/d.raw"
truncate -s 8M "$tmp/d.raw"
qemu-img convert -f raw -O vpc -o subformat=dynamic "$tmp/d.raw" corpus/vhd/dynamic.vhd
qemu-img create -q -f vpc -o subformat=fixed corpus/vhd/fixed.vhd 1M
qemu-img convert -f raw -O vhdx -o block_size=1M "$tmp/d.raw" corpus/vhdx/dynamic.vhdx
qemu-img convert -f raw -O vmdk -o subformat=monolithicSparse "$tmp/d.raw" corpus/vmdk_sparse/sparse.vmdk
qemu-img convert -f raw -O vmdk -o subformat=streamOptimized "$tmp/d.raw" corpus/vmdk_sparse/stream.vmdk
qemu-img create -q -f vmdk -o subformat=monolithicFlat "$tmp/flat.vmdk" 1M
cp "$tmp/flat.vmdk" corpus/vmdk_descriptor/flat.txt
qemu-img create -q -f vmdk -o subformat=twoGbMaxExtentSparse "$tmp/two.vmdk" 3G
cp "$tmp/two.vmdk" corpus/vmdk_descriptor/twogb.txt
real=$(bash ../tests/fetch-corpus.sh ../target/corpus)
cp "$real"/fixed.vhd "$real"/dynamic.vhd corpus/vhd/
cp "$real"/fixed.vhdx "$real"/dynamic.vhdx corpus/vhdx/
head -c 2M "$real"/differencing.avhdx > corpus/vhdx/differencing-head.avhdx
head -c 4M "$real"/sesparse.vmdk > corpus/vmdk_sparse/sesparse-head.vmdk
cp "$real"/test.vmcx "$real"/encrypted.vmx corpus/vm_config/
printf 'displayName = "a"\nscsi0:0.fileName = "a.vmdk"\nethernet0.address = "00:50:56:00:00:01"\nsnapshot0.uid = "1"\nsnapshot0.parent = "1"\n' > corpus/vm_config/loop.vmx
printf '\x02\x00\x00\x00\x00' > corpus/store_objects/empty-index
cat > "$tmp/vm.ovf" <<'OVF'
<?xml version="1.0"?><Envelope xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"><References><File ovf:href="disk.vmdk" ovf:id="f1"/></References><DiskSection><Disk ovf:capacity="1" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="d1" ovf:fileRef="f1"/></DiskSection></Envelope>
OVF
qemu-img create -q -f vmdk -o subformat=streamOptimized "$tmp/disk.vmdk" 1M
(cd "$tmp" && tar --format=ustar -cf vm.ova vm.ovf disk.vmdk)
cp "$tmp/vm.ova" corpus/ova/
cp "$tmp/vm.ovf" corpus/ova/
# Change lists: 8 bytes of disk size (16 MiB, little endian), then the list.
disk16m() { printf '\x00\x00\x00\x01\x00\x00\x00\x00'; }
{ disk16m; echo '{"startOffset": 0, "length": 16777216, "changeId": "52 1a/4", "changedArea": [{"start": 65536, "length": 131072}]}'; } > corpus/change_list/cbt.json
{ disk16m; echo '{"ChangedByteOffsets": [0, 1048576], "ChangedByteLengths": [512, 4096], "TargetRctId": "rctX:1:2", "ByteOffset": 0, "ProcessedByteLength": 16777216}'; } > corpus/change_list/rct.json
{ disk16m; printf '0,4096\n0x100000 0x1000 # hex\n'; } > corpus/change_list/extents.txt
# Guest disks: an MBR disk with ext4 (os-release) and a GPT disk with a FAT ESP, 4 MiB each.
mkdir -p "$tmp/root/etc"
echo 'ID=debian' > "$tmp/root/etc/os-release"
truncate -s 4M "$tmp/mbr.raw" "$tmp/gpt.raw"
printf 'label: dos\nstart=2048, type=83\n' | sfdisk -q "$tmp/mbr.raw"
mkfs.ext4 -q -F -d "$tmp/root" "$tmp/ext4.img" 3M
dd if="$tmp/ext4.img" of="$tmp/mbr.raw" bs=1M seek=1 conv=notrunc status=none
sgdisk -n 1:2048:0 -t 1:EF00 "$tmp/gpt.raw" >/dev/null
mkfs.vfat -C "$tmp/esp.img" 2048 >/dev/null
dd if="$tmp/esp.img" of="$tmp/gpt.raw" bs=1M seek=1 conv=notrunc status=none
cp "$tmp/mbr.raw" "$tmp/gpt.raw" corpus/guest/
echo "seeded: $(find corpus -type f | wc -l) files"
