//! VHD footer, dynamic header, BAT, parent locators and sector bitmaps.
//! Seeds: fuzz/seed.sh (qemu-img vpc images, the Hyper-V corpus).
#![no_main]

use blockferry::internals::image::{MemFile, VhdLayout};
use libfuzzer_sys::{Corpus, fuzz_target};

fuzz_target!(|data: &[u8]| -> Corpus {
    let file = MemFile::new("fuzz.vhd", data.to_vec());
    let Ok(layout) = VhdLayout::parse(&file) else {
        return Corpus::Reject;
    };
    let size = layout.virtual_size();
    let mut out = Vec::new();
    // Fixed disks map through the file's data extents: pretend the whole file is data.
    let _ = layout.map(&file, 0, size, &[(0, size)], &mut out);
    Corpus::Keep
});
