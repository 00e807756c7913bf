//! Round trips, hostile inputs, and the golden vectors of docs/vectors/v1 (the format's
//! frozen bytes). `BLOCKFERRY_BLESS=1 cargo test` rewrites the vectors: only do that for a
//! deliberate format change, together with a version bump and docs/FORMAT.md.

// Test offsets are small and come from this test's own encoder.
#![allow(clippy::cast_possible_truncation)]

use super::*;
use crate::store::crypto::{KdfParams, Keys, passphrase_key, unwrap_key};

const MASTER: [u8; 32] = [0x42; 32];
const STORE_ID: [u8; 16] = *b"golden-store-id!";
const PACK_ID: PackId = *b"golden-pack-id!!";

fn vector_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/vectors/v1")
        .join(format!("{name}.hex"))
}

/// Compares `bytes` with a committed vector (or writes it when blessing).
fn golden(name: &str, bytes: &[u8]) {
    let path = vector_path(name);
    let actual = hex(bytes);
    if std::env::var_os("BLOCKFERRY_BLESS").is_some() {
        std::fs::write(&path, format!("{actual}\n")).unwrap();
        return;
    }
    let expected =
        std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("missing {}", path.display()));
    assert_eq!(actual, expected.trim(), "golden vector {name} changed");
}

/// A committed vector's bytes (for vectors with random nonces: decode only).
fn load(name: &str) -> Vec<u8> {
    unhex_vec(std::fs::read_to_string(vector_path(name)).unwrap().trim()).unwrap()
}

fn keys(encrypted: bool) -> Keys {
    Keys::derive(&MASTER, &STORE_ID, encrypted)
}

const CHUNK: &[u8] = b"blockferry golden chunk: the quick brown fox jumps over the lazy dog. \
                       the quick brown fox jumps over the lazy dog. the quick brown fox.";

#[test]
fn golden_chunk_ids() {
    let k = keys(true);
    let mut ids = Vec::new();
    ids.extend_from_slice(&k.chunk_id(CHUNK));
    ids.extend_from_slice(&k.page_id(CHUNK));
    golden("chunk-and-page-id", &ids);
}

#[test]
fn golden_unencrypted_pack() {
    // Unencrypted stores are deterministic: the whole pack is a vector.
    let k = keys(false);
    let sealer = k.pack_sealer(&PACK_ID);
    let mut pack = pack_header(&PACK_ID).to_vec();
    let mut entries = Vec::new();
    for (data, compress) in [
        (CHUNK, true),
        (&b"incompressible!"[..], true),
        (CHUNK, false),
    ] {
        let id = k.chunk_id(data);
        let offset = pack.len() as u64;
        encode_blob(&sealer, &id, data, compress, &mut pack).unwrap();
        entries.push(Entry {
            id,
            offset,
            stored_len: u32::try_from(pack.len() as u64 - offset).unwrap(),
            raw_len: u32::try_from(data.len()).unwrap(),
        });
    }
    finish_pack(&sealer, &mut pack, &entries).unwrap();
    golden("pack-unencrypted", &pack);
    // The aligned buffer a replication packs into gives the same bytes, reused (its spare
    // bytes hold an earlier pack's leftovers) and too small (it grows on the way).
    let mut aligned = AlignedBuf::new(64);
    aligned.set_len(64);
    aligned.fill(0xa5);
    aligned.set_len(0);
    aligned.extend_from_slice(&pack_header(&PACK_ID));
    for (data, compress) in [
        (CHUNK, true),
        (&b"incompressible!"[..], true),
        (CHUNK, false),
    ] {
        let stored_compressed =
            encode_blob(&sealer, &k.chunk_id(data), data, compress, &mut aligned).unwrap();
        assert_eq!(stored_compressed, compress && data == CHUNK);
    }
    finish_pack(&sealer, &mut aligned, &entries).unwrap();
    assert!(aligned[..] == pack[..]);
    assert_eq!(decode_pack_trailer(&sealer, &pack, "p").unwrap(), entries);
    // A store reads only the header and a tail holding the trailer: any tail that does gives
    // the same entries; one that starts inside the trailer is refused, as is a wrong header.
    let header: [u8; PACK_HEADER] = pack[..PACK_HEADER].try_into().unwrap();
    let size = pack.len() as u64;
    let trailer_at =
        pack.len() - PACK_FOOTER - u32_at(&pack[pack.len() - PACK_FOOTER..], 0) as usize;
    for at in [PACK_HEADER, entries[2].offset as usize, trailer_at] {
        let got = decode_pack_tail(&sealer, &header, &pack[at..], at as u64, size, "p").unwrap();
        assert_eq!(got, entries, "tail at {at}");
    }
    let e = decode_pack_tail(
        &sealer,
        &header,
        &pack[trailer_at + 1..],
        trailer_at as u64 + 1,
        size,
        "p",
    );
    assert_eq!(e.unwrap_err().kind(), ErrorKind::Corrupt);
    let mut other = header;
    other[8] ^= 1;
    let e = decode_pack_tail(
        &sealer,
        &other,
        &pack[PACK_HEADER..],
        PACK_HEADER as u64,
        size,
        "p",
    );
    assert_eq!(e.unwrap_err().kind(), ErrorKind::Corrupt);
    // First blob is compressed, second raw (lz4 did not shrink it), third raw by request.
    assert_eq!(pack[entries[0].offset as usize], 1);
    assert_eq!(pack[entries[1].offset as usize], 0);
}

