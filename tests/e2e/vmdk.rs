//! VMDK: ESXi deltas built from the specification, and hostile descriptors and extents.

use blockferry::ErrorKind;
use blockferry::internals::image::{self, MemFile, SparseLayout};
use blockferry_tests::{MIB, Rng, Sandbox, file_hash, have_qemu, make_image, qemu, qemu_from_raw};

fn open_err(path: &std::path::Path) -> blockferry::Error {
    image::open(path).map(|_| ()).unwrap_err()
}

/// Writes a descriptor file.
fn descriptor(path: &std::path::Path, create_type: &str, extents: &str, extra: &str) {
    std::fs::write(
        path,
        format!("# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"{create_type}\"\n{extra}\n# Extent description\n{extents}\n"),
    )
    .unwrap();
}

/// An ESXi vmfsSparse (COWD) delta: header, grain directory, 4096-entry grain tables, grains.
fn cowd_bytes(sectors: u32, grain_sectors: u32, grains: &[(u32, Vec<u8>)]) -> Vec<u8> {
    let gtes = 4096u32;
    let n_gt = sectors.div_ceil(grain_sectors * gtes);
    let gd_at = 4u32; // sectors
    let gts_at = gd_at + (n_gt * 4).div_ceil(512);
    let data_at = gts_at + n_gt * gtes * 4 / 512;
    let mut f = vec![0u8; data_at as usize * 512];
    f[..4].copy_from_slice(b"COWD");
    f[4..8].copy_from_slice(&1u32.to_le_bytes());
    f[8..12].copy_from_slice(&3u32.to_le_bytes());
    f[12..16].copy_from_slice(&sectors.to_le_bytes());
    f[16..20].copy_from_slice(&grain_sectors.to_le_bytes());
    f[20..24].copy_from_slice(&gd_at.to_le_bytes());
    f[24..28].copy_from_slice(&n_gt.to_le_bytes());
    for t in 0..n_gt {
        let e = gd_at as usize * 512 + t as usize * 4;
        f[e..e + 4].copy_from_slice(&(gts_at + t * gtes * 4 / 512).to_le_bytes());
    }
    for (g, data) in grains {
        let sector = u32::try_from(f.len() / 512).unwrap();
        let t = g / gtes;
        let e = (gts_at + t * gtes * 4 / 512) as usize * 512 + (g % gtes) as usize * 4;
        f[e..e + 4].copy_from_slice(&sector.to_le_bytes());
        f.extend_from_slice(data);
    }
    f
}

