//! Hostile VHDX files: a qemu-made image, damaged in memory, must fail cleanly or read.

use blockferry::ErrorKind;
use blockferry::internals::image::{MemFile, Target, VhdxLayout};
use blockferry_tests::{
    MIB, Rng, Sandbox, Value, have_qemu, make_image, qemu, qemu_from_raw, qemu_io,
};

/// Header 1, header 2, region table 1, region table 2 (MS-VHDX 2.1).
const H1: usize = 64 * 1024;
const H2: usize = 128 * 1024;
const RT1: usize = 192 * 1024;
const RT2: usize = 256 * 1024;
/// Size of a region table and of the metadata table.
const TABLE: usize = 64 * 1024;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Recomputes the CRC-32C of the structure `[at, at + len)` (checksum at `at + 4`).
fn fix_crc(b: &mut [u8], at: usize, len: usize) {
    b[at + 4..at + 8].fill(0);
    let c = crc32c::crc32c(&b[at..at + len]);
    b[at + 4..at + 8].copy_from_slice(&c.to_le_bytes());
}

/// Parses and maps a whole VHDX held in memory.
fn map_all(bytes: Vec<u8>) -> blockferry::Result<u64> {
    let f = MemFile::new("mem.vhdx", bytes);
    let layout = VhdxLayout::parse(&f)?;
    let mut out = Vec::new();
    layout.map(&f, 0, layout.virtual_size(), &mut out)?;
    Ok(out
        .iter()
        .filter(|m| matches!(m.target, Target::Data { .. }))
        .map(|m| m.len)
        .sum())
}

/// (BAT offset, metadata offset) from region table 1.
fn regions(b: &[u8]) -> (usize, usize) {
    let t = 192 * 1024;
    let (mut bat, mut meta) = (0, 0);
    for e in 0..le32(b, t + 8) as usize {
        let ent = t + 16 + e * 32;
        let off = usize::try_from(le64(b, ent + 16)).unwrap();
        if b[ent] == 0x66 {
            bat = off; // 2DC27766-…
        } else {
            meta = off;
        }
    }
    (bat, meta)
}

fn sample(sb: &Sandbox, rng: &mut Rng) -> Vec<u8> {
    let raw = sb.path("src.raw");
    make_image(
        &raw,
        12 * MIB,
        &[(0, rng.bytes(3 << 20)), (8 * MIB, rng.bytes(1 << 20))],
    );
    let img = sb.path("x.vhdx");
    qemu_from_raw(&raw, &img, "vhdx", "block_size=1M");
    std::fs::read(img).unwrap()
}

#[test]
fn damaged_vhdx_fails_cleanly() {
    if !have_qemu() {
        return;
    }
    let mut rng = Rng::seeded("damaged_vhdx");
    let sb = Sandbox::new();
    let good = sample(&sb, &mut rng);
    assert_eq!(map_all(good.clone()).unwrap(), 4 * MIB);
    let (bat, meta) = regions(&good);

    // Truncation at every structure boundary and every 64 KiB.
    let bounds = [
        0,
        7,
        8,
        H1,
        H1 + 4095,
        H2,
        RT1,
        RT2,
        RT2 + 64 * 1024,
        1 << 20,
        bat,
        bat + 8,
        meta,
        meta + TABLE,
    ];
    for len in bounds
        .into_iter()
        .chain((0..good.len()).step_by(TABLE))
        .chain([good.len() - 1])
    {
        let len = len.min(good.len());
        if let Err(e) = map_all(good[..len].to_vec()) {
            assert!(
                matches!(
                    e.kind(),
                    ErrorKind::InvalidImage | ErrorKind::UnsupportedImage
                ),
                "{len}: {e}"
            );
            assert!(
                e.path().is_some() && e.offset().is_some(),
                "{len}: error lacks file or offset: {e}"
            );
        }
    }
    // Random bit flips in headers, region tables, metadata and BAT: errors or reads, no panic.
    let areas = [
        (H1, 4096),
        (H2, 4096),
        (RT1, TABLE),
        (RT2, TABLE),
        (meta, TABLE + 4096),
        (bat, 64),
    ];
    for _ in 0..4000 {
        let (start, len) = areas[rng.below(areas.len() as u64) as usize];
        let mut bad = good.clone();
        bad[start + rng.below(len as u64) as usize] ^= 1 << rng.below(8);
        if let Err(e) = map_all(bad) {
            assert!(
                matches!(
                    e.kind(),
                    ErrorKind::InvalidImage | ErrorKind::UnsupportedImage
                ),
                "{e}"
            );
        }
    }
}

