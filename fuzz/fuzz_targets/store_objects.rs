//! Store objects read back from a store: metadata envelopes (index, page, snapshot), index
//! and page payloads, pack trailers, chunk records. The first byte picks the structure.
#![no_main]

use blockferry::internals::store::crypto::Keys;
use blockferry::internals::store::format::{self, MetaKind};
use libfuzzer_sys::{Corpus, fuzz_target};

fuzz_target!(|data: &[u8]| -> Corpus {
    let Some((&which, rest)) = data.split_first() else {
        return Corpus::Reject;
    };
    // Unencrypted keys: checksums rather than authentication, so mutations reach the decoders.
    let keys = Keys::derive(&[7; 32], b"fuzz-store-id-16", false);
    let ok = match which % 6 {
        0 => format::open_meta(
            &keys.meta_sealer(),
            MetaKind::Index,
            "index/00",
            rest.to_vec(),
        )
        .is_ok(),
        1 => format::open_meta(
            &keys.meta_sealer(),
            MetaKind::Snapshot,
            "snapshots/00",
            rest.to_vec(),
        )
        .is_ok(),
        2 => format::decode_index(rest, "index/00").is_ok(),
        3 => format::decode_page(rest, "pages/00").is_ok(),
        4 => format::decode_pack_trailer(&keys.pack_sealer(b"pack"), rest, "packs/00").is_ok(),
        _ => {
            let mut record = rest.to_vec();
            let mut out = Vec::new();
            format::decode_blob(
                &keys.pack_sealer(b"pack"),
                &[1; 32],
                &mut record,
                1 << 20,
                "packs/00",
                0,
                &mut out,
            )
            .is_ok()
        }
    };
    if ok { Corpus::Keep } else { Corpus::Reject }
});
