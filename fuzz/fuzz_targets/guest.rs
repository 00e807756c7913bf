//! Guest inspection of a whole disk: MBR and extended chains, GPT headers and entries, file
//! system signatures, ext2/3/4 (os-release), NTFS (Windows/System32, the SOFTWARE hive).
//! Seeds: fuzz/seed.sh (small disks with an MBR, a GPT, ext4 and FAT).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = blockferry::inspect_bytes(data.to_vec());
});
