"""Images, change lists and discovery, checked against qemu-img and the real-world corpus."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import List, Tuple

import pytest

import blockferry
from conftest import MIB, have, make_disk, noise


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def qemu_data(path: Path, fmt: str) -> List[Tuple[int, int]]:
    """Data ranges as qemu-img map says, merged."""
    out: List[Tuple[int, int]] = []
    for e in json.loads(qemu_img("map", "--output=json", "-f", fmt, str(path))):
        if e["data"]:
            if out and out[-1][0] + out[-1][1] == e["start"]:
                out[-1] = (out[-1][0], out[-1][1] + e["length"])
            else:
                out.append((e["start"], e["length"]))
    return out


@pytest.mark.parametrize(
    "fmt,opts",
    [
        ("vmdk", "subformat=monolithicSparse"),
        ("vmdk", "subformat=streamOptimized"),
        ("vhdx", ""),
        ("vpc", "subformat=dynamic"),
    ],
)
def test_info_and_map_agree_with_qemu_img(tmp_path: Path, fmt: str, opts: str) -> None:
    have("qemu-img")
    raw = make_disk(tmp_path / "src.raw", 32 * MIB, [(2 * MIB, noise(3 * MIB, 5)), (20 * MIB, noise(MIB, 6))])
    img = tmp_path / f"disk.{fmt}"
    args = ["convert", "-f", "raw", "-O", fmt] + (["-o", opts] if opts else []) + [str(raw), str(img)]
    qemu_img(*args)
    q = json.loads(qemu_img("info", "--output=json", str(img)))
    info = blockferry.image_info(img)
    assert info.virtual_size == q["virtual-size"]
    assert info.format == {"vpc": "vhd"}.get(fmt, fmt)
    assert len(info.chain) == 1 and info.chain[0].file == str(img) and info.file == str(img)
    ours = [(e.start, e.length) for e in blockferry.image_map(img) if e.kind == "data"]
    want = qemu_data(img, fmt)
    # The same bytes are data (granularity may differ: compare as byte sets of 64 KiB).
    def cover(ranges: List[Tuple[int, int]]) -> set:
        return {b for s, n in ranges for b in range(s >> 16, (s + n + 0xFFFF) >> 16)}
    if fmt == "vhdx":
        # qemu's VHDX driver reports no block status: every byte reads as data to it.
        assert cover(ours) <= cover(want) and cover(ours)
    else:
        assert cover(ours) == cover(want)
    extents = blockferry.image_map(img)
    assert extents[0].start == 0 and sum(e.length for e in extents) == info.virtual_size
    # And the whole disk converts to the same bytes.
    out = tmp_path / "out.raw"
    rep = blockferry.convert(img, out)
    assert rep.virtual_size == info.virtual_size
    theirs = tmp_path / "qemu.raw"
    qemu_img("convert", "-f", fmt, "-O", "raw", str(img), str(theirs))
    assert out.read_bytes() == theirs.read_bytes()


def test_corpus_images_open(tmp_path: Path) -> None:
    corpus = os.environ.get("BF_CORPUS")
    if not corpus:
        pytest.skip("BF_CORPUS is not set (tests/fetch-corpus.sh)")
    sizes = {
        "dynamic.vhdx": 10 * MIB,
        "fixed.vhdx": 10 * MIB,
        "dynamic.vhd": 10 * MIB,
        "fixed.vhd": 10 * MIB,
        "sesparse.vmdk": 512 * MIB,
    }
    for name, size in sizes.items():
        info = blockferry.image_info(Path(corpus) / name)
        assert info.virtual_size == size, name
    # The Hyper-V differencing disk names a parent the corpus does not ship.
    with pytest.raises(blockferry.NotFoundError) as e:
        blockferry.image_info(Path(corpus) / "differencing.avhdx")
    assert "parent not found" in str(e.value) and e.value.path is not None
    found = {Path(f.path).name: f for f in blockferry.discover(corpus)}
    assert found["dynamic.vhdx"].role == "disk"
    assert found["differencing.avhdx"].role == "unreadable"
    assert isinstance(found["differencing.avhdx"].error, blockferry.NotFoundError)


def test_discover_a_datastore(tmp_path: Path) -> None:
    have("qemu-img")
    root = tmp_path / "ds"
    (root / "vm1").mkdir(parents=True)
    raw = make_disk(tmp_path / "r.raw", 8 * MIB, [(0, noise(MIB, 7))])
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicFlat", str(raw), str(root / "vm1" / "a.vmdk"))
    qemu_img("convert", "-f", "raw", "-O", "vhdx", str(raw), str(root / "b.vhdx"))
    (root / "junk.vhd").write_bytes(b"conectix" + bytes(100))
    found = blockferry.discover(root)
    roles = {Path(f.path).name: f.role for f in found}
    assert roles == {"a.vmdk": "disk", "a-flat.vmdk": "extent", "b.vhdx": "disk", "junk.vhd": "unreadable"}
    disks = [f for f in found if f.role == "disk"]
    assert all(f.virtual_size == 8 * MIB for f in disks)
    with pytest.raises(blockferry.SourceIOError):
        blockferry.discover(tmp_path / "missing")


def test_change_lists_parse_and_fail_clearly(tmp_path: Path) -> None:
    rct = (
        b'{"ChangedByteOffsets": [0, 8192], "ChangedByteLengths": [4096, 4096],'
        b' "TargetRctId": "rctX:1:2", "ProcessedByteLength": 1048576, "ByteOffset": 0}'
    )
    cl = blockferry.parse_changes(rct, MIB)
    assert cl.format == "hyperv-rct" and cl.extents == [(0, 4096), (8192, 4096)]
    assert cl.base_change_id == "rctX:1:2"
    lines = tmp_path / "ext.txt"
    lines.write_text("0,4096\n4096,4096\n")
    cl = blockferry.parse_changes(lines, MIB, format="extents")
    assert cl.extents == [(0, 8192)]
    for bad in [b"{", b'{"ChangedByteOffsets": [0], "ChangedByteLengths": []}', b"0,99999999\n"]:
        with pytest.raises(blockferry.InvalidChangeListError) as e:
            blockferry.parse_changes(bad, MIB)
        assert isinstance(e.value, ValueError) and e.value.kind == "invalid_change_list"
    with pytest.raises(blockferry.ConfigError):
        blockferry.parse_changes(b"0,1", MIB, format="nonsense")
    with pytest.raises(blockferry.SourceIOError) as io:
        blockferry.parse_changes(tmp_path / "none.json", MIB)
    assert io.value.errno == 2 and io.value.filename == str(tmp_path / "none.json")


def test_hostile_images_raise_errors_never_crash(tmp_path: Path) -> None:
    """Truncated and bit-flipped images: every call raises a blockferry.Error (or works)."""
    have("qemu-img")
    raw = make_disk(tmp_path / "src.raw", 8 * MIB, [(0, noise(2 * MIB, 8))])
    import random

    rng = random.Random(9)
    for fmt in ["vmdk", "vhdx", "vpc"]:
        good = tmp_path / f"good.{fmt}"
        qemu_img("convert", "-f", "raw", "-O", fmt, str(raw), str(good))
        data = bytearray(good.read_bytes())
        for i in range(12):
            bad = bytearray(data)
            if i % 3 == 0:
                bad = bad[: rng.randrange(1, len(bad))]
            else:
                for _ in range(8):
                    pos = rng.randrange(0, min(len(bad), 1 << 20))
                    bad[pos] ^= 1 << rng.randrange(8)
            p = tmp_path / f"bad{i}.{fmt}"
            p.write_bytes(bytes(bad))
            before = p.read_bytes()
            for call in (blockferry.image_info, blockferry.image_map):
                try:
                    call(p)
                except blockferry.Error as e:
                    assert str(e) and e.kind in blockferry._errors.KINDS
            assert p.read_bytes() == before  # never written to


def test_discover_vms_gives_typed_machines(tmp_path: Path) -> None:
    """The engine's VM discovery through the facade: a .vmx with a disk and a NIC, the
    corpus's Hyper-V configuration and encrypted .vmx, and an unreadable .vmcx."""
    have("qemu-img")
    corpus = os.environ.get("BF_CORPUS", "")
    root = tmp_path / "ds"
    (root / "vm1").mkdir(parents=True)
    qemu_img("create", "-q", "-f", "vmdk", str(root / "vm1" / "vm1.vmdk"), "8M")
    (root / "vm1" / "vm1.vmx").write_text(
        'displayName = "vm1"\nnumvcpus = "2"\nmemsize = "2048"\nfirmware = "efi"\n'
        'guestOS = "windows2019srv-64"\nscsi0.virtualDev = "lsisas1068"\n'
        'scsi0:0.fileName = "vm1.vmdk"\nethernet0.virtualDev = "vmxnet3"\n'
        'ethernet0.addressType = "generated"\nethernet0.generatedAddress = "00:0C:29:01:02:03"\n'
        'ethernet0.networkName = "LAN"\n'
    )
    (root / "broken.vmcx").write_bytes(bytes(64))
    if corpus and (Path(corpus) / "test.vmcx").exists():
        (root / "hv").mkdir()
        (root / "hv" / "test.vmcx").write_bytes((Path(corpus) / "test.vmcx").read_bytes())
        (root / "hv" / "encrypted.vmx").write_bytes((Path(corpus) / "encrypted.vmx").read_bytes())
    vms = {Path(v.config).name: v for v in blockferry.discover_vms(root)}
    vm1 = vms["vm1.vmx"]
    assert isinstance(vm1, blockferry.VirtualMachine)
    assert (vm1.name, vm1.cpus, vm1.memory_bytes, vm1.firmware) == ("vm1", 2, 2048 * MIB, "efi")
    assert vm1.guest_os == "windows2019srv-64" and not vm1.encrypted
    assert vm1.nics == [blockferry.Nic("ethernet0", "vmxnet3", "00:0c:29:01:02:03", False, "LAN", None)]
    (disk,) = vm1.disks
    assert isinstance(disk, blockferry.VmDisk)
    assert (disk.slot, disk.controller_type, disk.format, disk.virtual_size) == ("scsi0:0", "lsisas1068", "vmdk", 8 * MIB)
    assert disk.chain == [str(root / "vm1" / "vm1.vmdk")] and disk.problem is None
    assert isinstance(vms["broken.vmcx"].error, blockferry.InvalidImageError)
    if "test.vmcx" in vms:
        hv = vms["test.vmcx"]
        assert (hv.kind, hv.name, hv.firmware, hv.cpus) == ("vmcx", "Other Location", "bios", 1)
        assert hv.disks[0].problem is not None and "not among the images" in hv.disks[0].problem
        assert vms["encrypted.vmx"].encrypted