#[test]
fn vhdx_header_and_table_rules() {
    if !have_qemu() {
        return;
    }
    let mut rng = Rng::seeded("vhdx_rules");
    let sb = Sandbox::new();
    let good = sample(&sb, &mut rng);
    let err = |b: Vec<u8>| map_all(b).unwrap_err().to_string();
    // One damaged header: the other is used.
    let mut one = good.clone();
    one[H1 + 100] ^= 1;
    assert_eq!(map_all(one).unwrap(), 4 * MIB);
    // Both damaged: refused.
    let mut both = good.clone();
    both[H1 + 100] ^= 1;
    both[H2 + 100] ^= 1;
    assert!(err(both).contains("neither header is valid"));
    // Equal sequence numbers with different contents: refused.
    let mut eq = good.clone();
    let seq = le64(&eq, H1 + 8);
    eq[H2 + 8..H2 + 16].copy_from_slice(&seq.to_le_bytes());
    eq[H2 + 16] ^= 0xff; // a different file write GUID
    fix_crc(&mut eq, H2, 4096);
    assert!(err(eq).contains("sequence number"));
    // A header that asks for a replay of a log holding no entries is corrupt (MS-VHDX 2.3.3).
    let mut log = good.clone();
    for at in [65536usize, H2] {
        log[at + 48] = 1; // log GUID non-zero
        fix_crc(&mut log, at, 4096);
    }
    let e = map_all(log).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidImage);
    assert!(e.to_string().contains("no valid sequence"), "{e}");
    // Region table entry count above the maximum; the second table takes over.
    let mut regi = good.clone();
    regi[RT1 + 8..RT1 + 12].copy_from_slice(&5000u32.to_le_bytes());
    fix_crc(&mut regi, RT1, TABLE);
    assert_eq!(map_all(regi.clone()).unwrap(), 4 * MIB);
    regi[RT2 + 8..RT2 + 12].copy_from_slice(&5000u32.to_le_bytes());
    fix_crc(&mut regi, RT2, TABLE);
    assert!(err(regi).contains("more than the 2047 allowed"));
    // BAT entries past the end of the file or into the headers.
    let (bat, meta) = regions(&good);
    let mut past = good.clone();
    past[bat..bat + 8].copy_from_slice(&((1u64 << 40) | 6).to_le_bytes());
    assert!(err(past).contains("outside the file's data area"));
    let mut into = good.clone();
    into[bat..bat + 8]
        .copy_from_slice(&((u64::try_from(meta).unwrap() << 20 >> 20) | 6).to_le_bytes());
    let e = err(into);
    assert!(e.contains("overlaps") || e.contains("outside"), "{e}");
    let mut reserved_state = good.clone();
    reserved_state[bat] = (reserved_state[bat] & !7) | 4;
    assert!(err(reserved_state).contains("state 4"));
    // Metadata values out of range: find the items through the table.
    let item = |b: &[u8], first: u8| -> usize {
        (0..usize::from(u16::from_le_bytes([b[meta + 10], b[meta + 11]])))
            .map(|e| meta + 32 + e * 32)
            .find(|&ent| b[ent + 3] == first)
            .map(|ent| meta + le32(b, ent + 16) as usize)
            .unwrap()
    };
    let mut bs = good.clone();
    let at = item(&bs, 0xca); // file parameters CAA16737-…
    bs[at..at + 4].copy_from_slice(&(3u32 << 20).to_le_bytes());
    assert!(err(bs).contains("block size"));
    let mut sector = good.clone();
    let at = item(&sector, 0x81); // logical sector size 8141BF1D-…
    sector[at..at + 4].copy_from_slice(&1024u32.to_le_bytes());
    assert!(err(sector).contains("only 512 and 4096"));
    let mut vsize = good.clone();
    let at = item(&vsize, 0x2f); // virtual disk size 2FA54224-…
    vsize[at..at + 8].copy_from_slice(&(u64::MAX - 7).to_le_bytes());
    assert!(err(vsize).contains("up to 64 TiB"));
}

