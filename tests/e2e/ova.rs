//! OVA: disks read in place from the archive; the OVF's disk list; damaged archives.

use std::fmt::Write;

use blockferry::internals::image::ova;
use blockferry_tests::{MIB, Rng, Sandbox, file_hash, have_qemu, make_image, qemu_from_raw};

/// A ustar archive of `(name, bytes)` members.
pub(crate) fn tar(members: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in members {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..108].copy_from_slice(b"0000644\0");
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
        h[136..148].copy_from_slice(b"00000000000\0");
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(512), 0);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

pub(crate) fn ovf(disks: &[(&str, u64)]) -> Vec<u8> {
    let mut refs = String::new();
    let mut list = String::new();
    for (i, (file, cap)) in disks.iter().enumerate() {
        write!(refs, "<File ovf:href=\"{file}\" ovf:id=\"file{i}\"/>").unwrap();
        write!(list, "<Disk ovf:capacity=\"{}\" ovf:capacityAllocationUnits=\"byte * 2^20\" ovf:diskId=\"vmdisk{i}\" ovf:fileRef=\"file{i}\" ovf:format=\"http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized\"/>", cap >> 20).unwrap();
    }
    format!("<?xml version=\"1.0\"?><Envelope xmlns:ovf=\"http://schemas.dmtf.org/ovf/envelope/1\"><References>{refs}</References><DiskSection><Info>disks &amp; more</Info>{list}</DiskSection></Envelope>").into_bytes()
}

#[test]
fn ova_disks_read_in_place() {
    if !have_qemu() {
        return;
    }
    let mut rng = Rng::seeded("ova");
    let sb = Sandbox::new();
    let mut members = Vec::new();
    let mut raws = Vec::new();
    for (i, size) in [24 * MIB, 8 * MIB].into_iter().enumerate() {
        let raw = sb.path(&format!("d{i}.raw"));
        make_image(
            &raw,
            size,
            &[(MIB, rng.bytes(3 << 20)), (size - 4096, rng.texty(4096))],
        );
        let vmdk = sb.path(&format!("disk{i}.vmdk"));
        qemu_from_raw(&raw, &vmdk, "vmdk", "subformat=streamOptimized");
        members.push((format!("disk{i}.vmdk"), std::fs::read(&vmdk).unwrap()));
        raws.push((raw, size));
    }
    let ovf_bytes = ovf(&[("disk0.vmdk", raws[0].1), ("disk1.vmdk", raws[1].1)]);
    let mut all = vec![("vm.ovf", ovf_bytes)];
    all.extend(members.iter().map(|(n, d)| (n.as_str(), d.clone())));
    let ova_path = sb.path("vm.ova");
    std::fs::write(&ova_path, tar(&all)).unwrap();
    let before = file_hash(&ova_path);

    let info: serde_json::Value =
        serde_json::from_str(&sb.ok(&["info", ova_path.to_str().unwrap(), "--json"])).unwrap();
    let note = info["notes"][0].as_str().unwrap();
    assert!(
        // Counted from 0, as --disk counts (issue 16.20: it said "disk 1 of 2" here).
        note.contains("OVA disk 0 (counted from 0) of 2")
            && note.contains("disk1.vmdk (vmdisk1, 8388608 bytes)"),
        "{info}"
    );
    for (which, (raw, _)) in [("0", &raws[0]), ("disk1.vmdk", &raws[1])] {
        let out = sb.path(&format!("out-{which}.raw"));
        sb.ok(&[
            "convert",
            ova_path.to_str().unwrap(),
            out.to_str().unwrap(),
            "--disk",
            which,
        ]);
        assert_eq!(file_hash(&out), file_hash(raw), "disk {which}");
    }
    // Replicated straight from the archive, and restored exactly.
    sb.init(&["--no-encryption"]);
    let r = sb.replicate(&ova_path, &["--disk", "1"]);
    let restored = sb.restore(r["snapshot"].as_str().unwrap(), "restored.raw");
    assert_eq!(file_hash(&restored), file_hash(&raws[1].0));
    let store = sb.store();
    let v = sb.json(&[
        "verify",
        "--store",
        &store,
        "latest",
        "--image",
        ova_path.to_str().unwrap(),
        "--disk",
        "1",
    ]);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(file_hash(&ova_path), before, "the archive was modified");
    sb.fails(
        &["info", ova_path.to_str().unwrap(), "--disk", "7"],
        1,
        &["no disk \"7\"", "disk0.vmdk, disk1.vmdk"],
    );
}

