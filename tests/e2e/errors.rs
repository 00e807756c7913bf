use std::os::unix::fs::FileExt;
use std::path::Path;

use blockferry::{Silent, Store, VerifyOptions};
use blockferry_tests::{MIB, PASSPHRASE, Rng, Sandbox, expect_failure, make_image, objects};

/// A store holding one snapshot of a small image with several chunks.
fn setup(flags: &[&str]) -> (Sandbox, String, std::path::PathBuf) {
    let mut rng = Rng::seeded("errors");
    let sb = Sandbox::new();
    sb.init(flags);
    let image = sb.path("disk.raw");
    make_image(
        &image,
        24 * MIB,
        &[(0, rng.bytes(6 << 20)), (10 * MIB, rng.texty(4 << 20))],
    );
    let snap = sb.replicate(&image, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    (sb, snap, image)
}

fn flip_bit(path: &Path, offset: u64, bit: u8) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 1 << bit;
    f.write_all_at(&b, offset).unwrap();
}

#[test]
fn wrong_or_missing_passphrase() {
    let (sb, snap, _) = setup(&[]);
    let store = sb.store();
    let wrong = [("BLOCKFERRY_PASSPHRASE", "not it")];
    expect_failure(
        sb.run_env(&["snapshots", "--store", &store], &wrong),
        1,
        &["wrong passphrase"],
    );
    let none = sb.run_env(&["restore", "--store", &store, &snap, "/dev/null"], &[]);
    expect_failure(none, 1, &["BLOCKFERRY_PASSPHRASE"]);
    // The passphrase file works, first line only.
    let pf = sb.path("pass.txt");
    std::fs::write(&pf, format!("{PASSPHRASE}\nsecond line ignored\n")).unwrap();
    let out = sb.run_env(
        &[
            "snapshots",
            "--store",
            &store,
            "--passphrase-file",
            pf.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // JSON errors are machine-readable.
    let out = sb.run_env(
        &["snapshots", "--store", &store, "--json"],
        &[("BLOCKFERRY_PASSPHRASE", "x")],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["kind"], "Credentials", "{v}");
}

#[test]
fn every_stored_chunk_has_every_bit_guarded() {
    for flags in [&[][..], &["--no-encryption"][..]] {
        let (sb, snap, _) = setup(flags);
        let pass = flags.is_empty().then_some(PASSPHRASE.as_bytes());
        let store = Store::open(&sb.store(), pass).unwrap();
        let index = store.load_index().unwrap();
        let mut rng = Rng::seeded("every_stored_chunk");
        assert!(index.len() >= 8);
        for (_, pack, loc) in index.entries() {
            let path = Path::new(&sb.store()).join(&pack);
            let at = loc.offset + rng.below(u64::from(loc.stored_len));
            let bit = rng.below(8) as u8;
            flip_bit(&path, at, bit);
            let report =
                blockferry::verify(&store, &snap, &VerifyOptions::default(), &Silent).unwrap();
            assert!(!report.ok(), "flip at {pack}:{at} bit {bit} went unnoticed");
            let p = &report.problems[0];
            assert!(p.offset.is_some() && p.message.contains(&pack), "{p:?}");
            flip_bit(&path, at, bit);
        }
        assert!(
            blockferry::verify(&store, &snap, &VerifyOptions::default(), &Silent)
                .unwrap()
                .ok()
        );
    }
}

/// A chunk read for its data is proven once (the tag of an encrypted record, the plaintext's
/// keyed hash in an unencrypted store): a flipped bit in its bytes always fails the read; a
/// flipped bit in an unencrypted record's checksum leaves the data readable, and the strict
/// read that `verify` makes reports it.
#[test]
fn a_chunk_read_is_proven_once_and_a_strict_read_checks_every_guard() {
    for flags in [&[][..], &["--no-encryption"][..]] {
        let encrypted = flags.is_empty();
        let (sb, _, _) = setup(flags);
        let store = Store::open(&sb.store(), encrypted.then_some(PASSPHRASE.as_bytes())).unwrap();
        let index = store.load_index().unwrap();
        let mut rng = Rng::seeded("proven_once");
        let (mut record, mut data, mut good) = (Vec::new(), Vec::new(), Vec::new());
        for (id, pack, loc) in index.entries() {
            let path = Path::new(&sb.store()).join(&pack);
            store
                .read_chunk(&index, &id, &mut record, &mut good)
                .unwrap();
            // A bit of the header, nonce or payload.
            let len = u64::from(loc.stored_len);
            let at = loc.offset + rng.below(len - 16);
            let bit = rng.below(8) as u8;
            flip_bit(&path, at, bit);
            let e = store
                .read_chunk(&index, &id, &mut record, &mut data)
                .unwrap_err();
            assert_eq!(e.kind(), blockferry::ErrorKind::Corrupt, "{e}");
            flip_bit(&path, at, bit);
            // A bit of the tag.
            let at = loc.offset + len - 16 + rng.below(16);
            flip_bit(&path, at, bit);
            let read = store.read_chunk(&index, &id, &mut record, &mut data);
            if encrypted {
                assert_eq!(read.unwrap_err().kind(), blockferry::ErrorKind::Corrupt);
            } else {
                read.unwrap();
                assert!(data == good, "the data read is the chunk's");
            }
            let strict = store
                .read_chunk_strict(&index, &id, &mut record, &mut data)
                .unwrap_err();
            assert!(
                strict.to_string().contains("failed authentication"),
                "{strict}"
            );
            flip_bit(&path, at, bit);
        }
    }
}

#[test]
fn flipped_and_truncated_packs_via_cli() {
    let (sb, snap, _) = setup(&[]);
    let store = sb.store();
    let (o1, o2) = (sb.path("o.raw"), sb.path("o2.raw"));
    let packs = objects(&store, "packs");
    flip_bit(&packs[0], 100, 3);
    let out = sb.run(&["verify", "--store", &store, &snap]);
    assert_eq!(out.status.code(), Some(3), "verify must fail with 3");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("snapshot {snap}, offset ")),
        "{text}"
    );
    assert!(text.contains("packs/"), "{text}");
    sb.fails(
        &["restore", "--store", &store, &snap, o1.to_str().unwrap()],
        1,
        &["failed authentication"],
    );
    flip_bit(&packs[0], 100, 3);
    sb.ok(&["verify", "--store", &store, &snap]);

    // Truncate a pack in the middle of its chunks.
    let len = std::fs::metadata(&packs[0]).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&packs[0])
        .unwrap();
    f.set_len(len / 2).unwrap();
    let out = sb.run(&["verify", "--store", &store, &snap, "--json"]);
    assert_eq!(out.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert!(
        v["problems"][0]["message"]
            .as_str()
            .unwrap()
            .contains("truncated"),
        "{v}"
    );
    sb.fails(
        &["restore", "--store", &store, &snap, o2.to_str().unwrap()],
        1,
        &["truncated"],
    );
}

