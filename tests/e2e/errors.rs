use std::os::unix::fs::FileExt;
use std::path::Path;

use blockferry::{Silent, Store, VerifyOptions};
use blockferry_tests::{MIB, PASSPHRASE, Rng, Sandbox, make_image, objects};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

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
    let out = sb.run_env(
        &["snapshots", "--store", &store],
        &[("BLOCKFERRY_PASSPHRASE", "not it")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("wrong passphrase"),
        "{}",
        stderr(&out)
    );
    let out = sb.run_env(&["restore", "--store", &store, &snap, "/dev/null"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("BLOCKFERRY_PASSPHRASE"),
        "{}",
        stderr(&out)
    );
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
    assert!(out.status.success(), "{}", stderr(&out));
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
        let store = Store::open(&sb.store(), Some(PASSPHRASE.as_bytes())).unwrap();
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

#[test]
fn flipped_and_truncated_packs_via_cli() {
    let (sb, snap, _) = setup(&[]);
    let store = sb.store();
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
    let out = sb.run(&[
        "restore",
        "--store",
        &store,
        &snap,
        sb.path("o.raw").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("failed authentication"),
        "{}",
        stderr(&out)
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
    let out = sb.run(&[
        "restore",
        "--store",
        &store,
        &snap,
        sb.path("o2.raw").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("truncated"), "{}", stderr(&out));
}

#[test]
fn missing_objects() {
    let (sb, snap, _) = setup(&[]);
    let store = sb.store();
    let out_path = sb.path("o.raw");
    let out_file = out_path.to_str().unwrap();
    // A missing pack.
    let packs = objects(&store, "packs");
    let saved = std::fs::read(&packs[0]).unwrap();
    std::fs::remove_file(&packs[0]).unwrap();
    let out = sb.run(&["restore", "--store", &store, &snap, out_file, "--force"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("object missing") && stderr(&out).contains("packs/"),
        "{}",
        stderr(&out)
    );
    let out = sb.run(&["verify", "--store", &store, &snap]);
    assert_eq!(out.status.code(), Some(3));
    std::fs::write(&packs[0], saved).unwrap();
    // A missing page.
    let pages = objects(&store, "pages");
    let saved = std::fs::read(&pages[0]).unwrap();
    std::fs::remove_file(&pages[0]).unwrap();
    let out = sb.run(&["restore", "--store", &store, &snap, out_file, "--force"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("pages/"), "{}", stderr(&out));
    std::fs::write(&pages[0], saved).unwrap();
    // A missing index.
    for i in objects(&store, "index") {
        std::fs::remove_file(i).unwrap();
    }
    let out = sb.run(&["restore", "--store", &store, &snap, out_file, "--force"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("in no index"), "{}", stderr(&out));
    // A missing snapshot, and a missing store.
    let out = sb.run(&["restore", "--store", &store, "abcdef", out_file, "--force"]);
    assert!(
        stderr(&out).contains("no snapshot abcdef"),
        "{}",
        stderr(&out)
    );
    let out = sb.run(&["snapshots", "--store", sb.path("nowhere").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot open the store folder"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn newer_format_versions_are_refused() {
    let (sb, snap, _) = setup(&[]);
    let store = sb.store();
    let manifest = Path::new(&store).join("snapshots").join(&snap);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&manifest)
        .unwrap();
    f.write_all_at(&[2, 0], 6).unwrap();
    let out = sb.run(&[
        "restore",
        "--store",
        &store,
        &snap,
        sb.path("o.raw").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("format version 2") && err.contains("upgrade blockferry"),
        "{err}"
    );
    assert!(err.contains(&format!("snapshots/{snap}")), "{err}");
    let out = sb.run(&["snapshots", "--store", &store]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("format version 2"),
        "{}",
        stderr(&out)
    );
    // A config from the future too.
    let config = Path::new(&store).join("config");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("\"version\": 1", "\"version\": 7");
    std::fs::write(&config, text).unwrap();
    let out = sb.run(&["snapshots", "--store", &store]);
    assert!(
        stderr(&out).contains("format version 7"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_sources_and_arguments() {
    let sb = Sandbox::new();
    sb.init(&[]);
    let store = sb.store();
    let out = sb.run(&[
        "replicate",
        sb.path("missing.raw").to_str().unwrap(),
        "--store",
        &store,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot open the image") && stderr(&out).contains("missing.raw"),
        "{}",
        stderr(&out)
    );
    let out = sb.run(&[
        "replicate",
        sb.dir.path().to_str().unwrap(),
        "--store",
        &store,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let vhdx = sb.path("disk.vhd-but-really-vhdx");
    make_image(&vhdx, MIB, &[(0, b"vhdxfile".to_vec())]);
    let out = sb.run(&["replicate", vhdx.to_str().unwrap(), "--store", &store]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("VHDX"), "{}", stderr(&out));
    // Chunk sizes out of range, and a second init, are refused.
    for bad in ["32K", "3M", "32M"] {
        let out = sb.run(&[
            "init",
            "--store",
            sb.path(bad).to_str().unwrap(),
            "--chunk-size",
            bad,
        ]);
        assert_eq!(out.status.code(), Some(1), "{bad}");
    }
    let out = sb.run(&["init", "--store", &store]);
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    // An encrypted init needs a passphrase.
    let out = sb.run_env(&["init", "--store", sb.path("s2").to_str().unwrap()], &[]);
    assert!(stderr(&out).contains("--no-encryption"), "{}", stderr(&out));
    // Restore does not clobber an existing file unless asked.
    let img = sb.path("small.raw");
    make_image(&img, MIB, &[(0, vec![1; 10])]);
    let snap = sb.replicate(&img, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = sb.run(&["restore", "--store", &store, &snap, img.to_str().unwrap()]);
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    // A budget too small for the chunk size is explained.
    let out = sb.run(&[
        "replicate",
        img.to_str().unwrap(),
        "--store",
        &store,
        "--memory-budget",
        "1M",
    ]);
    assert!(stderr(&out).contains("too small"), "{}", stderr(&out));
    // Usage errors exit 2.
    assert_eq!(sb.run(&["replicate"]).status.code(), Some(2));
}
