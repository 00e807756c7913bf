//! VHD differencing chains and hostile VHDs, built from the specification.

use blockferry::ErrorKind;
use blockferry::internals::image::{MemFile, OpenOptions, Target, VhdLayout};
use blockferry_tests::vhd_builder::{ParentSpec, VhdSpec, expected_raw, vhd_bytes, write_vhd};
use blockferry_tests::{MIB, Rng, Sandbox, file_hash};

const BS: u32 = 2 << 20;

fn blocks(rng: &mut Rng, idx: &[u32], partial: bool) -> Vec<(u32, Vec<u8>, Option<Vec<bool>>)> {
    idx.iter()
        .map(|&i| {
            let present = partial.then(|| (0..BS / 512).map(|_| rng.below(3) == 0).collect());
            (i, rng.bytes(BS as usize), present)
        })
        .collect()
}

fn id(n: u8) -> [u8; 16] {
    [n; 16]
}

/// base ← mid ← top, with partially present blocks, read as the model says.
#[test]
fn differencing_chain_reads_through_parents() {
    let mut rng = Rng::seeded("vhd_chain");
    let sb = Sandbox::new();
    let size = 20 * MIB + 3 * 512;
    let base = VhdSpec {
        size,
        block_size: BS,
        unique_id: id(1),
        parent: None,
        blocks: blocks(&mut rng, &[0, 1, 4, 9, 10], false),
    };
    let mid = VhdSpec {
        size,
        block_size: BS,
        unique_id: id(2),
        parent: Some(ParentSpec {
            unique_id: id(1),
            relative: Some(".\\base.vhd".into()),
            absolute: Some("C:\\VMs\\base.vhd".into()),
            name: "base.vhd".into(),
        }),
        blocks: blocks(&mut rng, &[1, 2, 9], true),
    };
    let top = VhdSpec {
        size,
        block_size: BS,
        unique_id: id(3),
        // Only an absolute path from another host: found by file name in the same folder.
        parent: Some(ParentSpec {
            unique_id: id(2),
            relative: None,
            absolute: Some("D:\\elsewhere\\mid.vhd".into()),
            name: "mid.vhd".into(),
        }),
        blocks: blocks(&mut rng, &[0, 2, 3, 10], true),
    };
    write_vhd(&sb.path("base.vhd"), &base);
    write_vhd(&sb.path("mid.vhd"), &mid);
    write_vhd(&sb.path("top.vhd"), &top);
    let want = sb.path("want.raw");
    std::fs::write(&want, expected_raw(&[&top, &mid, &base])).unwrap();

    let out = sb.path("top.raw");
    sb.ok(&[
        "convert",
        sb.path("top.vhd").to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(file_hash(&out), file_hash(&want));
    let info: serde_json::Value =
        serde_json::from_str(&sb.ok(&["info", sb.path("top.vhd").to_str().unwrap(), "--json"]))
            .unwrap();
    assert_eq!(info["chain"].as_array().unwrap().len(), 3, "{info}");
    assert_eq!(info["subformat"], "differencing");

    // Only allocated data is read, and the round trip is exact.
    sb.init(&["--no-encryption"]);
    let r = sb.replicate(&sb.path("top.vhd"), &[]);
    assert!(
        r["bytes_read"].as_u64() <= info["allocated_bytes"].as_u64(),
        "{r} {info}"
    );
    let restored = sb.restore(r["snapshot"].as_str().unwrap(), "restored.raw");
    assert_eq!(file_hash(&restored), file_hash(&want));
    sb.verify_latest_against(&sb.path("top.vhd"));
}

#[test]
fn broken_chains_are_refused_clearly() {
    let mut rng = Rng::seeded("vhd_broken_chains");
    let sb = Sandbox::new();
    let size = 8 * MIB;
    let base = VhdSpec {
        size,
        block_size: BS,
        unique_id: id(1),
        parent: None,
        blocks: blocks(&mut rng, &[0], false),
    };
    let child = |parent_id: [u8; 16], rel: &str| VhdSpec {
        size,
        block_size: BS,
        unique_id: id(9),
        parent: Some(ParentSpec {
            unique_id: parent_id,
            relative: Some(rel.into()),
            absolute: None,
            name: String::new(),
        }),
        blocks: Vec::new(),
    };
    write_vhd(&sb.path("base.vhd"), &base);
    let convert = |name: &str| {
        sb.run(&[
            "convert",
            sb.path(name).to_str().unwrap(),
            sb.path("out.raw").to_str().unwrap(),
            "--force",
        ])
    };
    let fails = |name: &str, needle: &str| {
        let out = convert(name);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(
            err.contains(needle),
            "{name}: stderr lacks {needle:?}: {err}"
        );
    };
    write_vhd(&sb.path("wrong-id.vhd"), &child(id(7), "base.vhd"));
    fails("wrong-id.vhd", "not the image this child was made from");
    write_vhd(&sb.path("missing.vhd"), &child(id(1), "gone.vhd"));
    fails(
        "missing.vhd",
        "parent not found: the image names its parent gone.vhd",
    );
    write_vhd(&sb.path("self.vhd"), &child(id(9), "self.vhd"));
    fails("self.vhd", "loops back");
    let mut other_size = base.clone();
    other_size.size = 4 * MIB;
    other_size.blocks.clear();
    write_vhd(&sb.path("small.vhd"), &other_size);
    write_vhd(&sb.path("size.vhd"), &child(id(1), "small.vhd"));
    fails("size.vhd", "virtual size");
    // A parent outside the folder is not followed unless allowed, and the error says so and
    // names the option (issue 16.18: it said "parent not found").
    let inner = sb.path("inner");
    std::fs::create_dir(&inner).unwrap();
    write_vhd(&inner.join("escape.vhd"), &child(id(1), "..\\base.vhd"));
    fails("inner/escape.vhd", "outside the image's folder");
    fails("inner/escape.vhd", "--allow-outside-folder");
    sb.ok(&[
        "info",
        inner.join("escape.vhd").to_str().unwrap(),
        "--allow-outside-folder",
    ]);
    // Issue 16.18: replicate, verify and sync take the option too (before the fix such a
    // linked clone could be converted but never replicated).
    sb.init(&[]);
    let store = sb.store();
    let escape = inner.join("escape.vhd");
    let escape = escape.to_str().unwrap();
    sb.fails(
        &["replicate", escape, "--store", &store],
        1,
        &["outside the image's folder", "--allow-outside-folder"],
    );
    let r = sb.replicate(std::path::Path::new(escape), &["--allow-outside-folder"]);
    let snap = r["snapshot"].as_str().unwrap();
    sb.fails(
        &["verify", "--store", &store, snap, "--image", escape],
        1,
        &["--allow-outside-folder"],
    );
    let v = sb.json(&[
        "verify",
        "--store",
        &store,
        snap,
        "--image",
        escape,
        "--allow-outside-folder",
    ]);
    assert_eq!(v["ok"], true, "{v}");
    sb.ok(&[
        "sync",
        escape,
        "--store",
        &store,
        "--changes",
        "hash",
        "--cycles",
        "1",
        "--allow-outside-folder",
    ]);
    // A symlink out of the folder is refused just the same.
    std::os::unix::fs::symlink(sb.path("base.vhd"), inner.join("link.vhd")).unwrap();
    write_vhd(&inner.join("via-link.vhd"), &child(id(1), "link.vhd"));
    fails("inner/via-link.vhd", "outside the image's folder");
}

/// Maps a VHD held in memory over its whole virtual size.
fn map_all(bytes: Vec<u8>) -> blockferry::Result<Vec<blockferry::Mapping>> {
    let file = MemFile::new("mem.vhd", bytes);
    let layout = VhdLayout::parse(&file)?;
    let mut out = Vec::new();
    let size = layout.virtual_size();
    layout.map(&file, 0, size, &[(0, size)], &mut out)?;
    Ok(out)
}

#[test]
fn hostile_vhds_fail_cleanly() {
    let mut rng = Rng::seeded("hostile_vhds");
    let spec = VhdSpec {
        size: 6 * MIB,
        block_size: BS,
        unique_id: id(4),
        parent: Some(ParentSpec {
            unique_id: id(5),
            relative: Some("p.vhd".into()),
            absolute: None,
            name: "p.vhd".into(),
        }),
        blocks: blocks(&mut rng, &[0, 2], true),
    };
    let good = vhd_bytes(&spec);
    let maps = map_all(good.clone()).unwrap();
    assert!(maps.iter().any(|m| matches!(m.target, Target::Data { .. })));
    // Truncation at every sector boundary, and through each structure.
    for len in (0..good.len())
        .step_by(512)
        .chain([1, 511, 513, 1537, good.len() - 1])
    {
        if let Err(e) = map_all(good[..len].to_vec()) {
            assert!(matches!(e.kind(), ErrorKind::InvalidImage), "{len}: {e}");
            assert!(e.path().is_some(), "{len}: error names no file: {e}");
        }
    }
    // Random bit flips in footer, header, BAT and locators: an error or a valid map, no panic.
    for _ in 0..3000 {
        let mut bad = good.clone();
        let at = rng.below(1536 + 1024) as usize;
        let at = if rng.below(2) == 0 {
            at
        } else {
            good.len() - 1 - rng.below(512) as usize
        };
        bad[at] ^= 1 << rng.below(8);
        if let Ok(maps) = map_all(bad) {
            let total: u64 = maps.iter().map(|m| m.len).sum();
            assert!(total > 0);
        }
    }
    // Fields at hostile values.
    let mut huge_bs = spec.clone();
    huge_bs.block_size = 1 << 31;
    huge_bs.blocks.clear();
    assert!(map_all(vhd_bytes(&huge_bs)).is_err());
    let mut odd_bs = spec.clone();
    odd_bs.block_size = 3 << 19;
    odd_bs.blocks.clear();
    assert!(map_all(vhd_bytes(&odd_bs)).is_err());
}

#[test]
fn opening_never_writes_to_sources() {
    let mut rng = Rng::seeded("read_only");
    let sb = Sandbox::new();
    let spec = VhdSpec {
        size: 4 * MIB,
        block_size: BS,
        unique_id: id(1),
        parent: None,
        blocks: blocks(&mut rng, &[1], false),
    };
    let path = sb.path("ro.vhd");
    write_vhd(&path, &spec);
    let mut perms = std::fs::metadata(&path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o444);
    std::fs::set_permissions(&path, perms).unwrap();
    let before = file_hash(&path);
    let src = blockferry::open_image_with(&path, &OpenOptions::default()).unwrap();
    assert_eq!(src.info().format, "vhd");
    drop(src);
    sb.ok(&["map", path.to_str().unwrap()]);
    assert_eq!(file_hash(&path), before);
}

/// A chain one deeper than the limit (64) is refused; one within it is read.
#[test]
fn chain_depth_is_limited() {
    let sb = Sandbox::new();
    let spec = |n: u8, parent: Option<u8>| VhdSpec {
        size: 2 * MIB,
        block_size: BS,
        unique_id: [n; 16],
        parent: parent.map(|p| ParentSpec {
            unique_id: [p; 16],
            relative: Some(format!("d{p}.vhd")),
            absolute: None,
            name: String::new(),
        }),
        blocks: Vec::new(),
    };
    write_vhd(&sb.path("d0.vhd"), &spec(0, None));
    for n in 1..=64u8 {
        write_vhd(&sb.path(&format!("d{n}.vhd")), &spec(n, Some(n - 1)));
    }
    sb.ok(&["info", sb.path("d63.vhd").to_str().unwrap()]);
    let out = sb.run(&["info", sb.path("d64.vhd").to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("deeper than 64"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