#[test]
fn golden_encrypted_pack_decodes() {
    let k = keys(true);
    let sealer = k.pack_sealer(&PACK_ID);
    if std::env::var_os("BLOCKFERRY_BLESS").is_some() {
        let mut pack = pack_header(&PACK_ID).to_vec();
        let id = k.chunk_id(CHUNK);
        encode_blob(&sealer, &id, CHUNK, true, &mut pack).unwrap();
        let entry = Entry {
            id,
            offset: PACK_HEADER as u64,
            stored_len: u32::try_from(pack.len() - PACK_HEADER).unwrap(),
            raw_len: u32::try_from(CHUNK.len()).unwrap(),
        };
        finish_pack(&sealer, &mut pack, &[entry]).unwrap();
        golden("pack-encrypted", &pack);
    }
    let pack = load("pack-encrypted");
    let entries = decode_pack_trailer(&sealer, &pack, "p").unwrap();
    assert_eq!(entries.len(), 1);
    let e = entries[0];
    let mut record =
        pack[e.offset as usize..(e.offset + u64::from(e.stored_len)) as usize].to_vec();
    let mut out = Vec::new();
    decode_blob(
        &sealer,
        &e.id,
        &mut record,
        1 << 20,
        "p",
        e.offset,
        &mut out,
    )
    .unwrap();
    assert_eq!(out, CHUNK);
    assert_eq!(k.chunk_id(&out), e.id);
}

