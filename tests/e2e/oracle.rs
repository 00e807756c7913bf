//! qemu-img as an independent oracle: images qemu creates, with random data, zero runs and
//! holes, must convert to the same bytes, map to the same data, and round-trip through a store.

use std::path::Path;

use blockferry_tests::{
    MIB, Rng, Sandbox, Value, file_hash, have_qemu, qemu, qemu_from_raw, random_disk,
};

/// Data extents of a qemu-img map, merged.
fn qemu_data(path: &Path, fmt: &str) -> Vec<(u64, u64)> {
    let v: Value = serde_json::from_str(&qemu(&[
        "map",
        "-f",
        fmt,
        "--output=json",
        path.to_str().unwrap(),
    ]))
    .unwrap();
    merge(
        v.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"] == true)
            .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap())),
    )
}

/// Data extents of a blockferry map, merged.
fn our_data(sb: &Sandbox, path: &Path) -> Vec<(u64, u64)> {
    let v: Value =
        serde_json::from_str(&sb.ok(&["map", path.to_str().unwrap(), "--json"])).unwrap();
    merge(
        v.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"] == true)
            .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap())),
    )
}

fn merge(it: impl Iterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, l) in it {
        match out.last_mut() {
            Some(last) if last.0 + last.1 == s => last.1 += l,
            _ => out.push((s, l)),
        }
    }
    out
}

/// Whether every extent of `inner` lies within `outer`.
fn covered(inner: &[(u64, u64)], outer: &[(u64, u64)]) -> bool {
    inner
        .iter()
        .all(|&(s, l)| outer.iter().any(|&(os, ol)| os <= s && s + l <= os + ol))
}

/// How exactly qemu's map can be compared: for fixed VHDs, VMDK flat extents (and all of
/// VHDX) qemu reports everything as data, where we see the file's holes too.
#[derive(Clone, Copy, PartialEq)]
enum MapCheck {
    Equal,
    OursWithinQemu,
}

/// Creates `fmt` from a random raw disk with qemu-img, then checks convert, map and round trip.
fn check(
    sb: &Sandbox,
    rng: &mut Rng,
    name: &str,
    fmt: &str,
    create_opts: &[&str],
    map_check: MapCheck,
) {
    let raw = sb.path(&format!("{name}.src.raw"));
    let size = 48 * MIB + 512 * rng.below(64);
    random_disk(rng, &raw, size);
    let image = sb.path(&format!("{name}.img"));
    let mut args = vec!["convert", "-f", "raw", "-O", fmt];
    args.extend_from_slice(create_opts);
    args.extend_from_slice(&[raw.to_str().unwrap(), image.to_str().unwrap()]);
    qemu(&args);
    let theirs = sb.path(&format!("{name}.qemu.raw"));
    // Always name the format: qemu's probe takes a fixed VHD (footer only) for raw.
    qemu(&[
        "convert",
        "-f",
        fmt,
        "-O",
        "raw",
        image.to_str().unwrap(),
        theirs.to_str().unwrap(),
    ]);
    let ours = sb.path(&format!("{name}.ours.raw"));
    sb.ok(&["convert", image.to_str().unwrap(), ours.to_str().unwrap()]);
    assert_eq!(
        file_hash(&ours),
        file_hash(&theirs),
        "{name}: convert differs from qemu-img convert"
    );

    let (q, b) = (qemu_data(&image, fmt), our_data(sb, &image));
    match map_check {
        MapCheck::Equal => assert_eq!(b, q, "{name}: map differs from qemu-img map"),
        MapCheck::OursWithinQemu => {
            assert!(covered(&b, &q), "{name}: we call data what qemu does not");
        }
    }

    let info: Value =
        serde_json::from_str(&sb.ok(&["info", image.to_str().unwrap(), "--json"])).unwrap();
    let r = sb.replicate(&image, &[]);
    let read = r["bytes_read"].as_u64().unwrap();
    assert!(
        read <= info["allocated_bytes"].as_u64().unwrap(),
        "{name}: read {read}, more than allocated: {info}"
    );
    let restored = sb.restore(r["snapshot"].as_str().unwrap(), &format!("{name}.restored"));
    assert_eq!(
        file_hash(&restored),
        file_hash(&theirs),
        "{name}: round trip differs"
    );
    sb.verify_latest_against(&image);
    for p in [raw, theirs, ours, restored] {
        std::fs::remove_file(p).unwrap();
    }
}

#[test]
fn vpc_images_from_qemu() {
    if !have_qemu() {
        return;
    }
    let mut rng = Rng::seeded("vpc_images_from_qemu");
    let sb = Sandbox::new();
    sb.init(&["--no-encryption"]);
    check(
        &sb,
        &mut rng,
        "vpc-dynamic",
        "vpc",
        &["-o", "subformat=dynamic"],
        MapCheck::Equal,
    );
    check(
        &sb,
        &mut rng,
        "vpc-fixed",
        "vpc",
        &["-o", "subformat=fixed"],
        MapCheck::OursWithinQemu,
    );
    check(
        &sb,
        &mut rng,
        "vpc-dynamic-force-size",
        "vpc",
        &["-o", "subformat=dynamic,force_size=on"],
        MapCheck::Equal,
    );
    check(
        &sb,
        &mut rng,
        "vpc-fixed-force-size",
        "vpc",
        &["-o", "subformat=fixed,force_size=on"],
        MapCheck::OursWithinQemu,
    );
}

