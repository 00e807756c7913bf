//! OVA archives: tar headers (checksums, octal and base-256 sizes, long names) and the OVF
//! descriptor (XML: its disks and virtual systems). Seeds: fuzz/seed.sh (a small OVA, an OVF).
#![no_main]

use blockferry::internals::image::MemFile;
use blockferry::internals::image::ova::tar_members;
use blockferry::internals::image::ovf::parse_envelope as parse_ovf;
use libfuzzer_sys::{Corpus, fuzz_target};

fuzz_target!(|data: &[u8]| -> Corpus {
    let _ = parse_ovf(data);
    match tar_members(&MemFile::new("fuzz.ova", data.to_vec())) {
        Ok(members) => {
            for m in members.iter().take(16) {
                let start = usize::try_from(m.offset).unwrap_or(usize::MAX);
                let end = start.saturating_add(usize::try_from(m.size).unwrap_or(usize::MAX));
                if let Some(bytes) = data.get(start..end) {
                    let _ = parse_ovf(bytes);
                }
            }
            Corpus::Keep
        }
        Err(_) => Corpus::Reject,
    }
});