#[test]
fn missing_objects() {
    let (sb, snap, _) = setup(&[]);
    let store = sb.store();
    let out_path = sb.path("o.raw");
    let restore = [
        "restore",
        "--store",
        &store,
        &snap,
        out_path.to_str().unwrap(),
        "--force",
    ];
    // A missing pack.
    let packs = objects(&store, "packs");
    let saved = std::fs::read(&packs[0]).unwrap();
    std::fs::remove_file(&packs[0]).unwrap();
    sb.fails(&restore, 1, &["object missing", "packs/"]);
    assert_eq!(
        sb.run(&["verify", "--store", &store, &snap]).status.code(),
        Some(3)
    );
    std::fs::write(&packs[0], saved).unwrap();
    // A missing page.
    let pages = objects(&store, "pages");
    let saved = std::fs::read(&pages[0]).unwrap();
    std::fs::remove_file(&pages[0]).unwrap();
    sb.fails(&restore, 1, &["pages/"]);
    std::fs::write(&pages[0], saved).unwrap();
    // A missing index.
    for i in objects(&store, "index") {
        std::fs::remove_file(i).unwrap();
    }
    sb.fails(&restore, 1, &["in no index"]);
    // A missing snapshot, and a missing store.
    let nowhere = sb.path("nowhere");
    sb.fails(
        &[
            "restore",
            "--store",
            &store,
            "abcdef",
            "/dev/null",
            "--force",
        ],
        1,
        &["no snapshot abcdef"],
    );
    sb.fails(
        &["snapshots", "--store", nowhere.to_str().unwrap()],
        1,
        &["cannot open the store folder"],
    );
}

#[test]
fn newer_format_versions_are_refused() {
    let (sb, snap, _) = setup(&[]);
    let store = sb.store();
    let manifest = objects(&store, "snapshots")
        .into_iter()
        .find(|p| p.to_str().unwrap().ends_with(snap.as_str()))
        .unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&manifest)
        .unwrap();
    f.write_all_at(&[2, 0], 6).unwrap();
    let out = sb.path("o.raw");
    let object = manifest
        .strip_prefix(&store)
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    sb.fails(
        &["restore", "--store", &store, &snap, out.to_str().unwrap()],
        1,
        &["format version 2", "upgrade blockferry", &object],
    );
    sb.fails(&["snapshots", "--store", &store], 1, &["format version 2"]);
    // A config from the future too.
    let config = Path::new(&store).join("config");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("\"version\": 2", "\"version\": 7");
    std::fs::write(&config, text).unwrap();
    sb.fails(&["snapshots", "--store", &store], 1, &["format version 7"]);
}

