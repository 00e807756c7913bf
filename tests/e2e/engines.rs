//! Read engines: io_uring (through the page cache or O_DIRECT) and pread read every format
//! alike: the same bytes, the same chunks.

use blockferry_tests::{MIB, Rng, Sandbox, have_qemu, make_image, qemu_from_raw};

#[test]
fn every_engine_reads_every_format_alike() {
    let mut rng = Rng::seeded("engines");
    let sb = Sandbox::new();
    sb.init(&[]);
    // Data, a hole, written zeros, data again, and a short tail that is not a whole block.
    let raw = sb.path("disk.raw");
    let size = 24 * MIB + 12_345;
    make_image(
        &raw,
        size,
        &[
            (0, rng.bytes((5 * MIB) as usize + 777)),
            (9 * MIB, vec![0u8; MIB as usize]),
            (12 * MIB + 4096, rng.texty((6 * MIB) as usize)),
            (24 * MIB, rng.bytes(12_345)),
        ],
    );
    let mut images = vec![("raw", raw.clone())];
    if have_qemu() {
        for (name, fmt, opts) in [
            ("sparse.vmdk", "vmdk", ""),
            ("stream.vmdk", "vmdk", "subformat=streamOptimized"),
            ("dynamic.vhdx", "vhdx", "block_size=1048576"),
            ("dynamic.vhd", "vpc", ""),
        ] {
            let path = sb.path(name);
            qemu_from_raw(&raw, &path, fmt, opts);
            images.push((name, path));
        }
    }
    for (name, image) in &images {
        let mut seen = Vec::new();
        for engine in [
            &["--io-engine", "pread"][..],
            &["--io-engine", "uring"],
            &["--io-engine", "uring", "--direct"],
        ] {
            let mut args = vec!["--name", name];
            args.extend_from_slice(engine);
            let r = sb.replicate(image, &args);
            let expected = if engine[1] == "pread" {
                "pread"
            } else {
                "io_uring"
            };
            assert_eq!(r["io_engine"], expected, "{name}: {r}");
            let out = sb.restore(r["snapshot"].as_str().unwrap(), "out.raw");
            // qemu's vpc rounds the size up to its geometry: compare what was written.
            let restored = std::fs::read(&out).unwrap();
            let original = std::fs::read(&raw).unwrap();
            assert_eq!(
                &restored[..original.len()],
                &original[..],
                "{name} read with {engine:?}"
            );
            assert!(restored[original.len()..].iter().all(|b| *b == 0));
            seen.push((r["bytes_read"].clone(), r["bytes_new"].clone()));
        }
        // The same bytes read each time; after the first, every chunk was already stored.
        assert_eq!(seen[0].0, seen[1].0, "{name}: {seen:?}");
        assert_eq!(seen[0].0, seen[2].0, "{name}: {seen:?}");
        assert_eq!(seen[1].1, 0, "{name}: {seen:?}");
        assert_eq!(seen[2].1, 0, "{name}: {seen:?}");
    }
    // `auto` takes io_uring where the kernel allows it (this machine does).
    let r = sb.replicate(&raw, &["--io-engine", "auto"]);
    assert_eq!(r["io_engine"], "io_uring", "{r}");
    let store = sb.store();
    sb.fails(
        &[
            "replicate",
            raw.to_str().unwrap(),
            "--store",
            &store,
            "--io-engine",
            "mmap",
        ],
        2,
        &["auto, uring or pread"],
    );
}
