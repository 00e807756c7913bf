use blockferry_tests::{MIB, Rng, Sandbox, make_image, objects, write_at};

#[test]
fn same_image_twice_stores_nothing_new() {
    let mut rng = Rng::seeded("same_image_twice");
    let sb = Sandbox::new();
    sb.init(&[]);
    let image = sb.path("disk.raw");
    make_image(
        &image,
        32 * MIB,
        &[(0, rng.bytes(10 << 20)), (16 * MIB, rng.texty(4 << 20))],
    );
    let first = sb.replicate(&image, &[]);
    assert_eq!(first["bytes_new"], 14 * MIB);
    let packs_before = objects(&sb.store(), "packs").len();
    let second = sb.replicate(&image, &[]);
    assert_eq!(second["bytes_new"], 0, "{second}");
    assert_eq!(second["bytes_stored"], 0, "{second}");
    assert_eq!(second["bytes_deduplicated"], 14 * MIB, "{second}");
    assert_eq!(objects(&sb.store(), "packs").len(), packs_before);
    assert_ne!(first["snapshot"], second["snapshot"]);
}

#[test]
fn images_sharing_content_share_chunks() {
    let mut rng = Rng::seeded("images_sharing_content");
    let sb = Sandbox::new();
    sb.init(&[]);
    let template = rng.bytes(12 << 20);
    let a = sb.path("vm-a.raw");
    let b = sb.path("vm-b.raw");
    // Two VMs cloned from one template, each with its own changes, at chunk-aligned places.
    make_image(
        &a,
        64 * MIB,
        &[(0, template.clone()), (40 * MIB, rng.bytes(2 << 20))],
    );
    make_image(
        &b,
        64 * MIB,
        &[(0, template.clone()), (50 * MIB, rng.bytes(3 << 20))],
    );
    sb.replicate(&a, &[]);
    let rb = sb.replicate(&b, &["--name", "vm-b"]);
    assert_eq!(rb["bytes_deduplicated"], 12 * MIB, "{rb}");
    assert_eq!(rb["bytes_new"], 3 * MIB, "{rb}");
    assert_eq!(rb["disk"], "vm-b");
    // Within one image too: a repeated region is stored once.
    let c = sb.path("vm-c.raw");
    let block = rng.bytes(1 << 20);
    make_image(
        &c,
        8 * MIB,
        &[(0, block.clone()), (MIB, block.clone()), (5 * MIB, block)],
    );
    let rc = sb.replicate(&c, &[]);
    assert_eq!(rc["bytes_new"], MIB, "{rc}");
    assert_eq!(rc["bytes_deduplicated"], 2 * MIB, "{rc}");
}

#[test]
fn holes_are_not_read_and_zero_runs_not_stored() {
    let mut rng = Rng::seeded("holes_and_zero_runs");
    let sb = Sandbox::new();
    sb.init(&[]);
    let image = sb.path("disk.raw");
    make_image(
        &image,
        256 * MIB,
        &[(8 * MIB, rng.bytes(1 << 20)), (32 * MIB, vec![0; 16 << 20])],
    );
    let r = sb.replicate(&image, &[]);
    // Only the allocated 17 MiB are read (file systems allocate whole blocks: allow a little).
    let read = r["bytes_read"].as_u64().unwrap();
    assert!((17 * MIB..=17 * MIB + 64 * 1024).contains(&read), "{r}");
    // The written zeros cost no stored bytes; only the 1 MiB of data is stored.
    assert_eq!(r["bytes_new"], MIB, "{r}");
    assert!(r["bytes_stored"].as_u64().unwrap() < MIB + 64 * 1024, "{r}");
    assert_eq!(r["bytes_zero"], 255 * MIB, "{r}");
    // A changed chunk is the only new data on the next run.
    write_at(&image, 100 * MIB, &rng.bytes(4096));
    let r2 = sb.replicate(&image, &[]);
    assert_eq!(r2["bytes_new"], MIB, "{r2}");
}