#[test]
fn bad_sources_and_arguments() {
    let sb = Sandbox::new();
    sb.init(&[]);
    let store = sb.store();
    let missing = sb.path("missing.raw");
    sb.fails(
        &["replicate", missing.to_str().unwrap(), "--store", &store],
        1,
        &["cannot open the image", "missing.raw"],
    );
    sb.fails(
        &[
            "replicate",
            sb.dir.path().to_str().unwrap(),
            "--store",
            &store,
        ],
        1,
        &["not a regular file"],
    );
    let vhdx = sb.path("disk.vhd-but-really-vhdx");
    make_image(&vhdx, MIB, &[(0, b"vhdxfile".to_vec())]);
    sb.fails(
        &["replicate", vhdx.to_str().unwrap(), "--store", &store],
        1,
        &["VHDX"],
    );
    // Chunk sizes out of range, and a second init, are refused.
    for bad in ["32K", "3M", "32M"] {
        let dir = sb.path(bad);
        sb.fails(
            &[
                "init",
                "--store",
                dir.to_str().unwrap(),
                "--chunk-size",
                bad,
            ],
            1,
            &["power of two"],
        );
    }
    sb.fails(&["init", "--store", &store], 1, &["already exists"]);
    // An encrypted init needs a passphrase.
    let s2 = sb.path("s2");
    expect_failure(
        sb.run_env(&["init", "--store", s2.to_str().unwrap()], &[]),
        1,
        &["--no-encryption"],
    );
    // Restore does not clobber an existing file unless asked.
    let img = sb.path("small.raw");
    make_image(&img, MIB, &[(0, vec![1; 10])]);
    let snap = sb.replicate(&img, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    sb.fails(
        &["restore", "--store", &store, &snap, img.to_str().unwrap()],
        1,
        &["--force"],
    );
    // A budget too small for the chunk size is explained.
    sb.fails(
        &[
            "replicate",
            img.to_str().unwrap(),
            "--store",
            &store,
            "--memory-budget",
            "1M",
        ],
        1,
        &["too small"],
    );
    // Usage errors exit 2.
    assert_eq!(sb.run(&["replicate"]).status.code(), Some(2));
}

/// An index entry claiming a record far larger than any chunk is refused before it sizes a
/// read (a restore plans ranged reads from the index: a forged length must not make one of
/// gigabytes).
#[test]
fn an_index_entry_claiming_a_huge_record_is_refused_before_reading() {
    use blockferry::internals::store::format::{Entry, PackId, unhex};
    let mut rng = Rng::seeded("huge_record");
    let sb = Sandbox::new();
    sb.init(&[]);
    let image = sb.path("disk.raw");
    make_image(&image, 4 * MIB, &[(0, rng.bytes(2 << 20))]);
    sb.replicate(&image, &[]);
    let store = Store::open(&sb.store(), Some(PASSPHRASE.as_bytes())).unwrap();
    let mut forged: Vec<(PackId, Vec<Entry>)> = Vec::new();
    for (id, pack, loc) in store.load_index().unwrap().entries() {
        let pack: PackId = unhex(pack.rsplit('/').next().unwrap()).unwrap();
        let entry = Entry {
            id,
            offset: loc.offset,
            stored_len: u32::MAX,
            raw_len: loc.raw_len,
        };
        match forged.iter_mut().find(|(p, _)| *p == pack) {
            Some((_, entries)) => entries.push(entry),
            None => forged.push((pack, vec![entry])),
        }
    }
    for f in objects(&sb.store(), "index") {
        std::fs::remove_file(f).unwrap();
    }
    store.write_index(&forged).unwrap();
    // Under a 3 GB address-space limit: a read sized by the forged length (4 GiB) would
    // abort the process instead of failing cleanly.
    let out = sb.path("out.raw");
    let script = r#"ulimit -v 3000000; exec "$0" restore --store "$1" latest "$2""#;
    let run = std::process::Command::new("sh")
        .args(["-c", script])
        .arg(blockferry_tests::bin())
        .arg(sb.store())
        .arg(&out)
        .env("BLOCKFERRY_PASSPHRASE", PASSPHRASE)
        .env("BLOCKFERRY_STATE_DIR", sb.path("state"))
        .output()
        .unwrap();
    expect_failure(run, 1, &["larger than any chunk", "at disk offset"]);
}
