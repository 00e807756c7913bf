use super::*;

#[test]
fn seal_open_round_trip_encrypted_and_checksummed() {
    for sealer in [Sealer::encrypting(&[7u8; 32]), Sealer::checksumming()] {
        let mut rec = b"hdr!".to_vec();
        rec.extend_from_slice(&[0u8; NONCE_BYTES]);
        rec.extend_from_slice(b"payload bytes");
        sealer.seal(b"aad", &mut rec, 4).unwrap();
        assert_eq!(rec.len(), 4 + NONCE_BYTES + 13 + TAG_BYTES);
        let mut copy = rec.clone();
        assert_eq!(sealer.open(b"aad", &mut copy, 4).unwrap(), b"payload bytes");
        // Wrong associated data fails.
        let mut copy = rec.clone();
        assert!(sealer.open(b"other", &mut copy, 4).is_err());
        // Any single flipped bit after the header fails.
        for byte in 4..rec.len() {
            let mut copy = rec.clone();
            copy[byte] ^= 0x10;
            assert!(
                sealer.open(b"aad", &mut copy, 4).is_err(),
                "flip at {byte} accepted"
            );
        }
        // Truncation fails.
        let mut short = rec[..rec.len() - 1].to_vec();
        assert!(sealer.open(b"aad", &mut short, 4).is_err());
        let mut tiny = rec[..10].to_vec();
        assert!(sealer.open(b"aad", &mut tiny, 4).is_err());
    }
}

#[test]
fn nonces_are_fresh() {
    let sealer = Sealer::encrypting(&[1u8; 32]);
    let mut a = vec![0u8; NONCE_BYTES + 8];
    let mut b = a.clone();
    sealer.seal(b"", &mut a, 0).unwrap();
    sealer.seal(b"", &mut b, 0).unwrap();
    assert_ne!(a[..NONCE_BYTES], b[..NONCE_BYTES]);
    assert_ne!(a, b);
}

#[test]
fn key_wrap_needs_the_right_passphrase() {
    let params = KdfParams {
        m_kib: 64,
        t: 1,
        p: 1,
    };
    let master = [9u8; 32];
    let kek = passphrase_key(b"right", b"saltsaltsaltsalt", params).unwrap();
    let wrapped = wrap_key(&kek, &master, b"store").unwrap();
    assert_eq!(unwrap_key(&kek, &wrapped, b"store").unwrap(), master);
    let wrong = passphrase_key(b"wrong", b"saltsaltsaltsalt", params).unwrap();
    let err = unwrap_key(&wrong, &wrapped, b"store").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Credentials);
    // The key is bound to its store.
    assert!(unwrap_key(&kek, &wrapped, b"other store").is_err());
}

#[test]
fn hostile_kdf_parameters_are_refused() {
    for params in [
        KdfParams {
            m_kib: u32::MAX,
            t: 1,
            p: 1,
        },
        KdfParams {
            m_kib: 64,
            t: 1000,
            p: 1,
        },
        KdfParams {
            m_kib: 64,
            t: 1,
            p: 8,
        },
        KdfParams {
            m_kib: 1,
            t: 1,
            p: 1,
        },
    ] {
        assert!(
            passphrase_key(b"x", b"saltsaltsaltsalt", params).is_err(),
            "{params:?}"
        );
    }
}

#[test]
fn derived_keys_differ_per_purpose_and_pack() {
    let keys = Keys::derive(&[3u8; 32], b"0123456789abcdef", true);
    assert_ne!(keys.chunk_id(b"x"), keys.page_id(b"x"));
    let other_store = Keys::derive(&[3u8; 32], b"fedcba9876543210", true);
    assert_ne!(keys.chunk_id(b"x"), other_store.chunk_id(b"x"));
    let mut rec = vec![0u8; NONCE_BYTES + 4];
    keys.pack_sealer(b"pack-a").seal(b"", &mut rec, 0).unwrap();
    let mut copy = rec.clone();
    assert!(keys.pack_sealer(b"pack-a").open(b"", &mut copy, 0).is_ok());
    let mut copy = rec.clone();
    assert!(keys.pack_sealer(b"pack-b").open(b"", &mut copy, 0).is_err());
}
