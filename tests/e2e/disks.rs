//! Disks in a store: names unique per source, histories ordered by sequence, `latest` of a
//! disk, rollbacks noticed.

use std::path::Path;

use blockferry_tests::{MIB, Rng, Sandbox, Value, file_hash, have_qemu, make_image, qemu_from_raw};

use crate::ova::{ovf, tar};

/// The snapshots the store lists, by disk name: (id, seq, source).
fn listing(sb: &Sandbox) -> Vec<(String, String, u64, String)> {
    let v = sb.json(&["snapshots", "--store", &sb.store()]);
    v["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["disk"].as_str().unwrap().to_owned(),
                s["id"].as_str().unwrap().to_owned(),
                s["seq"].as_u64().unwrap(),
                s["source"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Issue 16.4 and 16.5, as a new user tries them in README order: two disks with the same
/// file name in different folders and an OVA with two disks get distinct names (before:
/// both `disk.raw`, both the `.ova`'s name), `--base latest` takes each disk's own base,
/// `prune --keep-last 1` keeps each disk's own newest, and `latest` without a disk asks
/// which one (before: whatever disk was replicated last).
#[test]
fn disks_with_the_same_file_name_and_ova_members_stay_apart() {
    if !have_qemu() {
        return;
    }
    let mut rng = Rng::seeded("distinct_disks");
    let sb = Sandbox::new();
    sb.init(&[]);
    let store = sb.store();
    std::fs::create_dir_all(sb.path("a")).unwrap();
    std::fs::create_dir_all(sb.path("b")).unwrap();
    let a = sb.path("a/disk.raw");
    let b = sb.path("b/disk.raw");
    make_image(&a, 8 * MIB, &[(0, rng.bytes(3 << 20))]);
    make_image(&b, 6 * MIB, &[(MIB, rng.bytes(2 << 20))]);
    let mut members = Vec::new();
    let mut raws = Vec::new();
    for i in 0..2 {
        let raw = sb.path(&format!("m{i}.raw"));
        make_image(&raw, 4 * MIB, &[(0, rng.bytes(1 << 20))]);
        let vmdk = sb.path(&format!("disk{i}.vmdk"));
        qemu_from_raw(&raw, &vmdk, "vmdk", "subformat=streamOptimized");
        members.push((format!("disk{i}.vmdk"), std::fs::read(&vmdk).unwrap()));
        raws.push(raw);
    }
    let ovf_bytes = ovf(&[("disk0.vmdk", 4 * MIB), ("disk1.vmdk", 4 * MIB)]);
    let mut all = vec![("vm.ova.ovf", ovf_bytes)];
    all.extend(members.iter().map(|(n, d)| (n.as_str(), d.clone())));
    let ova = sb.path("vm.ova");
    std::fs::write(&ova, tar(&all)).unwrap();

    let ra = sb.replicate(&a, &[]);
    let rb = sb.replicate(&b, &[]);
    let r0 = sb.replicate(&ova, &["--disk", "0"]);
    let r1 = sb.replicate(&ova, &["--disk", "disk1.vmdk"]);
    assert_eq!(ra["disk"], "disk.raw");
    assert_eq!(rb["disk"], "b/disk.raw");
    assert_eq!(r0["disk"], "vm.ova/disk0.vmdk");
    assert_eq!(r1["disk"], "vm.ova/disk1.vmdk");
    let list = listing(&sb);
    assert_eq!(list.len(), 4);
    let sources: Vec<&str> = list.iter().map(|l| l.3.as_str()).collect();
    assert!(
        sources.iter().any(|s| s.ends_with("/a/disk.raw")),
        "{list:?}"
    );
    assert!(
        sources.iter().any(|s| s.ends_with("/b/disk.raw")),
        "{list:?}"
    );
    let table = sb.ok(&["snapshots", "--store", &store]);
    assert!(
        table.contains("SOURCE") && table.contains("/b/disk.raw"),
        "{table}"
    );

    // Deltas: each on its own disk's newest.
    make_image(&a, 8 * MIB, &[(0, rng.bytes(3 << 20))]);
    let da = sb.replicate(&a, &["--base", "latest", "--changes", "hash"]);
    let db = sb.replicate(&b, &["--base", "latest", "--changes", "hash"]);
    let d1 = sb.replicate(
        &ova,
        &["--disk", "1", "--base", "latest", "--changes", "hash"],
    );
    assert_eq!(da["base"], ra["snapshot"]);
    assert_eq!(db["base"], rb["snapshot"]);
    assert_eq!(d1["base"], r1["snapshot"]);
    assert_eq!(da["changes"]["fallback"], Value::Null, "{da}");

    // Retention per disk: every disk keeps its newest.
    sb.ok(&["prune", "--store", &store, "--keep-last", "1"]);
    let kept: Vec<String> = listing(&sb).into_iter().map(|l| l.1).collect();
    for r in [&da, &db, &r0, &d1] {
        assert!(
            kept.contains(&r["snapshot"].as_str().unwrap().to_owned()),
            "{kept:?}"
        );
    }
    assert_eq!(kept.len(), 4);

    // `latest` asks which disk; DISK@latest (or --disk) answers.
    let out = sb.path("out.raw");
    let o = out.to_str().unwrap();
    sb.fails(
        &["restore", "--store", &store, "latest", o],
        1,
        &["needs a disk", "b/disk.raw"],
    );
    sb.fails(
        &["verify", "--store", &store, "latest"],
        1,
        &["needs a disk"],
    );
    let rr = sb.json(&["restore", "--store", &store, "b/disk.raw@latest", o]);
    assert_eq!(rr["snapshot"], db["snapshot"]);
    assert_eq!(rr["disk"], "b/disk.raw");
    assert_eq!(file_hash(&out), file_hash(&b));
    let rr = sb.json(&[
        "restore", "--store", &store, "latest", o, "--disk", "disk.raw", "--force",
    ]);
    assert_eq!(rr["snapshot"], da["snapshot"]);
    assert_eq!(file_hash(&out), file_hash(&a));
    let v = sb.json(&[
        "verify",
        "--store",
        &store,
        "vm.ova/disk0.vmdk@latest",
        "--image",
        ova.to_str().unwrap(),
        "--disk",
        "0",
    ]);
    assert_eq!(
        (v["ok"].clone(), v["disk"].clone()),
        (Value::Bool(true), Value::from("vm.ova/disk0.vmdk"))
    );

    // A name another source owns is refused unless the disk moved.
    let img = b.to_str().unwrap();
    sb.fails(
        &["replicate", img, "--store", &store, "--name", "disk.raw"],
        1,
        &["another source's", "/a/disk.raw", "--same-disk"],
    );
    let moved = sb.replicate(&b, &["--name", "disk.raw", "--same-disk"]);
    assert_eq!(moved["disk"], "disk.raw");
}

/// Issue 16.4: a descriptor VMDK (the usual ESXi layout `vm.vmdk` + `vm-flat.vmdk`) is
/// recorded under the descriptor, not its extent.
#[test]
fn a_descriptor_vmdk_is_recorded_by_its_descriptor() {
    if !have_qemu() {
        return;
    }
    let mut rng = Rng::seeded("descriptor_name");
    let sb = Sandbox::new();
    sb.init(&[]);
    let raw = sb.path("src.raw");
    make_image(&raw, 4 * MIB, &[(0, rng.bytes(1 << 20))]);
    let vmdk = sb.path("vm.vmdk");
    qemu_from_raw(&raw, &vmdk, "vmdk", "subformat=monolithicFlat");
    assert!(sb.path("vm-flat.vmdk").exists());
    let r = sb.replicate(&vmdk, &[]);
    assert_eq!(r["disk"], "vm.vmdk");
    let list = listing(&sb);
    assert!(list[0].3.ends_with("/vm.vmdk"), "{list:?}");
}

/// Issue 16.2: a disk's snapshots are ordered by their place in its history, not by the
/// writers' clocks: a snapshot written by a host whose clock is years ahead does not stay
/// `latest`, and `prune --keep-last 1` keeps the truly newest.
#[test]
fn a_clock_far_ahead_does_not_keep_a_snapshot_latest() {
    let mut rng = Rng::seeded("clock_ahead");
    let sb = Sandbox::new();
    sb.init(&[]);
    let store_path = sb.store();
    let image = sb.path("disk.raw");
    make_image(&image, 4 * MIB, &[(0, rng.bytes(1 << 20))]);
    let first = sb.replicate(&image, &[]);
    let first = first["snapshot"].as_str().unwrap();
    // As if its writer's clock had been ten years ahead.
    {
        let store =
            blockferry::Store::open(&store_path, Some(blockferry_tests::PASSPHRASE.as_bytes()))
                .unwrap();
        let mut s = store.snapshot(first).unwrap();
        s.created_unix_ms += 10 * 365 * 86_400_000;
        let dir = Path::new(&store_path).join("snapshots");
        for d in std::fs::read_dir(&dir).unwrap().flatten() {
            std::fs::remove_dir_all(d.path()).unwrap();
        }
        store.write_snapshot(&s).unwrap();
    }
    make_image(&image, 4 * MIB, &[(0, rng.bytes(1 << 20))]);
    let second = sb.replicate(&image, &[]);
    assert_eq!(second["disk"], "disk.raw");
    let v = sb.json(&[
        "verify",
        "--store",
        &store_path,
        "latest",
        "--image",
        image.to_str().unwrap(),
    ]);
    assert_eq!(v["snapshot"], second["snapshot"]);
    assert_eq!(v["ok"], true);
    sb.ok(&["prune", "--store", &store_path, "--keep-last", "1"]);
    let kept: Vec<String> = listing(&sb).into_iter().map(|l| l.1).collect();
    assert_eq!(kept, [second["snapshot"].as_str().unwrap()]);
}

/// Issue 16.2: a client notices when the newest snapshot it saw of a disk vanished (the
/// store rolled back) and when a snapshot's predecessor is gone without having been
/// forgotten; a snapshot forgotten on purpose is neither.
#[test]
fn rollbacks_and_vanished_predecessors_are_noticed() {
    let mut rng = Rng::seeded("rollback");
    let sb = Sandbox::new();
    sb.init(&[]);
    let store = sb.store();
    let image = sb.path("disk.raw");
    let mut ids = Vec::new();
    for _ in 0..3 {
        make_image(&image, 4 * MIB, &[(0, rng.bytes(1 << 20))]);
        ids.push(
            sb.replicate(&image, &[])["snapshot"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let manifests = blockferry_tests::objects(&store, "snapshots");
    let path_of = |id: &str| {
        manifests
            .iter()
            .find(|p| p.to_str().unwrap().ends_with(id))
            .unwrap()
            .clone()
    };
    // The middle one deleted behind blockferry's back: its successor's predecessor is gone.
    let saved = std::fs::read(path_of(&ids[1])).unwrap();
    std::fs::remove_file(path_of(&ids[1])).unwrap();
    sb.fails(
        &["snapshots", "--store", &store],
        1,
        &["gone without having been forgotten"],
    );
    std::fs::write(path_of(&ids[1]), saved).unwrap();
    sb.ok(&["snapshots", "--store", &store]);
    // The newest deleted (a rollback of the store): every use of the disk's history says so.
    let newest = std::fs::read(path_of(&ids[2])).unwrap();
    std::fs::remove_file(path_of(&ids[2])).unwrap();
    let o = sb.path("o.raw");
    sb.fails(
        &["restore", "--store", &store, "latest", o.to_str().unwrap()],
        1,
        &["rolled back"],
    );
    sb.fails(
        &["replicate", image.to_str().unwrap(), "--store", &store],
        1,
        &["rolled back"],
    );
    sb.fails(&["snapshots", "--store", &store], 1, &["rolled back"]);
    std::fs::write(path_of(&ids[2]), newest).unwrap();
    // Forgotten on purpose: fine, and the next snapshot does not reuse its number.
    sb.ok(&["forget", "--store", &store, &ids[2]]);
    sb.ok(&["snapshots", "--store", &store]);
    let next = sb.replicate(&image, &[]);
    let list = listing(&sb);
    let seq = list.iter().find(|l| l.1 == next["snapshot"]).unwrap().2;
    assert_eq!(seq, 4, "{list:?}");
}

/// Issue 16.10: one disk replicated twice at once uploaded twice (two runs 0.5 s apart both
/// sent everything, the second saying it resumed). A disk is held by one run at a time,
/// through the store (so across processes and hosts): the second fails with "busy", or
/// waits with --wait and then sends nothing new.
#[test]
fn one_disk_is_replicated_by_one_run_at_a_time() {
    use std::process::{Command, Stdio};
    let mut rng = Rng::seeded("one_run_per_disk");
    let sb = Sandbox::new();
    sb.init(&[]);
    let store = sb.store();
    let image = sb.path("disk.raw");
    make_image(&image, 24 * MIB, &[(0, rng.bytes(24 << 20))]);
    let img = image.to_str().unwrap();
    // The first run, sent slowly.
    let first = Command::new(blockferry_tests::bin())
        .args([
            "replicate",
            img,
            "--store",
            &store,
            // Small packs, each waiting its turn (the first goes at once): about 6 s.
            "--bwlimit",
            "4M",
            "--memory-budget",
            "32M",
            "--json",
        ])
        .env("BLOCKFERRY_PASSPHRASE", blockferry_tests::PASSPHRASE)
        .env("BLOCKFERRY_STATE_DIR", sb.path("state"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while blockferry_tests::objects(&store, "locks").is_empty() {
        assert!(start.elapsed().as_secs() < 30, "no lock appeared");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Another client (another state folder: nothing local is shared) is refused at once.
    let other = sb.run_env(
        &[
            "replicate",
            img,
            "--store",
            &store,
            "--state-dir",
            sb.path("other").to_str().unwrap(),
        ],
        &[("BLOCKFERRY_PASSPHRASE", blockferry_tests::PASSPHRASE)],
    );
    blockferry_tests::expect_failure(other, 1, &["being replicated by another run"]);
    // With --wait, it waits for the first and then has nothing new to send.
    let waited = sb.replicate(&image, &["--wait", "2m"]);
    let first = first.wait_with_output().unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let first: Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(first["bytes_new"], 24 * MIB);
    assert_eq!(waited["bytes_new"], 0, "{waited}");
    let list = listing(&sb);
    assert_eq!(
        list.iter().map(|l| l.2).collect::<Vec<_>>(),
        [1, 2],
        "{list:?}"
    );
}