#[test]
fn golden_metadata_objects() {
    let k = keys(false);
    let meta = k.meta_sealer();
    let ids = [k.chunk_id(CHUNK), ZERO_ID, k.chunk_id(b"x")];
    let page = encode_page(&ids).unwrap();
    let sealed = seal_meta(&meta, MetaKind::Page, "pages/ab/cd", &page).unwrap();
    golden("page-unencrypted", &sealed);
    assert_eq!(
        decode_page(
            &open_meta(&meta, MetaKind::Page, "pages/ab/cd", sealed).unwrap(),
            "p"
        )
        .unwrap(),
        ids
    );

    let index = encode_index(&[(
        PACK_ID,
        vec![Entry {
            id: ids[0],
            offset: 24,
            stored_len: 100,
            raw_len: 130,
        }],
    )])
    .unwrap();
    let sealed = seal_meta(&meta, MetaKind::Index, "index/00", &index).unwrap();
    golden("index-unencrypted", &sealed);

    let enc = keys(true).meta_sealer();
    if std::env::var_os("BLOCKFERRY_BLESS").is_some() {
        let snap = br#"{"id":"0011223344556677"}"#;
        golden(
            "snapshot-encrypted",
            &seal_meta(&enc, MetaKind::Snapshot, "snapshots/0011223344556677", snap).unwrap(),
        );
    }
    let plain = open_meta(
        &enc,
        MetaKind::Snapshot,
        "snapshots/0011223344556677",
        load("snapshot-encrypted"),
    )
    .unwrap();
    assert_eq!(plain, br#"{"id":"0011223344556677"}"#);
    // Bound to its name: the same bytes under another key fail.
    assert!(
        open_meta(
            &enc,
            MetaKind::Snapshot,
            "snapshots/7766554433221100",
            load("snapshot-encrypted")
        )
        .is_err()
    );
}

#[test]
fn golden_key_wrap() {
    // The wrapped master key of a store whose passphrase is "correct horse battery staple".
    let params = KdfParams::DEFAULT;
    let salt = *b"golden-kdf-salt!";
    let kek = passphrase_key(b"correct horse battery staple", &salt, params).unwrap();
    if std::env::var_os("BLOCKFERRY_BLESS").is_some() {
        golden(
            "key-wrap",
            &crate::store::crypto::wrap_key(
                &kek,
                &MASTER,
                b"blockferry v1 key wrap 676f6c64656e2d73746f72652d696421",
            )
            .unwrap(),
        );
    }
    assert_eq!(
        unwrap_key(
            &kek,
            &load("key-wrap"),
            b"blockferry v1 key wrap 676f6c64656e2d73746f72652d696421"
        )
        .unwrap(),
        MASTER
    );
}

#[test]
fn blob_round_trip_and_damage() {
    let k = keys(true);
    let sealer = k.pack_sealer(&PACK_ID);
    let data: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    let id = k.chunk_id(&data);
    let mut rec = Vec::new();
    encode_blob(&sealer, &id, &data, true, &mut rec).unwrap();
    assert!(rec.len() < data.len(), "compressible data shrinks");
    let mut out = Vec::new();
    decode_blob(&sealer, &id, &mut rec.clone(), 1 << 20, "p", 0, &mut out).unwrap();
    assert_eq!(out, data);
    // Claimed length above the cap is refused before anything is allocated.
    assert!(decode_blob(&sealer, &id, &mut rec.clone(), 1000, "p", 0, &mut out).is_err());
    // A bit flip anywhere is caught.
    for at in (0..rec.len()).step_by(97) {
        let mut bad = rec.clone();
        bad[at] ^= 1;
        let e = decode_blob(&sealer, &id, &mut bad, 1 << 20, "packs/x", 7, &mut out).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.to_string().contains("packs/x"), "{e}");
    }
    // Another id (swapped blob) fails too.
    assert!(
        decode_blob(
            &sealer,
            &ZERO_ID,
            &mut rec.clone(),
            1 << 20,
            "p",
            0,
            &mut out
        )
        .is_err()
    );
}

#[test]
fn newer_versions_are_refused_clearly() {
    let meta = keys(false).meta_sealer();
    let mut sealed = seal_meta(&meta, MetaKind::Snapshot, "snapshots/aa", b"{}").unwrap();
    sealed[6] = 2;
    let e = open_meta(&meta, MetaKind::Snapshot, "snapshots/aa", sealed).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::UnsupportedVersion);
    assert!(e.to_string().contains("version 2"), "{e}");
}

#[test]
fn hostile_metadata_never_panics() {
    let meta = keys(false).meta_sealer();
    let good = seal_meta(
        &meta,
        MetaKind::Index,
        "index/00",
        &encode_index(&[(PACK_ID, vec![])]).unwrap(),
    )
    .unwrap();
    for len in 0..good.len() {
        assert!(open_meta(&meta, MetaKind::Index, "index/00", good[..len].to_vec()).is_err());
    }
    // Counts far beyond the payload are refused, not allocated.
    let mut idx = Vec::new();
    idx.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(decode_index(&idx, "i").is_err());
    let mut idx = 1u32.to_le_bytes().to_vec();
    idx.extend_from_slice(&PACK_ID);
    idx.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(decode_index(&idx, "i").is_err());
    assert!(decode_page(&u32::MAX.to_le_bytes(), "p").is_err());
    assert!(decode_page(&[1, 0, 0, 0, 1], "p").is_err());
    // A pack footer pointing anywhere.
    let sealer = keys(false).pack_sealer(&PACK_ID);
    let mut pack = pack_header(&PACK_ID).to_vec();
    finish_pack(&sealer, &mut pack, &[]).unwrap();
    for len in 0..pack.len() {
        assert!(decode_pack_trailer(&sealer, &pack[..len], "p").is_err());
    }
    let mut bad = pack.clone();
    let at = bad.len() - PACK_FOOTER;
    bad[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(decode_pack_trailer(&sealer, &bad, "p").is_err());
}

#[test]
fn hex_round_trip() {
    assert_eq!(hex(&[0, 0xab, 0xff]), "00abff");
    assert_eq!(unhex::<3>("00abff"), Some([0, 0xab, 0xff]));
    assert_eq!(unhex::<3>("00abfg"), None);
    assert_eq!(unhex::<2>("00abff"), None);
    assert_eq!(unhex_vec("0"), None);
    assert_eq!(unhex_vec("é0"), None);
}
