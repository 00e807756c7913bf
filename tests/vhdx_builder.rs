//! Builds VHDX files from the specification, for what qemu-img cannot create: differencing
//! disks (partially present blocks, parent locators) and 4096-byte logical sectors.

use std::path::Path;

const MIB: usize = 1 << 20;

/// A dynamic (or, with `parent`, differencing) VHDX.
#[derive(Debug, Clone)]
pub struct VhdxSpec {
    pub size: u64,
    pub block_size: u32,
    pub logical_sector: u32,
    /// This file's data write GUID (children name it as `parent_linkage`).
    pub data_write_guid: [u8; 16],
    /// Parent's data write GUID and the relative path to record.
    pub parent: Option<([u8; 16], String)>,
    /// Present blocks: index, `block_size` bytes, sectors present (all when `None`).
    pub blocks: Vec<(u32, Vec<u8>, Option<Vec<bool>>)>,
}

fn guid_bytes(text: &str) -> [u8; 16] {
    let hex: String = text.chars().filter(|&c| c != '-').collect();
    let mut b = [0u8; 16];
    for (i, o) in b.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16).unwrap();
    }
    b[..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    b
}

fn guid_text(b: &[u8; 16]) -> String {
    let mut g = *b;
    g[..4].reverse();
    g[4..6].reverse();
    g[6..8].reverse();
    let h = g.iter().fold(String::new(), |mut acc, x| {
        use std::fmt::Write;
        write!(acc, "{x:02X}").unwrap();
        acc
    });
    format!(
        "{{{}-{}-{}-{}-{}}}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn put(b: &mut [u8], at: usize, v: &[u8]) {
    b[at..at + v.len()].copy_from_slice(v);
}

fn crc_at(b: &mut [u8], at: usize, len: usize) {
    b[at + 4..at + 8].fill(0);
    let c = crc32c::crc32c(&b[at..at + len]);
    b[at + 4..at + 8].copy_from_slice(&c.to_le_bytes());
}

fn utf16(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// Serialises a VHDX: identifier, 2 headers, 2 region tables, log, metadata, BAT, blocks.
pub fn vhdx_bytes(spec: &VhdxSpec) -> Vec<u8> {
    let bs = spec.block_size as usize;
    let chunk_ratio = ((1usize << 23) * spec.logical_sector as usize) / bs;
    let payload_blocks = usize::try_from(spec.size.div_ceil(u64::from(spec.block_size))).unwrap();
    let sb_blocks = payload_blocks.div_ceil(chunk_ratio);
    let entries = if spec.parent.is_some() {
        sb_blocks * (chunk_ratio + 1)
    } else {
        payload_blocks + (payload_blocks - 1) / chunk_ratio
    };
    let (log_at, meta_at, bat_at) = (MIB, 2 * MIB, 3 * MIB);
    let bat_len = (entries * 8).next_multiple_of(MIB);
    let mut f = vec![0u8; bat_at + bat_len];
    put(&mut f, 0, b"vhdxfile");
    // Headers.
    for (i, at) in [(1u64, 64 * 1024), (2, 128 * 1024)] {
        put(&mut f, at, b"head");
        put(&mut f, at + 8, &i.to_le_bytes());
        put(&mut f, at + 16, &[0x11; 16]);
        put(&mut f, at + 32, &spec.data_write_guid);
        put(&mut f, at + 66, &1u16.to_le_bytes());
        put(&mut f, at + 68, &u32::try_from(MIB).unwrap().to_le_bytes());
        put(&mut f, at + 72, &(log_at as u64).to_le_bytes());
        crc_at(&mut f, at, 4096);
    }
    // Region tables.
    for at in [192 * 1024, 256 * 1024] {
        put(&mut f, at, b"regi");
        put(&mut f, at + 8, &2u32.to_le_bytes());
        let regions = [
            ("2DC27766-F623-4200-9D64-115E9BFD4A08", bat_at, bat_len),
            ("8B7CA206-4790-4B9A-B8FE-575F050F886E", meta_at, MIB),
        ];
        for (k, (g, off, len)) in regions.iter().enumerate() {
            let e = at + 16 + k * 32;
            put(&mut f, e, &guid_bytes(g));
            put(&mut f, e + 16, &(*off as u64).to_le_bytes());
            put(&mut f, e + 24, &u32::try_from(*len).unwrap().to_le_bytes());
            put(&mut f, e + 28, &1u32.to_le_bytes());
        }
        crc_at(&mut f, at, 64 * 1024);
    }
    // Metadata items.
    let mut items: Vec<(&str, u32, Vec<u8>)> = vec![
        (
            "CAA16737-FA36-4D43-B3B6-33F0AA44E76B",
            4,
            [
                spec.block_size.to_le_bytes(),
                u32::from(spec.parent.is_some())
                    .wrapping_mul(2)
                    .to_le_bytes(),
            ]
            .concat(),
        ),
        (
            "2FA54224-CD1B-4876-B211-5DBED83BF4B8",
            6,
            spec.size.to_le_bytes().to_vec(),
        ),
        ("BECA12AB-B2E6-4523-93EF-C309E000C746", 6, vec![0x22; 16]),
        (
            "8141BF1D-A96F-4709-BA47-F233A8FAAB5F",
            6,
            spec.logical_sector.to_le_bytes().to_vec(),
        ),
        (
            "CDA348C7-445D-4471-9CC9-E9885251C556",
            6,
            4096u32.to_le_bytes().to_vec(),
        ),
    ];
    if let Some((linkage, rel)) = &spec.parent {
        let pairs = [
            ("parent_linkage", guid_text(linkage)),
            ("relative_path", rel.clone()),
        ];
        let mut item = guid_bytes("B04AEFB7-D19E-4A81-B789-25B8E9445913").to_vec();
        item.extend_from_slice(&[0, 0]);
        item.extend_from_slice(&u16::try_from(pairs.len()).unwrap().to_le_bytes());
        let mut strings = Vec::new();
        let base = 20 + pairs.len() * 12;
        for (k, v) in &pairs {
            let (kb, vb) = (utf16(k), utf16(v));
            let ko = base + strings.len();
            strings.extend_from_slice(&kb);
            let vo = base + strings.len();
            strings.extend_from_slice(&vb);
            item.extend_from_slice(&u32::try_from(ko).unwrap().to_le_bytes());
            item.extend_from_slice(&u32::try_from(vo).unwrap().to_le_bytes());
            item.extend_from_slice(&u16::try_from(kb.len()).unwrap().to_le_bytes());
            item.extend_from_slice(&u16::try_from(vb.len()).unwrap().to_le_bytes());
        }
        item.extend_from_slice(&strings);
        items.push(("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C", 4, item));
    }
    put(&mut f, meta_at, b"metadata");
    put(
        &mut f,
        meta_at + 10,
        &u16::try_from(items.len()).unwrap().to_le_bytes(),
    );
    let mut item_at = 64 * 1024;
    for (k, (g, flags, data)) in items.iter().enumerate() {
        let e = meta_at + 32 + k * 32;
        put(&mut f, e, &guid_bytes(g));
        put(
            &mut f,
            e + 16,
            &u32::try_from(item_at).unwrap().to_le_bytes(),
        );
        put(
            &mut f,
            e + 20,
            &u32::try_from(data.len()).unwrap().to_le_bytes(),
        );
        put(&mut f, e + 24, &flags.to_le_bytes());
        put(&mut f, meta_at + item_at, data);
        item_at += data.len().next_multiple_of(8);
    }
    // Blocks, sector bitmaps, BAT.
    let spb = bs / spec.logical_sector as usize;
    let mut bitmaps: Vec<Option<usize>> = vec![None; sb_blocks];
    for (idx, data, present) in &spec.blocks {
        let idx = *idx as usize;
        let at = f.len();
        f.extend_from_slice(data);
        let state = if present.is_some() { 7u64 } else { 6 };
        let entry = idx + idx / chunk_ratio;
        put(
            &mut f,
            bat_at + entry * 8,
            &(((at as u64) >> 20 << 20) | state).to_le_bytes(),
        );
        if let Some(p) = present {
            let chunk = idx / chunk_ratio;
            let sb_at = *bitmaps[chunk].get_or_insert_with(|| {
                let at = f.len();
                f.resize(at + MIB, 0);
                let e = chunk * (chunk_ratio + 1) + chunk_ratio;
                put(
                    &mut f,
                    bat_at + e * 8,
                    &(((at as u64) >> 20 << 20) | 6).to_le_bytes(),
                );
                at
            });
            for (s, &on) in p.iter().enumerate() {
                if on {
                    let bit = (idx % chunk_ratio) * spb + s;
                    f[sb_at + bit / 8] |= 1 << (bit % 8);
                }
            }
        }
    }
    f
}

/// Writes a VHDX file.
pub fn write_vhdx(path: &Path, spec: &VhdxSpec) {
    std::fs::write(path, vhdx_bytes(spec)).expect("writing VHDX");
}

/// The virtual disk a chain of specs (top first) reads as.
pub fn expected_raw(chain: &[&VhdxSpec]) -> Vec<u8> {
    let base = chain.last().expect("a chain has a base");
    let mut disk = vec![0u8; usize::try_from(base.size).unwrap()];
    for spec in chain.iter().rev() {
        let bs = spec.block_size as usize;
        let ls = spec.logical_sector as usize;
        for (idx, data, present) in &spec.blocks {
            for s in 0..bs / ls {
                if present.as_ref().is_none_or(|p| p[s]) {
                    let at = *idx as usize * bs + s * ls;
                    if at < disk.len() {
                        let n = ls.min(disk.len() - at);
                        disk[at..at + n].copy_from_slice(&data[s * ls..s * ls + n]);
                    }
                }
            }
        }
    }
    disk
}