#[test]
fn vhdx_images_from_qemu() {
    if !have_qemu() {
        return;
    }
    let mut rng = Rng::seeded("vhdx_images_from_qemu");
    let sb = Sandbox::new();
    sb.init(&["--no-encryption"]);
    for (name, opts) in [
        ("vhdx-dynamic", "subformat=dynamic"),
        ("vhdx-dynamic-1m", "subformat=dynamic,block_size=1M"),
        (
            "vhdx-dynamic-8m-nozero",
            "subformat=dynamic,block_size=8M,block_state_zero=off",
        ),
        ("vhdx-dynamic-256m", "subformat=dynamic,block_size=256M"),
        ("vhdx-fixed", "subformat=fixed"),
        ("vhdx-fixed-4m", "subformat=fixed,block_size=4M"),
    ] {
        check(
            &sb,
            &mut rng,
            name,
            "vhdx",
            &["-o", opts],
            MapCheck::OursWithinQemu,
        );
    }
}

#[test]
fn vmdk_images_from_qemu() {
    if !have_qemu() {
        return;
    }
    let mut rng = Rng::seeded("vmdk_images_from_qemu");
    let sb = Sandbox::new();
    sb.init(&["--no-encryption"]);
    // Flat extents: qemu reports the whole file as data, we see its holes.
    for (name, opts, map) in [
        (
            "vmdk-monolithic-sparse",
            "subformat=monolithicSparse",
            MapCheck::Equal,
        ),
        (
            "vmdk-monolithic-sparse-zeroed-grain",
            "subformat=monolithicSparse,zeroed_grain=on",
            MapCheck::Equal,
        ),
        (
            "vmdk-stream-optimized",
            "subformat=streamOptimized",
            MapCheck::Equal,
        ),
        (
            "vmdk-monolithic-flat",
            "subformat=monolithicFlat",
            MapCheck::OursWithinQemu,
        ),
        (
            "vmdk-2gb-sparse",
            "subformat=twoGbMaxExtentSparse",
            MapCheck::Equal,
        ),
        (
            "vmdk-2gb-flat",
            "subformat=twoGbMaxExtentFlat",
            MapCheck::OursWithinQemu,
        ),
    ] {
        check(&sb, &mut rng, name, "vmdk", &["-o", opts], map);
    }
}

/// base ← mid ← top made by qemu (backing files), written with qemu-io at random places.
#[test]
fn vmdk_backing_chains_from_qemu() {
    if !have_qemu() {
        return;
    }
    let mut rng = Rng::seeded("vmdk_backing_chains");
    let sb = Sandbox::new();
    sb.init(&["--no-encryption"]);
    let raw = sb.path("base.raw");
    random_disk(&mut rng, &raw, 40 * MIB);
    let base = sb.path("base.vmdk");
    qemu_from_raw(&raw, &base, "vmdk", "");
    let mut parent = base;
    for layer in ["mid.vmdk", "top.vmdk"] {
        let child = sb.path(layer);
        qemu(&[
            "create",
            "-f",
            "vmdk",
            "-b",
            parent.file_name().unwrap().to_str().unwrap(),
            "-F",
            "vmdk",
            child.to_str().unwrap(),
        ]);
        let mut cmds = Vec::new();
        for _ in 0..6 {
            let off = rng.below(40 * MIB - 2 * MIB);
            let len = 512 * (1 + rng.below(2048));
            cmds.push(format!("write -P {} {off} {len}", 1 + rng.below(254)));
        }
        cmds.push(format!("write -z {} {}", 512 * rng.below(40_000), 65536));
        let mut args = vec![];
        for c in &cmds {
            args.push("-c".to_owned());
            args.push(c.clone());
        }
        args.push(child.to_str().unwrap().to_owned());
        let out = std::process::Command::new("qemu-io")
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "qemu-io: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        parent = child;
    }
    let top = sb.path("top.vmdk");
    let theirs = sb.path("top.qemu.raw");
    qemu(&[
        "convert",
        "-f",
        "vmdk",
        "-O",
        "raw",
        top.to_str().unwrap(),
        theirs.to_str().unwrap(),
    ]);
    let ours = sb.path("top.ours.raw");
    sb.ok(&["convert", top.to_str().unwrap(), ours.to_str().unwrap()]);
    assert_eq!(
        file_hash(&ours),
        file_hash(&theirs),
        "chain convert differs"
    );
    assert_eq!(
        our_data(&sb, &top),
        qemu_data(&top, "vmdk"),
        "chain map differs"
    );
    let info: Value =
        serde_json::from_str(&sb.ok(&["info", top.to_str().unwrap(), "--json"])).unwrap();
    assert_eq!(info["chain"].as_array().unwrap().len(), 3, "{info}");
    let r = sb.replicate(&top, &[]);
    assert!(
        r["bytes_read"].as_u64() <= info["allocated_bytes"].as_u64(),
        "{r} {info}"
    );
    let restored = sb.restore(r["snapshot"].as_str().unwrap(), "restored.raw");
    assert_eq!(file_hash(&restored), file_hash(&theirs));
}
