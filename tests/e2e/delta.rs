//! Delta snapshots from change lists: VMware CBT, Hyper-V RCT and plain extents, with random
//! change patterns written into an image and the matching list generated here; untrusted
//! lists (reset, stale base, `*`, another disk) fall back to comparing every chunk; a list that
//! misses writes is caught by the rotating verify sample.

use blockferry_tests::{MIB, Rng, Sandbox, Value, file_hash, make_image, write_at};

const SIZE: u64 = 64 * MIB;

/// A disk with data, a hole and a zero run; replicated in full with change id `id`.
fn base(sb: &Sandbox, rng: &mut Rng, name: &str, id: &str) -> std::path::PathBuf {
    sb.init(&[]);
    let image = sb.path(name);
    make_image(
        &image,
        SIZE,
        &[
            (0, rng.bytes((24 * MIB) as usize)),
            (24 * MIB, vec![0; (4 * MIB) as usize]),
            (40 * MIB, rng.texty((24 * MIB) as usize)),
        ],
    );
    let report = sb.replicate(&image, &["--change-id", id]);
    assert!(report["base"].is_null(), "{report}");
    image
}

/// Writes `n` random extents of random data (some crossing chunk boundaries, some inside
/// the hole); returns them as (offset, length).
fn scribble(image: &std::path::Path, rng: &mut Rng, n: usize) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let len = 1 + rng.below(3 * MIB / 2);
        let offset = rng.below(SIZE - len);
        write_at(image, offset, &rng.bytes(len as usize));
        out.push((offset, len));
    }
    out
}

/// Bytes of the chunks (1 MiB) the extents touch.
fn rounded(extents: &[(u64, u64)]) -> u64 {
    let mut chunks = std::collections::BTreeSet::new();
    for (o, l) in extents {
        chunks.extend(o / MIB..=(o + l - 1) / MIB);
    }
    chunks.len() as u64 * MIB
}

fn cbt(extents: &[(u64, u64)], base_id: &str, new_id: &str) -> String {
    // Two calls, as a caller looping on startOffset gets them; an area crossing the middle
    // is reported by each call for its own half.
    let half = SIZE / 2;
    let mut calls = [Vec::new(), Vec::new()];
    for &(o, l) in extents {
        let end = o + l;
        if o < half {
            calls[0].push(format!(
                r#"{{"start": {o}, "length": {}}}"#,
                end.min(half) - o
            ));
        }
        if end > half {
            let start = o.max(half);
            calls[1].push(format!(
                r#"{{"start": {start}, "length": {}}}"#,
                end - start
            ));
        }
    }
    format!(
        r#"[{{"startOffset": 0, "length": {half}, "changeId": "{base_id}", "newChangeId": "{new_id}", "changedArea": [{}]}},
            {{"startOffset": {half}, "length": {half}, "changeId": "{base_id}", "changedArea": [{}]}}]"#,
        calls[0].join(", "),
        calls[1].join(", ")
    )
}

fn rct(extents: &[(u64, u64)], base_id: &str) -> String {
    let offsets: Vec<String> = extents.iter().map(|(o, _)| o.to_string()).collect();
    let lengths: Vec<String> = extents.iter().map(|(_, l)| l.to_string()).collect();
    format!(
        r#"{{"ChangedByteOffsets": [{}], "ChangedByteLengths": [{}], "TargetRctId": "{base_id}",
            "ByteOffset": 0, "ProcessedByteLength": {SIZE}}}"#,
        offsets.join(", "),
        lengths.join(", ")
    )
}