def test_inspect_and_validate_through_the_facade(tmp_path: Path) -> None:
    """Inspection of an image and of a snapshot, and validation with typed results."""
    have("sfdisk")
    have("mkfs.ext4")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "os-release").write_text('ID=ubuntu\nVERSION_ID="18.04"\nPRETTY_NAME="Ubuntu 18.04.6 LTS"\n')
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(48 * MIB)
    subprocess.run(["sfdisk", "-q", str(disk)], input="label: dos\nstart=2048, type=83, bootable\n", text=True, check=True)
    part = tmp_path / "part.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(root), str(part), "40M"], check=True)
    with open(disk, "r+b") as f:
        f.seek(MIB)
        f.write(part.read_bytes())
        f.seek(0)
        f.write(b"\xeb\x63\x90")
    found = blockferry.inspect(disk)
    assert found["table"]["scheme"] == "mbr" and found["boot"]["mode"] == "bios"
    assert found["os"][0]["distro"] == "ubuntu" and found["os"][0]["version"] == "18.04"

    v = blockferry.validate(disk, target="aws")
    assert isinstance(v, blockferry.Validation) and v.passed, v
    assert all(isinstance(c, blockferry.Check) for c in v.checks)
    assert {c.id: c.status for c in v.checks}["os"] == "pass"
    v = blockferry.validate(disk, target="azure")
    os_check = next(c for c in v.checks if c.id == "os")
    assert not v.passed and os_check.status == "fail" and os_check.fix
    with pytest.raises(blockferry.ConfigError):
        blockferry.validate(disk, target="mars")

    store = blockferry.Store.create(tmp_path / "store", passphrase="pw")
    snap = store.replicate(disk).snapshot
    assert store.inspect(snap)["os"][0]["pretty_name"] == "Ubuntu 18.04.6 LTS"
    v = blockferry.validate(disk, target="generic", store=store)
    assert {c.id: c.status for c in v.checks}["store-space"] == "pass"