/// A log entry (MS-VHDX 2.3.1) writing whole 4 KiB sectors at file offsets.
fn log_entry(guid: &[u8; 16], seq: u64, tail: u32, writes: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let n = writes.len();
    let desc_sectors = (n + 2).div_ceil(128);
    let len = (desc_sectors + n) * 4096;
    let mut e = vec![0u8; len];
    e[..4].copy_from_slice(b"loge");
    e[8..12].copy_from_slice(&u32::try_from(len).unwrap().to_le_bytes());
    e[12..16].copy_from_slice(&tail.to_le_bytes());
    e[16..24].copy_from_slice(&seq.to_le_bytes());
    e[24..28].copy_from_slice(&u32::try_from(n).unwrap().to_le_bytes());
    e[32..48].copy_from_slice(guid);
    e[48..56].copy_from_slice(&(1u64 << 20).to_le_bytes()); // flushed file offset
    e[56..64].copy_from_slice(&(1u64 << 20).to_le_bytes()); // last file offset
    for (i, (off, data)) in writes.iter().enumerate() {
        let d = 64 + i * 32;
        e[d..d + 4].copy_from_slice(b"desc");
        e[d + 4..d + 8].copy_from_slice(&data[4092..4096]);
        e[d + 8..d + 16].copy_from_slice(&data[..8]);
        e[d + 16..d + 24].copy_from_slice(&off.to_le_bytes());
        e[d + 24..d + 32].copy_from_slice(&seq.to_le_bytes());
        let s = (desc_sectors + i) * 4096;
        e[s..s + 4].copy_from_slice(b"data");
        e[s + 4..s + 8].copy_from_slice(&u32::try_from(seq >> 32).unwrap().to_le_bytes());
        e[s + 8..s + 4092].copy_from_slice(&data[8..4092]);
        e[s + 4092..s + 4096]
            .copy_from_slice(&u32::try_from(seq & 0xffff_ffff).unwrap().to_le_bytes());
    }
    let c = crc32c::crc32c(&e);
    e[4..8].copy_from_slice(&c.to_le_bytes());
    e
}

/// Puts `entries` into the log of `img` and sets the log GUID in both headers.
fn dirty(img: &[u8], entries: &[Vec<u8>], guid: &[u8; 16]) -> Vec<u8> {
    let mut b = img.to_vec();
    let log_at = usize::try_from(le64(&b, H1 + 72)).unwrap();
    let mut at = log_at;
    for e in entries {
        b[at..at + e.len()].copy_from_slice(e);
        at += e.len();
    }
    for h in [65536usize, H2] {
        b[h + 48..h + 64].copy_from_slice(guid);
        fix_crc(&mut b, h, 4096);
    }
    b
}

#[test]
fn dirty_logs_are_replayed_in_memory() {
    if !have_qemu() {
        return;
    }
    let mut rng = Rng::seeded("vhdx_log");
    let sb = Sandbox::new();
    let good = sample(&sb, &mut rng);
    let (bat, _) = regions(&good);
    let guid = [0x5a; 16];
    // Entry 1 sets block 0 to the zero state; entry 2 (next in sequence) unallocates block 2.
    let mut sector = good[bat..bat + 4096].to_vec();
    sector[0] = (sector[0] & !7) | 2;
    let first = log_entry(
        &guid,
        7,
        0,
        &[(u64::try_from(bat).unwrap(), sector.clone())],
    );
    sector[16] &= !7;
    let second = log_entry(&guid, 8, 0, &[(u64::try_from(bat).unwrap(), sector)]);
    let img = dirty(&good, &[first.clone(), second], &guid);
    assert_eq!(
        map_all(img.clone()).unwrap(),
        2 * MIB,
        "blocks 0 and 2 no longer hold data"
    );

    // Through the CLI: the note says so, and the file itself is not changed.
    let path = sb.path("dirty.vhdx");
    std::fs::write(&path, &img).unwrap();
    let before = blockferry_tests::file_hash(&path);
    let info: serde_json::Value =
        serde_json::from_str(&sb.ok(&["info", path.to_str().unwrap(), "--json"])).unwrap();
    assert!(
        info["notes"][0]
            .as_str()
            .unwrap()
            .contains("replayed in memory"),
        "{info}"
    );
    let out = sb.path("dirty.raw");
    sb.ok(&["convert", path.to_str().unwrap(), out.to_str().unwrap()]);
    let raw = std::fs::read(&out).unwrap();
    assert!(raw[..1 << 20].iter().all(|&b| b == 0));
    assert!(raw[2 << 20..3 << 20].iter().all(|&b| b == 0));
    assert!(raw[(1 << 20)..(2 << 20)].iter().any(|&b| b != 0));
    assert_eq!(
        blockferry_tests::file_hash(&path),
        before,
        "replay wrote to the source"
    );

    // A damaged entry: no valid sequence, refused.
    let mut broken = first;
    broken[5000] ^= 1;
    let e = map_all(dirty(&good, &[broken], &guid)).unwrap_err();
    assert!(e.to_string().contains("no valid sequence"), "{e}");
    // A log that rewrites payload data is refused by name.
    let payload_at = usize::try_from((le64(&good, bat) >> 20) << 20).unwrap();
    let data_entry = log_entry(
        &guid,
        3,
        0,
        &[(u64::try_from(payload_at).unwrap(), vec![9u8; 4096])],
    );
    let e = map_all(dirty(&good, &[data_entry], &guid)).unwrap_err();
    assert!(e.to_string().contains("rewrites payload block"), "{e}");
}