/// An ESXi snapshot: a `vmfs` flat base and a `vmfsSparse` delta chained by parentCID.
#[test]
fn esxi_vmfs_sparse_delta_over_flat_base() {
    let mut rng = Rng::seeded("esxi_delta");
    let sb = Sandbox::new();
    let size = 12 * MIB;
    let base_data = rng.bytes(size as usize);
    std::fs::write(sb.path("vm-flat.vmdk"), &base_data).unwrap();
    descriptor(
        &sb.path("vm.vmdk"),
        "vmfs",
        &format!("RW {} VMFS \"vm-flat.vmdk\"", size / 512),
        "",
    );
    let grain = 2 * 512 * 64; // 64 KiB grains
    let grains: Vec<(u32, Vec<u8>)> = [0u32, 5, 17, 190]
        .iter()
        .map(|&g| (g, rng.bytes(grain)))
        .collect();
    std::fs::write(
        sb.path("vm-000001-delta.vmdk"),
        cowd_bytes(u32::try_from(size / 512).unwrap(), 128, &grains),
    )
    .unwrap();
    std::fs::write(
        sb.path("vm-000001.vmdk"),
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=aaaa0001\nparentCID=12345678\ncreateType=\"vmfsSparse\"\nparentFileNameHint=\"vm.vmdk\"\n# Extent description\nRW {} VMFSSPARSE \"vm-000001-delta.vmdk\"\n",
            size / 512
        ),
    )
    .unwrap();
    let mut want = base_data;
    for (g, data) in &grains {
        let at = *g as usize * grain;
        want[at..at + grain].copy_from_slice(data);
    }
    std::fs::write(sb.path("want.raw"), &want).unwrap();
    let out = sb.path("out.raw");
    sb.ok(&[
        "convert",
        sb.path("vm-000001.vmdk").to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(file_hash(&out), file_hash(&sb.path("want.raw")));
    // A parentCID that does not match the base is refused.
    let text = std::fs::read_to_string(sb.path("vm-000001.vmdk"))
        .unwrap()
        .replace("parentCID=12345678", "parentCID=12345679");
    std::fs::write(sb.path("vm-000001.vmdk"), text).unwrap();
    assert!(
        open_err(&sb.path("vm-000001.vmdk"))
            .to_string()
            .contains("not the image this child was made from")
    );
}

#[test]
fn hostile_descriptors_are_refused() {
    let sb = Sandbox::new();
    std::fs::write(sb.path("data.bin"), vec![1u8; 1 << 20]).unwrap();
    let inner = sb.path("inner");
    std::fs::create_dir(&inner).unwrap();
    std::os::unix::fs::symlink("/dev/zero", inner.join("dev.vmdk")).unwrap();
    let long = "a".repeat(65536);
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "abs",
            "RW 2048 FLAT \"/etc/passwd\" 0".into(),
            "monolithicFlat",
            "outside the image's folder",
        ),
        (
            "dotdot",
            "RW 2048 FLAT \"../data.bin\" 0".into(),
            "monolithicFlat",
            "outside the image's folder",
        ),
        (
            "device",
            "RW 2048 FLAT \"dev.vmdk\" 0".into(),
            "monolithicFlat",
            "outside the image's folder",
        ),
        (
            "long",
            format!("RW 2048 FLAT \"{long}\" 0"),
            "monolithicFlat",
            "too long",
        ),
        (
            "huge",
            "RW 99999999999999999 FLAT \"x\" 0".into(),
            "monolithicFlat",
            "sectors",
        ),
        (
            "zero-sectors",
            "RW 0 ZERO".into(),
            "monolithicFlat",
            "extent of 0 sectors",
        ),
        (
            "sum",
            "RW 137438953471 ZERO\nRW 137438953471 ZERO\nRW 10 ZERO".into(),
            "monolithicFlat",
            "more than 64 TiB",
        ),
        (
            "past-end",
            "RW 4096 FLAT \"../data.bin\" 0".into(),
            "custom",
            "allow_outside_folder",
        ),
        (
            "unknown-type",
            "RW 2048 ZERO".into(),
            "fullDevice",
            "not supported",
        ),
        (
            "noaccess",
            "NOACCESS 2048 FLAT \"x\" 0".into(),
            "monolithicFlat",
            "NOACCESS",
        ),
        (
            "bad-kind",
            "RW 2048 SESPARSEX \"x\"".into(),
            "monolithicFlat",
            "not supported",
        ),
        ("no-extents", String::new(), "monolithicFlat", "no extents"),
    ];
    for (name, extents, create_type, needle) in cases {
        let path = inner.join(format!("{name}.vmdk"));
        descriptor(&path, create_type, &extents, "");
        let e = open_err(&path);
        assert!(e.to_string().contains(needle), "{name}: {e}");
    }
    // Twice createType, a parent without a hint, a flat extent shorter than the descriptor says.
    let p = inner.join("twice.vmdk");
    descriptor(&p, "monolithicFlat", "RW 8 ZERO", "createType=\"vmfs\"");
    assert!(open_err(&p).to_string().contains("twice"));
    let p = inner.join("orphan.vmdk");
    std::fs::write(
        &p,
        "# Disk DescriptorFile\nCID=1\nparentCID=2\ncreateType=\"monolithicSparse\"\nRW 8 ZERO\n",
    )
    .unwrap();
    assert!(open_err(&p).to_string().contains("parentFileNameHint"));
    std::fs::write(inner.join("short.bin"), vec![0u8; 4096]).unwrap();
    let p = inner.join("short.vmdk");
    descriptor(&p, "monolithicFlat", "RW 2048 FLAT \"short.bin\" 0", "");
    assert!(open_err(&p).to_string().contains("the file is shorter"));
    // Not text at all.
    let p = inner.join("binary.vmdk");
    let mut bytes = b"# Disk DescriptorFile\ncreateType=\"custom\"\n".to_vec();
    bytes.extend_from_slice(&[0xff, 0xfe, 0x80]);
    std::fs::write(&p, bytes).unwrap();
    assert_eq!(open_err(&p).kind(), ErrorKind::InvalidImage);
    // A child that names itself as its parent.
    let p = inner.join("self.vmdk");
    std::fs::write(&p, "# Disk DescriptorFile\nCID=1\nparentCID=1\nparentFileNameHint=\"self.vmdk\"\ncreateType=\"monolithicFlat\"\nRW 8 ZERO\n").unwrap();
    assert!(open_err(&p).to_string().contains("loops back"));
}

