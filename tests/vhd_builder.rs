//! Builds VHD files from the specification, for what qemu-img cannot create (differencing
//! disks, hostile variants).

use std::path::Path;

/// Parent reference of a differencing disk.
#[derive(Debug, Clone)]
pub struct ParentSpec {
    /// The parent's footer unique id.
    pub unique_id: [u8; 16],
    /// `W2ru` locator (relative Windows path), if any.
    pub relative: Option<String>,
    /// `W2ku` locator (absolute Windows path), if any.
    pub absolute: Option<String>,
    /// Parent unicode name in the header.
    pub name: String,
}

/// A dynamic (or, with `parent`, differencing) VHD.
#[derive(Debug, Clone)]
pub struct VhdSpec {
    pub size: u64,
    pub block_size: u32,
    pub unique_id: [u8; 16],
    pub parent: Option<ParentSpec>,
    /// Allocated blocks: index, `block_size` bytes of data, sectors present (all when `None`).
    pub blocks: Vec<(u32, Vec<u8>, Option<Vec<bool>>)>,
}

fn checksum(b: &[u8]) -> u32 {
    !b.iter().fold(0u32, |a, &x| a.wrapping_add(u32::from(x)))
}

fn footer(spec: &VhdSpec, disk_type: u32) -> [u8; 512] {
    let mut f = [0u8; 512];
    f[..8].copy_from_slice(b"conectix");
    f[8..12].copy_from_slice(&2u32.to_be_bytes());
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    f[16..24].copy_from_slice(&512u64.to_be_bytes());
    f[28..32].copy_from_slice(b"win ");
    f[36..40].copy_from_slice(b"Wi2k");
    f[40..48].copy_from_slice(&spec.size.to_be_bytes());
    f[48..56].copy_from_slice(&spec.size.to_be_bytes());
    f[56..60].copy_from_slice(&[0xff, 0xff, 16, 255]);
    f[60..64].copy_from_slice(&disk_type.to_be_bytes());
    f[68..84].copy_from_slice(&spec.unique_id);
    let c = checksum(&f);
    f[64..68].copy_from_slice(&c.to_be_bytes());
    f
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// Serialises a VHD: footer copy, dynamic header, BAT, locators, blocks, footer.
pub fn vhd_bytes(spec: &VhdSpec) -> Vec<u8> {
    let bs = u64::from(spec.block_size);
    let n_blocks = spec.size.div_ceil(bs);
    let bat_at = 1536u64;
    let bat_len = (n_blocks * 4).next_multiple_of(512);
    let mut out = vec![0u8; usize::try_from(bat_at + bat_len).unwrap()];
    let disk_type = if spec.parent.is_some() { 4 } else { 3 };
    let mut hdr = [0u8; 1024];
    hdr[..8].copy_from_slice(b"cxsparse");
    hdr[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
    hdr[16..24].copy_from_slice(&bat_at.to_be_bytes());
    hdr[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    hdr[28..32].copy_from_slice(&u32::try_from(n_blocks).unwrap().to_be_bytes());
    hdr[32..36].copy_from_slice(&spec.block_size.to_be_bytes());
    let mut locators: Vec<(&[u8; 4], Vec<u8>)> = Vec::new();
    if let Some(p) = &spec.parent {
        hdr[40..56].copy_from_slice(&p.unique_id);
        let name: Vec<u8> = p.name.encode_utf16().flat_map(u16::to_be_bytes).collect();
        hdr[64..64 + name.len().min(512)].copy_from_slice(&name[..name.len().min(512)]);
        if let Some(r) = &p.relative {
            locators.push((b"W2ru", utf16le(r)));
        }
        if let Some(a) = &p.absolute {
            locators.push((b"W2ku", utf16le(a)));
        }
    }
    for (i, (code, data)) in locators.iter().enumerate() {
        let at = out.len() as u64;
        let space = (data.len() as u64).next_multiple_of(512).max(512);
        out.resize(usize::try_from(at + space).unwrap(), 0);
        out[usize::try_from(at).unwrap()..][..data.len()].copy_from_slice(data);
        let e = 576 + i * 24;
        hdr[e..e + 4].copy_from_slice(*code);
        hdr[e + 4..e + 8].copy_from_slice(&u32::try_from(space).unwrap().to_be_bytes());
        hdr[e + 8..e + 12].copy_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
        hdr[e + 16..e + 24].copy_from_slice(&at.to_be_bytes());
    }
    let c = checksum(&hdr);
    hdr[36..40].copy_from_slice(&c.to_be_bytes());
    out[512..1536].copy_from_slice(&hdr);
    let bitmap_len = usize::try_from((bs / 512).div_ceil(8).next_multiple_of(512)).unwrap();
    for (idx, data, present) in &spec.blocks {
        let at = out.len();
        let sector = u32::try_from(at / 512).unwrap();
        let e = usize::try_from(bat_at).unwrap() + *idx as usize * 4;
        out[e..e + 4].copy_from_slice(&sector.to_be_bytes());
        let mut bitmap = vec![0u8; bitmap_len];
        for s in 0..(bs / 512) as usize {
            if present.as_ref().is_none_or(|p| p[s]) {
                bitmap[s / 8] |= 0x80 >> (s % 8);
            }
        }
        out.extend_from_slice(&bitmap);
        out.extend_from_slice(data);
    }
    // Unallocated BAT entries.
    let allocated: Vec<u32> = spec.blocks.iter().map(|b| b.0).collect();
    for i in 0..u32::try_from(n_blocks).unwrap() {
        if !allocated.contains(&i) {
            let e = usize::try_from(bat_at).unwrap() + i as usize * 4;
            out[e..e + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        }
    }
    let f = footer(spec, disk_type);
    out[..512].copy_from_slice(&f);
    out.extend_from_slice(&f);
    out
}

/// Writes a VHD file.
pub fn write_vhd(path: &Path, spec: &VhdSpec) {
    std::fs::write(path, vhd_bytes(spec)).expect("writing VHD");
}

/// The virtual disk a chain of specs (top first) reads as.
pub fn expected_raw(chain: &[&VhdSpec]) -> Vec<u8> {
    let base = chain.last().expect("a chain has a base");
    let mut disk = vec![0u8; usize::try_from(base.size).unwrap()];
    for spec in chain.iter().rev() {
        let bs = spec.block_size as usize;
        for (idx, data, present) in &spec.blocks {
            for s in 0..bs / 512 {
                if present.as_ref().is_none_or(|p| p[s]) {
                    let at = *idx as usize * bs + s * 512;
                    if at < disk.len() {
                        let n = 512.min(disk.len() - at);
                        disk[at..at + n].copy_from_slice(&data[s * 512..s * 512 + n]);
                    }
                }
            }
        }
    }
    disk
}
