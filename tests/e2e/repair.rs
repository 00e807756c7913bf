//! A damaged store can be repaired: damaged chunks stored again, damaged manifests recorded
//! or forgotten, damaged index objects rebuilt.

use std::os::unix::fs::FileExt;

use blockferry_tests::{MIB, Rng, Sandbox, Value, file_hash, make_image, objects};

fn flip(path: &std::path::Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x10;
    f.write_all_at(&b, at).unwrap();
}

/// Issue 16.12: replicating again deduplicated against a damaged chunk (the new snapshot
/// failed verify too). `verify --repair` records the damaged copy; the next replication
/// stores the data again, and the old snapshot reads the good copy from then on.
#[test]
fn a_damaged_chunk_is_stored_again_after_a_repair() {
    let mut rng = Rng::seeded("repair_chunk");
    let sb = Sandbox::new();
    sb.init(&[]);
    let store = sb.store();
    let image = sb.path("disk.raw");
    make_image(&image, 8 * MIB, &[(0, rng.bytes(4 << 20))]);
    let first = sb.replicate(&image, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let packs = objects(&store, "packs");
    flip(&packs[0], 100);
    assert_eq!(
        sb.run(&["verify", "--store", &store, &first]).status.code(),
        Some(3)
    );
    let run = sb.run(&["verify", "--store", &store, &first, "--repair", "--json"]);
    assert_eq!(run.status.code(), Some(3));
    let v: Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(v["repair"]["chunks_recorded"], 1, "{v}");
    let again = sb.replicate(&image, &[]);
    assert_eq!(again["bytes_new"], MIB, "{again}");
    for snap in [&first, again["snapshot"].as_str().unwrap()] {
        let v = sb.json(&[
            "verify",
            "--store",
            &store,
            snap,
            "--image",
            image.to_str().unwrap(),
        ]);
        assert_eq!(v["ok"], true, "{snap}: {v}");
        let out = sb.restore(snap, "out.raw");
        assert_eq!(file_hash(&out), file_hash(&image));
    }
    // A gc is not stopped by the recorded copy, and drops it.
    let gc = sb.json(&["gc", "--store", &store]);
    assert_eq!(gc["chunks_missing"], 0, "{gc}");
    sb.verify_latest_against(&image);
}

/// Issue 16.12: a damaged manifest blocked gc and prune for ever, no command forgot one
/// snapshot, and `verify latest` said "the store has no snapshots".
#[test]
fn a_damaged_manifest_is_named_recorded_and_forgotten() {
    let mut rng = Rng::seeded("repair_manifest");
    let sb = Sandbox::new();
    sb.init(&[]);
    let store = sb.store();
    let image = sb.path("disk.raw");
    make_image(&image, 4 * MIB, &[(0, rng.bytes(1 << 20))]);
    let snap = sb.replicate(&image, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let manifest = objects(&store, "snapshots").pop().unwrap();
    let len = std::fs::metadata(&manifest).unwrap().len();
    flip(&manifest, len - 3);
    sb.fails(
        &["verify", "--store", &store, "latest"],
        1,
        &["none can be read"],
    );
    sb.fails(
        &["gc", "--store", &store],
        1,
        &["cannot be read", "--repair"],
    );
    let run = sb.run(&[
        "verify",
        "--store",
        &store,
        &snap[..8],
        "--repair",
        "--json",
    ]);
    assert_eq!(
        run.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let v: Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(v["repair"]["snapshots_recorded"], 1, "{v}");
    let gc = sb.json(&["gc", "--store", &store]);
    assert_eq!(gc["snapshots"], 0, "{gc}");
    sb.ok(&["forget", "--store", &store, &snap[..8]]);
    assert!(objects(&store, "snapshots").is_empty());
    sb.ok(&["snapshots", "--store", &store]);
    // The disk replicates anew, numbered after the forgotten one.
    let again = sb.replicate(&image, &[]);
    let list = sb.json(&["snapshots", "--store", &store]);
    assert_eq!(list["snapshots"][0]["id"], again["snapshot"]);
    assert_eq!(list["snapshots"][0]["seq"], 2, "{list}");
}

/// Issue 16.1 with 16.12: an index object that fails authentication stops replications;
/// `verify --repair` rebuilds the index from the packs' trailers.
#[test]
fn a_damaged_index_object_is_rebuilt_from_the_packs() {
    let mut rng = Rng::seeded("repair_index");
    let sb = Sandbox::new();
    sb.init(&[]);
    let store = sb.store();
    let image = sb.path("disk.raw");
    make_image(&image, 8 * MIB, &[(0, rng.bytes(3 << 20))]);
    let snap = sb.replicate(&image, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let index = objects(&store, "index");
    flip(&index[0], 40);
    sb.fails(
        &["replicate", image.to_str().unwrap(), "--store", &store],
        1,
        &["index"],
    );
    let run = sb.run(&["verify", "--store", &store, &snap, "--repair", "--json"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let v: Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(v["repair"]["index_objects_replaced"], 1, "{v}");
    assert!(v["repair"]["packs_reindexed"].as_u64().unwrap() >= 1, "{v}");
    let again = sb.replicate(&image, &[]);
    assert_eq!(again["bytes_new"], 0, "{again}");
    let out = sb.restore(&snap, "out.raw");
    assert_eq!(file_hash(&out), file_hash(&image));
}