#[test]
fn damaged_archives_fail_cleanly() {
    let sb = Sandbox::new();
    let good = tar(&[
        ("vm.ovf", ovf(&[("d.vmdk", MIB)])),
        ("d.vmdk", vec![0u8; 4096]),
    ]);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("no-ovf", tar(&[("d.vmdk", vec![0u8; 4096])]), "no .ovf"),
        ("missing-disk", tar(&[("vm.ovf", ovf(&[("gone.vmdk", MIB)]))]), "does not hold"),
        ("bad-xml", tar(&[("vm.ovf", b"<Envelope><DiskSection><Disk ovf:fileRef=\"x\"".to_vec())]), "OVF descriptor"),
        ("dangling-ref", tar(&[("vm.ovf", b"<Envelope><DiskSection><Disk ovf:diskId=\"a\" ovf:fileRef=\"nope\"/></DiskSection></Envelope>".to_vec())]), "does not list"),
        ("not-a-disk", good.clone(), "VMDK"),
        ("truncated", good[..600].to_vec(), "past the end of the archive"),
        ("bad-checksum", { let mut b = good.clone(); b[10] ^= 1; b }, "checksum mismatch"),
        ("huge-member", { let mut b = good.clone(); b[124..136].copy_from_slice(b"77777777777\0"); b }, "checksum mismatch"),
    ];
    for (name, bytes, needle) in cases {
        let path = sb.path(&format!("{name}.ova"));
        std::fs::write(&path, bytes).unwrap();
        let out = sb.run(&["info", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(
            err.contains(needle),
            "{name}: stderr lacks {needle:?}: {err}"
        );
    }
    // Members are found through long names and prefixes too; sizes in base 256 parse.
    assert_eq!(
        ova::tar_members(&blockferry::internals::image::MemFile::new("t", good))
            .unwrap()
            .len(),
        2
    );
}

/// A ustar header (checksummed) for a member of `size` bytes of type `kind`; the size field
/// holds `size` in octal if it fits (else 0, as Python's tarfile writes in pax archives).
fn header(name: &str, size: u64, kind: u8) -> [u8; 512] {
    let mut h = [0u8; 512];
    let short = &name.as_bytes()[..name.len().min(99)];
    h[..short.len()].copy_from_slice(short);
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    let field = if size < 0o77_777_777_777 { size } else { 0 };
    h[124..136].copy_from_slice(format!("{field:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = kind;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// A pax extended header's records.
fn pax_records(records: &[(&str, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in records {
        let body = format!(" {k}={v}\n");
        // The length counts its own digits.
        let mut len = body.len() + 1;
        while format!("{len}{body}").len() != len {
            len += 1;
        }
        out.extend_from_slice(format!("{len}{body}").as_bytes());
    }
    out
}

/// Issue 16.16: OVAs in pax format (Python's tarfile default, and every tar with a member of
/// 8 GiB or more, whose ustar size field is then 0) are read: the pax `path` and `size`
/// records win. Before the fix long names were lost and large disks failed to open.
#[test]
fn pax_ovas_with_long_names_and_large_disks() {
    if !have_qemu() {
        return;
    }
    let mut rng = Rng::seeded("pax_ova");
    let sb = Sandbox::new();
    // Python's tarfile (PAX_FORMAT by default) with names longer than ustar's 100 bytes.
    let long = format!("{}-disk", "a-very-long-virtual-machine-name".repeat(4));
    let raw = sb.path("d.raw");
    make_image(&raw, 8 * MIB, &[(MIB, rng.bytes(2 << 20))]);
    let vmdk = sb.path(&format!("{long}.vmdk"));
    qemu_from_raw(&raw, &vmdk, "vmdk", "subformat=streamOptimized");
    std::fs::write(
        sb.path(&format!("{long}.ovf")),
        ovf(&[(&format!("{long}.vmdk"), 8 * MIB)]),
    )
    .unwrap();
    let py = sb.path("vm.ova");
    let script = format!(
        "import tarfile\nwith tarfile.open({py:?}, 'w', format=tarfile.PAX_FORMAT) as t:\n    t.add({ovf:?}, arcname={ovf_name:?})\n    t.add({vmdk:?}, arcname={vmdk_name:?})\n",
        py = py.to_str().unwrap(),
        ovf = sb.path(&format!("{long}.ovf")).to_str().unwrap(),
        ovf_name = format!("{long}.ovf"),
        vmdk = vmdk.to_str().unwrap(),
        vmdk_name = format!("{long}.vmdk"),
    );
    let ok = std::process::Command::new("python3")
        .args(["-c", &script])
        .status()
        .unwrap();
    assert!(ok.success());
    let out = sb.path("py.out");
    sb.ok(&["convert", py.to_str().unwrap(), out.to_str().unwrap()]);
    assert_eq!(file_hash(&out), file_hash(&raw));
    let r = ova::tar_members(&blockferry::internals::image::MemFile::new(
        "vm.ova",
        std::fs::read(&py).unwrap(),
    ))
    .unwrap();
    assert!(r.iter().any(|m| m.name == format!("{long}.vmdk")), "{r:?}");

    // A member over 8 GiB: pax `size`, ustar size field 0. The disk is a hosted sparse VMDK
    // followed by zeros (a hole in the archive) up to 8 GiB + 512.
    let sparse = sb.path("big.vmdk");
    qemu_from_raw(&raw, &sparse, "vmdk", "subformat=monolithicSparse");
    let disk = std::fs::read(&sparse).unwrap();
    let member_size = (8u64 << 30) + 512;
    let ovf_bytes = ovf(&[("big.vmdk", 8 * MIB)]);
    let mut head = Vec::new();
    head.extend_from_slice(&header("vm.ovf", ovf_bytes.len() as u64, b'0'));
    head.extend_from_slice(&ovf_bytes);
    head.resize(head.len().next_multiple_of(512), 0);
    let records = pax_records(&[
        ("path", "big.vmdk".into()),
        ("size", member_size.to_string()),
    ]);
    head.extend_from_slice(&header("PaxHeaders/big.vmdk", records.len() as u64, b'x'));
    head.extend_from_slice(&records);
    head.resize(head.len().next_multiple_of(512), 0);
    head.extend_from_slice(&header("big.vmdk", member_size, b'0'));
    let data_at = head.len() as u64;
    head.extend_from_slice(&disk);
    let big = sb.path("big.ova");
    let f = std::fs::File::create(&big).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &head, 0).unwrap();
    // The member's end, rounded to a block, then the two zero blocks that end an archive.
    f.set_len((data_at + member_size).next_multiple_of(512) + 1024)
        .unwrap();
    drop(f);
    let info = sb.json(&["info", big.to_str().unwrap()]);
    assert_eq!(info["virtual_size"], 8 * MIB, "{info}");
    let out = sb.path("big.out");
    sb.ok(&["convert", big.to_str().unwrap(), out.to_str().unwrap()]);
    assert_eq!(file_hash(&out), file_hash(&raw));
}