/// A differencing VHDX over a dynamic one, with partially present blocks, for 512- and
/// 4096-byte logical sectors: reads as the model says, through the CLI and a round trip.
#[test]
fn differencing_vhdx_chains() {
    use blockferry_tests::vhdx_builder::{VhdxSpec, expected_raw, write_vhdx};
    let mut rng = Rng::seeded("vhdx_chains");
    for (ls, bs) in [(512u32, 1u32 << 20), (4096, 2 << 20)] {
        let sb = Sandbox::new();
        let size = 9 * MIB + u64::from(ls) * 3;
        let sectors = (bs / ls) as usize;
        let mut block = |i: u32, partial: bool| {
            (
                i,
                rng.bytes(bs as usize),
                partial.then(|| {
                    (0..sectors)
                        .map(|_| rng.below(3) == 0)
                        .collect::<Vec<bool>>()
                }),
            )
        };
        let base = VhdxSpec {
            size,
            block_size: bs,
            logical_sector: ls,
            data_write_guid: [0xb1; 16],
            parent: None,
            blocks: vec![block(0, false), block(1, false), block(3, false)],
        };
        let top = VhdxSpec {
            size,
            block_size: bs,
            logical_sector: ls,
            data_write_guid: [0xc2; 16],
            parent: Some(([0xb1; 16], ".\\base.vhdx".into())),
            blocks: vec![block(1, true), block(2, true), block(3, false)],
        };
        write_vhdx(&sb.path("base.vhdx"), &base);
        write_vhdx(&sb.path("top.avhdx"), &top);
        let want = sb.path("want.raw");
        std::fs::write(&want, expected_raw(&[&top, &base])).unwrap();
        let top_path = sb.path("top.avhdx");
        let info: serde_json::Value =
            serde_json::from_str(&sb.ok(&["info", top_path.to_str().unwrap(), "--json"])).unwrap();
        assert_eq!(info["logical_sector_size"], ls);
        assert_eq!(info["chain"].as_array().unwrap().len(), 2, "{info}");
        let out = sb.path("out.raw");
        sb.ok(&["convert", top_path.to_str().unwrap(), out.to_str().unwrap()]);
        assert_eq!(
            blockferry_tests::file_hash(&out),
            blockferry_tests::file_hash(&want),
            "logical sector {ls}"
        );
        sb.init(&["--no-encryption"]);
        let r = sb.replicate(&top_path, &[]);
        let restored = sb.restore(r["snapshot"].as_str().unwrap(), "restored.raw");
        assert_eq!(
            blockferry_tests::file_hash(&restored),
            blockferry_tests::file_hash(&want)
        );
        // The wrong parent (another data write GUID) is refused.
        let mut impostor = base.clone();
        impostor.data_write_guid = [0xee; 16];
        write_vhdx(&sb.path("base.vhdx"), &impostor);
        let out = sb.run(&["info", top_path.to_str().unwrap()]);
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("not the image this child was made from")
        );
    }
}

