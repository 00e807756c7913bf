use blockferry_tests::{MIB, Regions, Rng, Sandbox, allocated, file_hash, make_image};

/// Replicates `image`, restores the snapshot, and checks the bytes are identical.
fn round_trip(sb: &Sandbox, image: &std::path::Path) -> blockferry_tests::Value {
    let report = sb.replicate(image, &[]);
    let snap = report["snapshot"].as_str().unwrap();
    let out = sb.restore(snap, &format!("{snap}.restored"));
    assert_eq!(
        file_hash(image),
        file_hash(&out),
        "restore of {} differs",
        image.display()
    );
    report
}

#[test]
fn many_sizes_encrypted() {
    let mut rng = Rng::seeded("many_sizes_encrypted");
    let sb = Sandbox::new();
    sb.init(&[]);
    let cases: Vec<(&str, u64, Regions)> = vec![
        ("empty.raw", 0, vec![]),
        ("one-byte.raw", 1, vec![(0, vec![0xaa])]),
        ("all-hole.raw", 100 * MIB, vec![]),
        ("exact-chunks.raw", 8 * MIB, vec![(0, rng.bytes(8 << 20))]),
        (
            "ragged.raw",
            3 * MIB + 12345,
            vec![
                (0, rng.texty(1 << 20)),
                (2 * MIB + 7, rng.bytes(MIB as usize + 12338)),
            ],
        ),
        ("tail-only.raw", 5 * MIB + 1, vec![(5 * MIB, vec![1])]),
        (
            "random-regions.raw",
            64 * MIB + 4095,
            (0..12)
                .map(|_| {
                    let off = rng.below(64 * MIB);
                    let len = 1 + rng.below(3 * MIB).min(64 * MIB + 4095 - off - 1);
                    let data = if rng.below(2) == 0 {
                        rng.bytes(len as usize)
                    } else {
                        vec![0; len as usize]
                    };
                    (off, data)
                })
                .collect(),
        ),
    ];
    for (name, size, data) in cases {
        let image = sb.path(name);
        make_image(&image, size, &data);
        let report = round_trip(&sb, &image);
        assert_eq!(report["virtual_size"], size, "{name}");
    }
}

#[test]
fn larger_than_4_gib_with_little_data() {
    let mut rng = Rng::seeded("larger_than_4_gib");
    let sb = Sandbox::new();
    sb.init(&[]);
    let size = 5 * 1024 * MIB + 3;
    let image = sb.path("big.raw");
    make_image(
        &image,
        size,
        &[
            (0, rng.bytes(512)),
            (4 * 1024 * MIB - 100, rng.bytes(300)), // straddles the 4 GiB line
            (size - 3, vec![1, 2, 3]),
        ],
    );
    let report = round_trip(&sb, &image);
    // Holes are neither read nor stored.
    assert!(report["bytes_read"].as_u64().unwrap() < 4 * MIB, "{report}");
    assert!(
        report["bytes_stored"].as_u64().unwrap() < 4 * MIB,
        "{report}"
    );
    let out = sb.path(&format!(
        "{}.restored",
        report["snapshot"].as_str().unwrap()
    ));
    assert!(
        allocated(&out) < 16 * MIB,
        "restored file is not sparse: {} bytes",
        allocated(&out)
    );
}

#[test]
fn unencrypted_store_and_odd_chunk_sizes() {
    let mut rng = Rng::seeded("unencrypted_store_and_odd_chunk_sizes");
    for (chunk, flags) in [
        ("64K", vec!["--no-encryption"]),
        ("16M", vec![]),
        ("256K", vec!["--no-encryption"]),
    ] {
        let sb = Sandbox::new();
        let mut args = flags.clone();
        args.extend_from_slice(&["--chunk-size", chunk]);
        sb.init(&args);
        let image = sb.path("disk.raw");
        make_image(
            &image,
            40 * MIB + 777,
            &[
                (0, rng.texty(3 << 20)),
                (20 * MIB + 5, rng.bytes(5 << 20)),
                (40 * MIB, rng.bytes(777)),
            ],
        );
        round_trip(&sb, &image);
        sb.verify_latest_against(&image);
    }
}

#[test]
fn compression_off_and_single_worker() {
    let mut rng = Rng::seeded("compression_off");
    let sb = Sandbox::new();
    sb.init(&[]);
    let image = sb.path("disk.raw");
    make_image(&image, 16 * MIB, &[(MIB, rng.texty(6 << 20))]);
    let r = sb.replicate(
        &image,
        &[
            "--compression",
            "none",
            "--workers",
            "1",
            "--memory-budget",
            "32M",
        ],
    );
    // Uncompressed: stored bytes at least the new bytes.
    assert!(r["bytes_stored"].as_u64() >= r["bytes_new"].as_u64(), "{r}");
    let out = sb.restore(r["snapshot"].as_str().unwrap(), "out.raw");
    assert_eq!(file_hash(&image), file_hash(&out));
}