fn plain(extents: &[(u64, u64)]) -> String {
    extents
        .iter()
        .map(|(o, l)| format!("{o},{l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn delta(sb: &Sandbox, image: &std::path::Path, list: &str, extra: &[&str]) -> (Value, String) {
    let file = sb.path("changes.list");
    std::fs::write(&file, list).unwrap();
    let store = sb.store();
    let mut args = vec![
        "replicate",
        image.to_str().unwrap(),
        "--store",
        &store,
        "--base",
        "latest",
        "--changes",
        file.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = sb.run(&args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "delta failed:\n{stderr}");
    (serde_json::from_slice(&out.stdout).unwrap(), stderr)
}

fn restores_to(sb: &Sandbox, report: &Value, image: &std::path::Path) {
    let snap = report["snapshot"].as_str().unwrap();
    let out = sb.restore(snap, &format!("{snap}.out"));
    assert_eq!(file_hash(&out), file_hash(image), "{report}");
}

#[test]
fn deltas_from_each_kind_of_list_read_only_the_changes() {
    let mut rng = Rng::seeded("delta_lists");
    let sb = Sandbox::new();
    let image = base(&sb, &mut rng, "vm.raw", "52 aa/1");
    for (round, kind) in ["cbt", "rct", "extents"].into_iter().enumerate() {
        let n = 1 + rng.below(6) as usize;
        let changes = scribble(&image, &mut rng, n);
        let new_id = format!("52 aa/{}", round + 2);
        let old_id = format!("52 aa/{}", round + 1);
        let text = match kind {
            "cbt" => cbt(&changes, &old_id, &new_id),
            "rct" => rct(&changes, &old_id),
            _ => plain(&changes),
        };
        let (report, stderr) = delta(&sb, &image, &text, &["--change-id", &new_id]);
        let c = &report["changes"];
        let expected = ["vmware-cbt", "hyperv-rct", "extents"][round];
        assert_eq!(c["source"], expected, "{report}");
        assert!(c["fallback"].is_null(), "{report}\n{stderr}");
        assert_eq!(c["sample_mismatches"], 0, "{report}");
        // Reads: the changed chunks, plus the verify sample (1% of 64 chunks: one).
        let sample = c["sample_chunks"].as_u64().unwrap() * MIB;
        let read = report["bytes_read"].as_u64().unwrap();
        assert!(
            read <= rounded(&changes) + sample,
            "read {read} for {} changed + {sample} sampled: {report}",
            rounded(&changes)
        );
        assert!(report["bytes_unchanged"].as_u64().unwrap() >= SIZE - rounded(&changes));
        restores_to(&sb, &report, &image);
    }
    sb.verify_latest_against(&image);
}

#[test]
fn untrusted_lists_fall_back_to_comparing_every_chunk() {
    let mut rng = Rng::seeded("delta_untrusted");
    let sb = Sandbox::new();
    let image = base(&sb, &mut rng, "vm.raw", "52 aa/1");
    let other = sb.path("other.raw");
    make_image(&other, SIZE, &[(0, rng.bytes(MIB as usize))]);
    let cases: [(&str, &str, &str); 4] = [
        // (list's base id, expected words in the warning, new id)
        ("52 bb/1", "change tracking was reset", "52 bb/2"),
        ("52 bb/1", "is at", "52 bb/9"),
        ("*", "every allocated area", "52 cc/1"),
        ("52 cc/1", "", "52 cc/2"),
    ];
    for (base_id, words, new_id) in cases {
        let changes = scribble(&image, &mut rng, 3);
        let (report, stderr) = delta(&sb, &image, &cbt(&changes, base_id, new_id), &[]);
        if words.is_empty() {
            // The list follows the base recorded by the last case: trusted again.
            assert!(report["changes"]["fallback"].is_null(), "{report}");
        } else {
            assert!(stderr.contains(words), "{words}: {stderr}");
            assert!(!report["changes"]["fallback"].is_null(), "{report}");
            assert!(
                report["bytes_read"].as_u64().unwrap() > 40 * MIB,
                "{report}"
            );
        }
        assert_eq!(report["changes"]["base_change_id"], base_id);
        restores_to(&sb, &report, &image);
    }
    // A base snapshot of another disk: the delta still equals the image.
    let store = sb.store();
    let list = sb.path("other.list");
    std::fs::write(&list, "0,4096\n").unwrap();
    let base_id = sb.json(&["snapshots", "--store", &store])["snapshots"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = sb.run(&[
        "replicate",
        other.to_str().unwrap(),
        "--store",
        &store,
        "--base",
        &base_id,
        "--changes",
        list.to_str().unwrap(),
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("is of disk"), "{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    restores_to(&sb, &report, &other);
}

#[test]
fn a_list_that_misses_writes_is_caught_by_the_sample() {
    let mut rng = Rng::seeded("delta_sample");
    let sb = Sandbox::new();
    let image = base(&sb, &mut rng, "vm.raw", "52 aa/1");
    // A write the tracking never reports, in a chunk no later list names.
    write_at(&image, 50 * MIB + 12345, &rng.bytes(1000));
    let mut caught = false;
    for _ in 0..11 {
        // Each cycle's real changes, listed, stay clear of the missed chunk.
        let listed = scribble_listed_only(&image, &mut rng);
        let (report, stderr) = delta(&sb, &image, &plain(&listed), &["--verify-sample", "10%"]);
        if report["changes"]["sample_mismatches"].as_u64().unwrap() > 0 {
            assert!(stderr.contains("CHANGE TRACKING MISSED WRITES"), "{stderr}");
            assert!(!report["changes"]["fallback"].is_null(), "{report}");
            restores_to(&sb, &report, &image);
            caught = true;
            break;
        }
        only_the_missed_chunk_differs(&sb, &report, &image);
    }
    assert!(
        caught,
        "ten cycles of a 10% sample never reached the missed write"
    );
}

/// Writes a change inside the first 48 MiB (away from the missed chunk) and returns it.
fn scribble_listed_only(image: &std::path::Path, rng: &mut Rng) -> Vec<(u64, u64)> {
    let len = 1 + rng.below(MIB);
    let offset = rng.below(48 * MIB - len);
    write_at(image, offset, &rng.bytes(len as usize));
    vec![(offset, len)]
}

/// Before the sample catches the missed write, a delta differs from the image exactly there.
fn only_the_missed_chunk_differs(sb: &Sandbox, report: &Value, image: &std::path::Path) {
    let snap = report["snapshot"].as_str().unwrap();
    let out = sb.restore(snap, &format!("{snap}.out"));
    let (a, b) = (std::fs::read(&out).unwrap(), std::fs::read(image).unwrap());
    let differing: Vec<u64> = (0..SIZE / MIB)
        .filter(|&c| {
            let r = (c * MIB) as usize..((c + 1) * MIB) as usize;
            a[r.clone()] != b[r]
        })
        .collect();
    assert_eq!(differing, [50], "only the missed chunk may differ");
}

#[test]
fn bad_lists_are_refused_clearly() {
    let mut rng = Rng::seeded("delta_bad");
    let sb = Sandbox::new();
    let image = base(&sb, &mut rng, "vm.raw", "52 aa/1");
    let store = sb.store();
    let file = sb.path("bad.list");
    let cases: [(&str, &[&str]); 5] = [
        (
            "0,4096\n67108000,4096\n",
            &["ends past the disk's end", "bad.list"],
        ),
        ("0,-1\n", &["line 1", "non-negative"]),
        (
            r#"{"startOffset": 0, "length": 1048576, "changedArea": []}"#,
            &["covers only", "QueryChangedDiskAreas"],
        ),
        (
            r#"{"ChangedByteOffsets": [0], "ChangedByteLengths": []}"#,
            &["ChangedByteLengths"],
        ),
        ("not a list at all", &["line 1"]),
    ];
    for (text, needles) in cases {
        std::fs::write(&file, text).unwrap();
        sb.fails(
            &[
                "replicate",
                image.to_str().unwrap(),
                "--store",
                &store,
                "--base",
                "latest",
                "--changes",
                file.to_str().unwrap(),
            ],
            1,
            needles,
        );
    }
    sb.fails(
        &[
            "replicate",
            image.to_str().unwrap(),
            "--store",
            &store,
            "--base",
            "latest",
            "--changes-from-chain",
        ],
        1,
        &["needs a child image"],
    );
    // Only the full snapshot exists: nothing half-made.
    let snaps = sb.json(&["snapshots", "--store", &store]);
    assert_eq!(snaps["snapshots"].as_array().unwrap().len(), 1, "{snaps}");
}

#[test]
fn snapshot_chains_are_their_own_change_lists() {
    if !blockferry_tests::have_qemu() {
        return;
    }
    let mut rng = Rng::seeded("delta_chain");
    let sb = Sandbox::new();
    sb.init(&[]);
    let raw = sb.path("base.raw");
    make_image(
        &raw,
        SIZE,
        &[
            (0, rng.bytes((40 * MIB) as usize)),
            (48 * MIB, rng.texty((8 * MIB) as usize)),
        ],
    );
    let mut parent = sb.path("vm.vmdk");
    blockferry_tests::qemu_from_raw(&raw, &parent, "vmdk", "");
    let full = sb.replicate(&parent, &["--name", "vm"]);
    assert!(
        full["snapshot"].is_string() && full["base"].is_null(),
        "{full}"
    );
    for level in 1..=2 {
        let child = sb.path(&format!("vm-00000{level}.vmdk"));
        blockferry_tests::qemu(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            parent.file_name().unwrap().to_str().unwrap(),
            "-F",
            "vmdk",
            child.to_str().unwrap(),
        ]);
        // Writes through qemu-io: the child allocates 64 KiB grains around each.
        let mut written = Vec::new();
        for _ in 0..4 {
            let len = 4096 * (1 + rng.below(300));
            let offset = 4096 * rng.below((SIZE - len) / 4096);
            let cmd = format!("write -P {} {offset} {len}", 1 + rng.below(250));
            blockferry_tests::qemu_io(&child, &cmd);
            written.push((
                offset / 65536 * 65536,
                (offset + len).div_ceil(65536) * 65536 - offset / 65536 * 65536,
            ));
        }
        let store = sb.store();
        let out = sb.run(&[
            "replicate",
            child.to_str().unwrap(),
            "--store",
            &store,
            "--name",
            "vm",
            "--base",
            "latest",
            "--changes-from-chain",
            "--json",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        let c = &report["changes"];
        assert_eq!(c["source"], "chain", "{report}");
        assert!(c["fallback"].is_null(), "level {level}: {report}\n{stderr}");
        let sample = c["sample_chunks"].as_u64().unwrap() * MIB;
        let read = report["bytes_read"].as_u64().unwrap();
        assert!(read <= rounded(&written) + sample, "read {read}: {report}");
        // The restored delta is the chain as qemu-img reads it.
        let expected = sb.path(&format!("expected-{level}.raw"));
        blockferry_tests::qemu(&[
            "convert",
            "-O",
            "raw",
            child.to_str().unwrap(),
            expected.to_str().unwrap(),
        ]);
        restores_to(&sb, &report, &expected);
        parent = child;
    }
}

/// A chain of 200 deltas (through the library, in one process): the last and a middle one
/// restore byte for byte, each from its own manifest (no walk up the chain).
#[test]
fn a_chain_of_hundreds_of_deltas_restores_exactly() {
    use blockferry::internals::changes::{ChangeFormat, ChangeList, ExtentSet};
    use blockferry::internals::pipeline::{Changes, DeltaOptions};
    use blockferry::{InitOptions, ReplicateOptions, RestoreOptions, Silent, Store};

    let mut rng = Rng::seeded("delta_chain_200");
    let sb = Sandbox::new();
    let path = sb.store();
    let opts = InitOptions {
        chunk_size: 1 << 16,
        passphrase: None,
    };
    Store::init(&path, &opts).unwrap();
    let store = Store::open(&path, None).unwrap();
    let image = sb.path("vm.raw");
    let size = 8 * MIB;
    make_image(&image, size, &[(0, rng.bytes((6 * MIB) as usize))]);
    let full = {
        let source = blockferry::open_image(&image).unwrap();
        let opts = ReplicateOptions {
            change_id: Some("c/0".to_owned()),
            ..ReplicateOptions::default()
        };
        blockferry::replicate(&store, source.as_ref(), &opts, &Silent).unwrap()
    };
    let mut middle = None;
    let mut last = full.snapshot.clone();
    for n in 1..=200u64 {
        let len = 1 + rng.below(100_000);
        let offset = rng.below(size - len);
        write_at(&image, offset, &rng.bytes(len as usize));
        let source = blockferry::open_image(&image).unwrap();
        let list = ChangeList {
            format: ChangeFormat::Extents,
            base_change_id: Some(format!("c/{}", n - 1)),
            new_change_id: Some(format!("c/{n}")),
            extents: ExtentSet::from_ranges([(offset, len)], size).unwrap(),
        };
        let opts = ReplicateOptions {
            delta: Some(DeltaOptions {
                base: blockferry::BaseRef::Snapshot(last.clone()),
                changes: Changes::List(list),
                verify_sample: 0.0,
                change_id: None,
            }),
            ..ReplicateOptions::default()
        };
        let report = blockferry::replicate(&store, source.as_ref(), &opts, &Silent).unwrap();
        assert_eq!(report.base.as_deref(), Some(last.as_str()));
        assert!(
            report.changes.as_ref().unwrap().fallback.is_none(),
            "{report:?}"
        );
        last = report.snapshot;
        if n == 100 {
            let copy = sb.path("middle.raw");
            std::fs::copy(&image, &copy).unwrap();
            middle = Some((last.clone(), copy));
        }
    }
    for (snap, expected) in [(last, image.clone()), middle.unwrap()] {
        let out = sb.path(&format!("{snap}.out"));
        blockferry::restore(&store, &snap, &out, &RestoreOptions::default(), &Silent).unwrap();
        assert_eq!(file_hash(&out), file_hash(&expected), "snapshot {snap}");
    }
}

/// Two pages of chunk map (64 KiB chunks) and a short last chunk: a page with no change is
/// taken whole, the tail chunk's change is read, and a delta killed midway resumes (same base,
/// same list) to the same bytes.
#[test]
fn multi_page_deltas_with_a_short_tail_resume_after_a_kill() {
    use std::process::{Command, Stdio};
    let mut rng = Rng::seeded("delta_pages");
    let sb = Sandbox::new();
    sb.init(&["--chunk-size", "64K"]);
    let image = sb.path("vm.raw");
    let size = 300 * MIB + 12345;
    make_image(&image, size, &[(0, rng.bytes((8 * MIB) as usize))]);
    sb.replicate(&image, &["--change-id", "x/1"]);
    // Changes: 96 MiB inside page 0 (positions below 4096 = 256 MiB), and the last 100 bytes.
    let big = rng.bytes((96 * MIB) as usize);
    write_at(&image, 64 * MIB, &big);
    write_at(&image, size - 100, &rng.bytes(100));
    let list = format!(
        r#"{{"changeId": "x/1", "newChangeId": "x/2", "extents": [[{}, {}], [{}, 100]]}}"#,
        64 * MIB,
        96 * MIB,
        size - 100
    );
    let file = sb.path("changes.json");
    std::fs::write(&file, list).unwrap();
    let store = sb.store();
    let args = [
        "replicate",
        image.to_str().unwrap(),
        "--store",
        &store,
        "--base",
        "latest",
        "--changes",
        file.to_str().unwrap(),
        "--memory-budget",
        "32M",
    ];
    // Kill it once the job recorded a pack, then run it again: it resumes.
    let mut child = Command::new(blockferry_tests::bin())
        .args(args)
        .env("BLOCKFERRY_PASSPHRASE", blockferry_tests::PASSPHRASE)
        .env("BLOCKFERRY_STATE_DIR", sb.path("state"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let packs = || -> u64 {
        rusqlite::Connection::open_with_flags(
            sb.path("state").join("jobs.sqlite"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .and_then(|db| {
            db.query_row(
                "SELECT count(*) FROM packs WHERE state IN ('complete', 'indexed')",
                [],
                |r| r.get(0),
            )
        })
        .unwrap_or(0)
    };
    let mut killed = false;
    while child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < std::time::Duration::from_secs(60));
        if packs() >= 1 {
            child.kill().unwrap();
            killed = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.wait().unwrap();
    println!("delta killed midway: {killed}");
    let report = sb.json(&args);
    if killed {
        assert_eq!(report["resumed"], true, "{report}");
    }
    let c = &report["changes"];
    assert!(c["fallback"].is_null(), "{report}");
    // Both pages hold a change (page 1 the tail chunk), so they are filled position by
    // position; every byte not listed came from the base.
    let unchanged = report["bytes_unchanged"].as_u64().unwrap();
    assert!(unchanged >= size - 96 * MIB - 128 * 1024, "{report}");
    restores_to(&sb, &report, &image);

    // A change in page 0 only: page 1 is reused whole.
    write_at(&image, MIB, &rng.bytes(4096));
    std::fs::write(
        &file,
        format!(r#"{{"changeId": "x/2", "newChangeId": "x/3", "extents": [[{MIB}, 4096]]}}"#),
    )
    .unwrap();
    let report = sb.json(&args);
    assert!(report["changes"]["fallback"].is_null(), "{report}");
    let read = report["bytes_read"].as_u64().unwrap();
    let sampled = report["changes"]["sample_chunks"].as_u64().unwrap() * 64 * 1024;
    assert!(read <= 64 * 1024 + sampled, "{report}");
    restores_to(&sb, &report, &image);
}