/// Inputs found by review: overflowing BAT offsets, sequence numbers at `u64::MAX`, zero
/// descriptors at the top of the address space or repeated to exhaust time: clean errors.
#[test]
fn review_findings_fail_cleanly() {
    if !have_qemu() {
        return;
    }
    let mut rng = Rng::seeded("vhdx_review");
    let sb = Sandbox::new();
    let good = sample(&sb, &mut rng);
    let (bat, _) = regions(&good);
    let mut wrap = good.clone();
    wrap[bat..bat + 8].copy_from_slice(&0xFFFF_FFFF_FFF0_0006u64.to_le_bytes());
    assert!(
        map_all(wrap)
            .unwrap_err()
            .to_string()
            .contains("outside the file's data area")
    );

    let guid = [0x77; 16];
    let sector = good[bat..bat + 4096].to_vec();
    let at_bat = u64::try_from(bat).unwrap();
    let max_seq = log_entry(&guid, u64::MAX, 0, &[(at_bat, sector.clone())]);
    let next = log_entry(&guid, 1, 0, &[(at_bat, sector.clone())]);
    let img = dirty(&good, &[max_seq, next], &guid);
    let _ = map_all(img); // a clean result or a clean error, never a panic

    // A zero descriptor at the top of the address space invalidates its entry.
    let zero_entry = |count: usize, offset: u64, len: u64| {
        let desc_sectors = (count + 2).div_ceil(128);
        let mut e = vec![0u8; desc_sectors * 4096];
        e[..4].copy_from_slice(b"loge");
        let len_field = u32::try_from(e.len()).unwrap().to_le_bytes();
        e[8..12].copy_from_slice(&len_field);
        e[16..24].copy_from_slice(&9u64.to_le_bytes());
        e[24..28].copy_from_slice(&u32::try_from(count).unwrap().to_le_bytes());
        e[32..48].copy_from_slice(&guid);
        e[48..56].copy_from_slice(&(1u64 << 20).to_le_bytes());
        e[56..64].copy_from_slice(&(1u64 << 20).to_le_bytes());
        for i in 0..count {
            let d = 64 + i * 32;
            e[d..d + 4].copy_from_slice(b"zero");
            e[d + 8..d + 16].copy_from_slice(&len.to_le_bytes());
            e[d + 16..d + 24].copy_from_slice(&offset.to_le_bytes());
            e[d + 24..d + 32].copy_from_slice(&9u64.to_le_bytes());
        }
        let c = crc32c::crc32c(&e);
        e[4..8].copy_from_slice(&c.to_le_bytes());
        e
    };
    let top = dirty(
        &good,
        &[zero_entry(1, 0xFFFF_FFFF_FFFF_F000, 0x2000)],
        &guid,
    );
    assert!(
        map_all(top)
            .unwrap_err()
            .to_string()
            .contains("no valid sequence")
    );
    // Thousands of zero descriptors over the same 4 GiB: refused for the work, quickly.
    let flood = dirty(&good, &[zero_entry(2000, 0, 4 << 30)], &guid);
    let started = std::time::Instant::now();
    let e = map_all(flood).unwrap_err();
    assert!(
        e.to_string()
            .contains("more of the file than blockferry replays"),
        "{e}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
}

/// Issue 16.15: valid large VHDX are read. Before the fix a fixed 64 MiB BAT cap refused
/// 10 TiB in 1 MiB blocks (Microsoft's recommendation for Linux guests); the cap is now what
/// the format allows for the virtual size.
#[test]
fn large_vhdx_are_read() {
    if !have_qemu() {
        return;
    }
    let sb = Sandbox::new();
    for (size, block) in [(10u64 << 40, "1M"), (16 << 40, "2M"), (64 << 40, "8M")] {
        let path = sb.path(&format!("big-{block}.vhdx"));
        qemu(&[
            "create",
            "-f",
            "vhdx",
            "-o",
            &format!("block_size={block},subformat=dynamic"),
            path.to_str().unwrap(),
            &size.to_string(),
        ]);
        let at = size - (3 << 20);
        qemu_io(&path, &format!("write -P 9 {at} 1M"));
        let map = sb.json(&["map", path.to_str().unwrap()]);
        let data: Vec<&Value> = map
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"] == true)
            .collect();
        // The block written, whole (qemu allocates whole blocks).
        assert_eq!(data.len(), 1, "{block}: {map}");
        let (start, len) = (
            data[0]["start"].as_u64().unwrap(),
            data[0]["length"].as_u64().unwrap(),
        );
        assert!(
            start <= at && start + len >= at + MIB && len <= 8 * MIB,
            "{block}: {map}"
        );
        let info = sb.json(&["info", path.to_str().unwrap()]);
        assert_eq!(info["virtual_size"], size);
    }
}
