//! VMDK sparse extents (KDMV hosted sparse, streamOptimized footer and deflate grains, COWD):
//! header, grain directory, grain tables, grain markers, inflation.
//! Seeds: fuzz/seed.sh (qemu-img monolithicSparse and streamOptimized images).
#![no_main]

use blockferry::internals::image::{MemFile, ReadAt, SparseLayout, Target, inflate_grain};
use libfuzzer_sys::{Corpus, fuzz_target};

fuzz_target!(|data: &[u8]| -> Corpus {
    let file = MemFile::new("fuzz.vmdk", data.to_vec());
    let Ok(layout) = SparseLayout::parse(&file) else {
        return Corpus::Reject;
    };
    let mut maps = Vec::new();
    if layout
        .map_extent(&file, 0, layout.capacity, &mut maps)
        .is_ok()
    {
        for m in maps.iter().take(256) {
            if let Target::Deflate {
                offset,
                stored_len,
                grain_len,
                ..
            } = m.target
            {
                let mut packed = vec![0u8; stored_len as usize];
                if file.read_exact_at(&mut packed, offset).is_ok() {
                    let mut grain = vec![0u8; grain_len as usize];
                    let _ = inflate_grain(&packed, &mut grain);
                }
            }
        }
    }
    Corpus::Keep
});