/// Parses and maps a sparse extent in memory, inflating compressed grains as a read would.
fn read_all(bytes: Vec<u8>) -> blockferry::Result<()> {
    let f = MemFile::new("mem.vmdk", bytes);
    let layout = SparseLayout::parse(&f)?;
    let _ = blockferry::internals::image::ReadAt::size(&f);
    let mut maps = Vec::new();
    layout.map_extent(&f, 0, layout.capacity, &mut maps)?;
    for m in maps {
        if let blockferry::internals::image::Target::Deflate {
            offset,
            stored_len,
            grain_len,
            ..
        } = m.target
        {
            let mut packed = vec![0u8; stored_len as usize];
            blockferry::internals::image::ReadAt::read_exact_at(&f, &mut packed, offset)?;
            let mut grain = vec![0u8; grain_len as usize];
            image::inflate_grain(&packed, &mut grain)
                .map_err(|why| blockferry::Error::new(ErrorKind::InvalidImage, why))?;
        }
    }
    Ok(())
}

#[test]
fn damaged_sparse_extents_fail_cleanly() {
    if !have_qemu() {
        return;
    }
    let mut rng = Rng::seeded("damaged_sparse");
    let sb = Sandbox::new();
    let raw = sb.path("src.raw");
    make_image(
        &raw,
        6 * MIB,
        &[(0, rng.bytes(1 << 20)), (4 * MIB, rng.texty(1 << 20))],
    );
    for sub in ["monolithicSparse", "streamOptimized"] {
        let img = sb.path(&format!("{sub}.vmdk"));
        qemu_from_raw(&raw, &img, "vmdk", &format!("subformat={sub}"));
        let good = std::fs::read(&img).unwrap();
        read_all(good.clone()).unwrap();
        for len in (0..good.len())
            .step_by(512)
            .take(200)
            .chain((0..good.len()).step_by(65536))
        {
            if let Err(e) = read_all(good[..len].to_vec()) {
                assert!(
                    matches!(
                        e.kind(),
                        ErrorKind::InvalidImage | ErrorKind::UnsupportedImage
                    ),
                    "{sub} {len}: {e}"
                );
            }
        }
        let meta_end = 64 * 1024.min(good.len());
        for _ in 0..3000 {
            let mut bad = good.clone();
            let at = if rng.below(3) == 0 {
                bad.len() - 1 - rng.below(1536) as usize
            } else {
                rng.below(meta_end as u64) as usize
            };
            bad[at] ^= 1 << rng.below(8);
            if let Err(e) = read_all(bad) {
                assert!(
                    matches!(
                        e.kind(),
                        ErrorKind::InvalidImage | ErrorKind::UnsupportedImage
                    ),
                    "{sub}: {e}"
                );
            }
        }
    }
    // A zip bomb: a deflate stream that inflates far past a grain is refused, not inflated.
    let bomb = {
        use std::io::Write;
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        z.write_all(&vec![0u8; 64 << 20]).unwrap();
        z.finish().unwrap()
    };
    let mut grain = vec![0u8; 65536];
    assert!(image::inflate_grain(&bomb, &mut grain).is_err());
    assert!(image::inflate_grain(b"not deflate", &mut grain).is_err());
}

