//! Change lists (VMware CBT and Hyper-V RCT JSON, plain extent lists), each format forced and
//! detected, against a disk size taken from the input. Seeds: fuzz/seed.sh.
#![no_main]

use blockferry::internals::changes::{ChangeFormat, ChangeList};
use libfuzzer_sys::{Corpus, fuzz_target};

fuzz_target!(|data: &[u8]| -> Corpus {
    let Some((size, text)) = data.split_first_chunk::<8>() else {
        return Corpus::Reject;
    };
    let disk = u64::from_le_bytes(*size);
    let mut ok = false;
    for format in [
        None,
        Some(ChangeFormat::VmwareCbt),
        Some(ChangeFormat::HypervRct),
        Some(ChangeFormat::Extents),
    ] {
        if let Ok(list) = ChangeList::parse(text, format, disk) {
            // Every extent lies within the disk, sorted and apart.
            let mut end = 0;
            for (i, e) in list.extents.iter().enumerate() {
                assert!(e.len > 0 && e.offset.checked_add(e.len).is_some_and(|x| x <= disk));
                assert!(i == 0 || e.offset > end);
                end = e.end();
            }
            let _ = list.extents.chunk_ranges(1 << 20);
            ok = true;
        }
    }
    if ok { Corpus::Keep } else { Corpus::Reject }
});
