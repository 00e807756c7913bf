//! VMDK text descriptors: keys, CIDs, extent lines.
//! Seeds: fuzz/seed.sh (descriptors of qemu-img vmdk images).
#![no_main]

use blockferry::internals::image::{Descriptor, MemFile};
use libfuzzer_sys::{Corpus, fuzz_target};

fuzz_target!(|data: &[u8]| -> Corpus {
    let file = MemFile::new("fuzz.vmdk", Vec::new());
    match Descriptor::parse(&file, 0, data) {
        Ok(_) => Corpus::Keep,
        Err(_) => Corpus::Reject,
    }
});