/// One disk of FLAT, ZERO and SPARSE extents (with an offset into the flat file).
#[test]
fn mixed_extent_descriptor() {
    if !have_qemu() {
        return;
    }
    let mut rng = Rng::seeded("mixed_extents");
    let sb = Sandbox::new();
    let flat = rng.bytes(5 << 20);
    std::fs::write(sb.path("f.bin"), &flat).unwrap();
    let sparse_raw = sb.path("s.raw");
    make_image(&sparse_raw, 3 * MIB, &[(512 * 1024, rng.bytes(1 << 20))]);
    qemu(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        sparse_raw.to_str().unwrap(),
        sb.path("s.vmdk").to_str().unwrap(),
    ]);
    descriptor(
        &sb.path("disk.vmdk"),
        "custom",
        "RW 8192 FLAT \"f.bin\" 2048\nRW 4096 ZERO\nRW 6144 SPARSE \"s.vmdk\"",
        "",
    );
    let mut want = flat[1 << 20..5 << 20].to_vec();
    want.extend_from_slice(&vec![0u8; 2 << 20]);
    want.extend_from_slice(&std::fs::read(&sparse_raw).unwrap());
    std::fs::write(sb.path("want.raw"), &want).unwrap();
    let out = sb.path("out.raw");
    sb.ok(&[
        "convert",
        sb.path("disk.vmdk").to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(file_hash(&out), file_hash(&sb.path("want.raw")));
    let info: serde_json::Value =
        serde_json::from_str(&sb.ok(&["info", sb.path("disk.vmdk").to_str().unwrap(), "--json"]))
            .unwrap();
    assert_eq!(info["virtual_size"], 9 * MIB);
    assert_eq!(
        info["allocated_bytes"],
        5 * MIB,
        "4 MiB of flat data + one 1 MiB of grains: {info}"
    );
}

/// A renamed single-file VMDK still names its old file in its embedded descriptor: the file
/// itself is read, as VMware and qemu do.
#[test]
fn renamed_monolithic_sparse_reads_itself() {
    if !have_qemu() {
        return;
    }
    let mut rng = Rng::seeded("renamed_vmdk");
    let sb = Sandbox::new();
    let raw = sb.path("src.raw");
    make_image(&raw, 4 * MIB, &[(MIB, rng.bytes(1 << 20))]);
    for sub in ["monolithicSparse", "streamOptimized"] {
        let original = sb.path(&format!("{sub}.vmdk"));
        qemu_from_raw(&raw, &original, "vmdk", &format!("subformat={sub}"));
        let renamed = sb.path(&format!("renamed-{sub}.vmdk"));
        std::fs::rename(&original, &renamed).unwrap();
        let out = sb.path(&format!("{sub}.raw"));
        sb.ok(&["convert", renamed.to_str().unwrap(), out.to_str().unwrap()]);
        assert_eq!(file_hash(&out), file_hash(&raw), "{sub}");
    }
}

/// A hosted sparse VMDK with deflate-compressed grains of `grain` bytes (as streamOptimized
/// grains are, with their markers), holding `data` from offset 0.
fn compressed_vmdk(data: &[u8], grain: usize) -> Vec<u8> {
    use std::io::Write;
    let sector = 512usize;
    let n = data.len().div_ceil(grain);
    assert!(n <= 512, "one grain table");
    let mut f = vec![0u8; 8 * sector];
    f[..4].copy_from_slice(b"KDMV");
    f[4..8].copy_from_slice(&1u32.to_le_bytes());
    f[8..12].copy_from_slice(&(1u32 << 16).to_le_bytes()); // compressed grains
    f[12..20].copy_from_slice(&((n * grain / sector) as u64).to_le_bytes());
    f[20..28].copy_from_slice(&((grain / sector) as u64).to_le_bytes());
    f[44..48].copy_from_slice(&512u32.to_le_bytes());
    f[56..64].copy_from_slice(&1u64.to_le_bytes()); // grain directory at sector 1
    f[73..77].copy_from_slice(b"\n \r\n");
    f[77..79].copy_from_slice(&1u16.to_le_bytes()); // deflate
    f[sector..sector + 4].copy_from_slice(&2u32.to_le_bytes()); // its table at sector 2
    for (g, piece) in data.chunks(grain).enumerate() {
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(piece).unwrap();
        let packed = z.finish().unwrap();
        let at = f.len();
        let gte = 2 * sector + 4 * g;
        f[gte..gte + 4].copy_from_slice(&((at / sector) as u32).to_le_bytes());
        f.extend_from_slice(&((g * grain / sector) as u64).to_le_bytes());
        f.extend_from_slice(&(packed.len() as u32).to_le_bytes());
        f.extend_from_slice(&packed);
        f.resize(f.len().next_multiple_of(sector), 0);
    }
    f
}

/// Issue 16.14: a compressed grain larger than a chunk is read and inflated once, not once per
/// chunk it holds. Before the fix two 64 MiB grains replicated into 64 KiB chunks were
/// inflated 1024 times each (`bytes_read` counted 1024 × their compressed size).
#[test]
fn large_compressed_grains_are_inflated_once() {
    let mut rng = Rng::seeded("large_grains");
    let sb = Sandbox::new();
    sb.init(&["--chunk-size", "64K"]);
    let data = rng.texty(128 << 20);
    let image = sb.path("grains.vmdk");
    let bytes = compressed_vmdk(&data, 64 << 20);
    std::fs::write(&image, &bytes).unwrap();
    let raw = sb.path("grains.raw");
    std::fs::write(&raw, &data).unwrap();
    let r = sb.replicate(&image, &[]);
    assert!(
        r["bytes_read"].as_u64().unwrap() <= bytes.len() as u64,
        "read {} of a {}-byte file: grains inflated more than once",
        r["bytes_read"],
        bytes.len()
    );
    let snap = r["snapshot"].as_str().unwrap();
    let out = sb.restore(snap, "out.raw");
    assert_eq!(file_hash(&out), file_hash(&raw));
    let v = sb.json(&[
        "verify",
        "--store",
        &sb.store(),
        snap,
        "--image",
        image.to_str().unwrap(),
    ]);
    assert_eq!(v["ok"], true, "{v}");
    let conv = sb.path("conv.raw");
    let c = sb.json(&["convert", image.to_str().unwrap(), conv.to_str().unwrap()]);
    assert!(
        c["bytes_read"].as_u64().unwrap() <= 2 * bytes.len() as u64,
        "{c}"
    );
    assert_eq!(file_hash(&conv), file_hash(&raw));
}
