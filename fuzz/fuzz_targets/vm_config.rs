//! VM configurations: Hyper-V's binary `.vmcx` (headers, object tables, key tables, parent
//! links, file objects) and VMware's `.vmx`/`.vmsd` text. Seeds: fuzz/seed.sh (the corpus's
//! `test.vmcx` and `encrypted.vmx`, and a `.vmx` with a snapshot tree).
#![no_main]

use blockferry::internals::vm::{VmcxFile, vmx_pairs};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = VmcxFile::parse("fuzz.vmcx", data.to_vec());
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = vmx_pairs(text);
    }
});
