//! VHDX headers, region tables, metadata, parent locator, BAT, sector bitmaps and log replay.
//! Seeds: fuzz/seed.sh (qemu-img vhdx images, the Hyper-V corpus).
#![no_main]

use blockferry::internals::image::{MemFile, VhdxLayout};
use libfuzzer_sys::{Corpus, fuzz_target};

fuzz_target!(|data: &[u8]| -> Corpus {
    let file = MemFile::new("fuzz.vhdx", data.to_vec());
    let Ok(layout) = VhdxLayout::parse(&file) else {
        return Corpus::Reject;
    };
    let mut out = Vec::new();
    let _ = layout.map(&file, 0, layout.virtual_size(), &mut out);
    Corpus::Keep
});
