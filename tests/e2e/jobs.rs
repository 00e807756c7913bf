//! Jobs: resume after a kill reads only what is not durable; a changed source is refused;
//! `jobs`, `abandon` and `cleanup` on local and S3 stores.

use std::time::Duration;

use blockferry_tests::proxy::{Action, Proxy};
use blockferry_tests::{
    MIB, Rng, Sandbox, Value, file_hash, have_qemu, kill_when, make_image, objects, qemu,
    qemu_from_raw, s3, s3_backend, write_at,
};

fn jobs(sb: &Sandbox) -> Vec<Value> {
    sb.json(&["jobs"])["jobs"].as_array().unwrap().clone()
}

/// Bytes the job database records as sent by active jobs, 0 before it exists: read in
/// place while a job runs, as often as a test needs, without starting a process.
fn bytes_sent(sb: &Sandbox) -> u64 {
    sb.job_db_count("SELECT coalesce(sum(bytes_sent), 0) FROM jobs WHERE state = 'active'")
}

/// Packs the job database records as complete (read while the job runs).
fn complete_packs(sb: &Sandbox) -> u64 {
    sb.job_db_count("SELECT count(*) FROM packs WHERE state IN ('complete', 'indexed')")
}

/// Sizes of the pack objects of a store (local or S3).
fn pack_sizes(store: &str) -> Vec<u64> {
    if store.starts_with("s3://") {
        let backend = s3_backend(store);
        let keys = backend.list("packs/").unwrap();
        keys.iter().map(|k| backend.size(k).unwrap()).collect()
    } else {
        objects(store, "packs")
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .collect()
    }
}

/// Rewrites the killed run's job database and store as if the run had stopped right after
/// the store completed its packs and before the database or an index heard of them: each
/// complete pack becomes `reserved` (local: a whole pack about to be put) or `open` with an
/// upload the store no longer has (S3: a completed multipart upload), and the index objects
/// go. Returns how many packs were rewound.
fn forget_completed_packs(sb: &Sandbox, store: &str) -> usize {
    let db = rusqlite::Connection::open(sb.path("state").join("jobs.sqlite")).unwrap();
    let (state, upload) = if store.starts_with("s3://") {
        ("open", Some("the-store-completed-this-upload"))
    } else {
        ("reserved", None)
    };
    let n = db
        .execute(
            "UPDATE packs SET state = ?1, upload_id = ?2, entries = NULL \
             WHERE state IN ('complete', 'indexed')",
            rusqlite::params![state, upload],
        )
        .unwrap();
    if store.starts_with("s3://") {
        let backend = s3_backend(store);
        for key in backend.list("index/").unwrap() {
            backend.delete(&key).unwrap();
        }
    } else {
        for path in objects(store, "index") {
            std::fs::remove_file(path).unwrap();
        }
    }
    n
}

/// A run stopped between the store completing a pack and the job database recording it:
/// the next run finds the pack by its reserved id (or its upload) and neither reads nor
/// sends its chunks again. `stop` runs the first run and stops it once a pack is complete.
fn packs_completed_but_not_recorded_are_adopted(
    sb: &Sandbox,
    extra: &[&str],
    stop: impl FnOnce(&std::path::Path),
) {
    let mut rng = Rng::seeded("jobs_adopt");
    let image = sb.path("disk.raw");
    let size = 128 * MIB;
    make_image(&image, size, &[(0, rng.bytes(size as usize))]);
    let store = sb.store();
    stop(&image);
    let rewound = forget_completed_packs(sb, &store);
    assert!(rewound >= 1, "no complete pack to rewind");

    let report = sb.replicate(&image, extra);
    assert_eq!(report["resumed"], true, "{report}");
    let resumed = report["bytes_resumed"].as_u64().unwrap();
    assert!(
        resumed >= 8 * MIB,
        "adopted packs' chunks were read again: {report}"
    );
    assert_eq!(
        report["bytes_read"].as_u64().unwrap() + resumed,
        size,
        "{report}"
    );
    // Every byte of the (incompressible) image is stored once: nothing adopted was sent
    // again (that would leave its packs unreferenced and store their chunks twice).
    let stored: u64 = pack_sizes(&store).iter().sum();
    assert!(
        stored < size + MIB,
        "packs hold {stored} bytes for a {size}-byte image"
    );
    let out = sb.restore(report["snapshot"].as_str().unwrap(), "out.raw");
    assert_eq!(file_hash(&out), file_hash(&image));
    sb.verify_latest_against(&image);
}

#[test]
fn whole_packs_put_but_not_recorded_are_adopted() {
    let sb = Sandbox::new();
    sb.init(&[]);
    // One worker and the pack writer on 64M: packs of 8 MiB (budget / (4 × (workers +
    // writer))) on any machine.
    let extra = ["--memory-budget", "64M", "--workers", "1"];
    packs_completed_but_not_recorded_are_adopted(&sb, &extra, |image| {
        kill_when(&sb, image, &extra, || complete_packs(&sb) >= 1);
    });
}

#[test]
fn multipart_packs_completed_but_not_recorded_are_adopted() {
    // An S3 pack completes only at the end of a run (it holds up to 16 Ki chunks): the first
    // run is stopped there, by a store that refuses the snapshot manifest.
    let proxy = Proxy::start(&s3().endpoint);
    let sb = Sandbox::new_s3("adopt");
    let endpoint = ["--endpoint", proxy.url.as_str()];
    let mut args = vec!["init", "--store"];
    let store = sb.store();
    args.push(&store);
    args.extend(endpoint);
    sb.ok(&args);
    let mut extra = vec!["--part-size", "5M", "--jobs", "2"];
    extra.extend(endpoint);
    packs_completed_but_not_recorded_are_adopted(&sb, &extra, |image| {
        proxy.set_rule(|r| {
            if r.method == "PUT" && r.target.contains("/snapshots/") {
                Action::Deny
            } else {
                Action::Forward
            }
        });
        let mut args = vec!["replicate", image.to_str().unwrap(), "--store", &store];
        args.extend(&extra);
        sb.fails(&args, 1, &["snapshots/"]);
        proxy.set_rule(|_| Action::Forward);
    });
}

#[test]
fn resume_reads_only_what_is_not_durable() {
    let mut rng = Rng::seeded("jobs_resume");
    let sb = Sandbox::new();
    sb.init(&[]);
    let image = sb.path("disk.raw");
    make_image(&image, 160 * MIB, &[(0, rng.bytes(160 << 20))]);
    // Packs of 8 MiB: kill once the job recorded two as durable.
    kill_when(&sb, &image, &["--memory-budget", "64M"], || {
        bytes_sent(&sb) >= 16 * MIB
    });
    let listed = jobs(&sb);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["state"], "active");
    assert_eq!(listed[0]["running"], false);

    let report = sb.replicate(&image, &["--memory-budget", "64M"]);
    assert_eq!(report["resumed"], true, "{report}");
    let resumed = report["bytes_resumed"].as_u64().unwrap();
    assert!(resumed >= 8 * MIB, "{report}");
    // Nothing durable was read again.
    assert_eq!(
        report["bytes_read"].as_u64().unwrap() + resumed,
        160 * MIB,
        "{report}"
    );
    // Issue 16.20: the figures add up after a resume (before: what earlier runs stored showed
    // as deduplicated, and the snapshot's NEW only this run's).
    let n = |k: &str| report[k].as_u64().unwrap();
    assert_eq!(
        n("bytes_zero") + n("bytes_deduplicated") + n("bytes_new") + n("bytes_unchanged"),
        n("virtual_size"),
        "{report}"
    );
    assert_eq!(n("bytes_new"), 160 * MIB, "{report}");
    assert_eq!(n("bytes_deduplicated"), 0, "{report}");
    let list = sb.json(&["snapshots", "--store", &sb.store()]);
    assert_eq!(
        list["snapshots"][0]["stats"]["bytes_new"],
        160 * MIB,
        "{list}"
    );
    let out = sb.restore(report["snapshot"].as_str().unwrap(), "out.raw");
    assert_eq!(file_hash(&out), file_hash(&image));
    let listed = jobs(&sb);
    assert_eq!(listed[0]["state"], "done", "{listed:?}");
    assert_eq!(listed[0]["runs"], 2);
}

#[test]
fn a_changed_source_is_refused_until_restart() {
    let mut rng = Rng::seeded("jobs_changed");
    let sb = Sandbox::new();
    sb.init(&[]);
    let image = sb.path("disk.raw");
    make_image(&image, 96 * MIB, &[(0, rng.bytes(96 << 20))]);
    let store = sb.store();
    kill_when(&sb, &image, &["--memory-budget", "64M"], || {
        !objects(&store, "packs").is_empty()
    });
    write_at(&image, 5 * MIB, &rng.bytes(4096));
    let args = ["replicate", image.to_str().unwrap(), "--store", &store];
    sb.fails(
        &args,
        1,
        &[
            "the source changed since job",
            "modification time",
            "--restart",
        ],
    );
    let mut with_restart = args.to_vec();
    with_restart.push("--restart");
    let report = sb.json(&with_restart);
    assert_eq!(report["resumed"], false, "{report}");
    let out = sb.restore(report["snapshot"].as_str().unwrap(), "out.raw");
    assert_eq!(file_hash(&out), file_hash(&image));
    // The forgotten job is gone; the new one is done.
    let listed = jobs(&sb);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["state"], "done");
}

#[test]
fn a_changed_parent_is_refused_until_restart() {
    if !have_qemu() {
        return;
    }
    let mut rng = Rng::seeded("jobs_parent");
    let sb = Sandbox::new();
    sb.init(&[]);
    let raw = sb.path("base.raw");
    make_image(&raw, 128 * MIB, &[(0, rng.bytes(128 << 20))]);
    let base = sb.path("base.vmdk");
    qemu_from_raw(&raw, &base, "vmdk", "");
    let child = sb.path("child.vmdk");
    qemu(&[
        "create",
        "-f",
        "vmdk",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        child.to_str().unwrap(),
    ]);
    kill_when(&sb, &child, &["--memory-budget", "64M"], || {
        complete_packs(&sb) >= 1
    });
    // The parent is touched (as if a snapshot were consolidated into it); the child is not.
    let later = std::time::SystemTime::now() + Duration::from_secs(5);
    std::fs::File::options()
        .write(true)
        .open(&base)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let store = sb.store();
    let args = ["replicate", child.to_str().unwrap(), "--store", &store];
    sb.fails(
        &args,
        1,
        &[
            "the source changed since job",
            "base.vmdk: modification time",
            "--restart",
        ],
    );
    let mut with_restart = args.to_vec();
    with_restart.push("--restart");
    let report = sb.json(&with_restart);
    assert_eq!(report["resumed"], false, "{report}");
    let out = sb.restore(report["snapshot"].as_str().unwrap(), "out.raw");
    assert_eq!(file_hash(&out), file_hash(&raw));
}

#[test]
fn abandon_and_cleanup_abort_uploads_on_s3() {
    let mut rng = Rng::seeded("jobs_abandon");
    let sb = Sandbox::new_s3("abandon");
    sb.init(&[]);
    let image = sb.path("disk.raw");
    make_image(&image, 96 * MIB, &[(0, rng.bytes(96 << 20))]);
    let store = sb.store();
    let backend = s3_backend(&store);
    // Once a part is recorded (both workers' packs are open by then).
    kill_when(&sb, &image, &["--part-size", "5M"], || bytes_sent(&sb) > 0);
    let open = backend.list_uploads().unwrap();
    assert!(!open.is_empty());

    // cleanup keeps the uploads of a job that can still resume, and aborts strays.
    let stray_key = "packs/00/00000000000000000000000000000000";
    let stray = backend.create_upload(stray_key).unwrap();
    backend
        .upload_part(stray_key, &stray, 1, bytes::Bytes::from(vec![7u8; 1024]))
        .unwrap();
    let v = sb.json(&["cleanup", "--store", &store, "--older-than", "0s"]);
    assert_eq!(v["aborted"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["aborted"][0], stray_key, "{v}");
    let left: Vec<String> = backend
        .list_uploads()
        .unwrap()
        .into_iter()
        .map(|u| u.upload_id)
        .collect();
    assert!(!left.contains(&stray), "{left:?}");
    assert_eq!(left.len(), open.len(), "cleanup aborted a resumable upload");
    // Issue 16.9: another host's cleanup (its own state, no store lock before the fix) left
    // only a 24 h age guard between a stopped job and the loss of its acknowledged parts.
    // The job is recorded in the store: its uploads are kept unless asked.
    let other = sb.path("other-host");
    let other = other.to_str().unwrap();
    let v = sb.json(&[
        "cleanup",
        "--store",
        &store,
        "--older-than",
        "0s",
        "--state-dir",
        other,
    ]);
    assert_eq!(v["aborted"].as_array().unwrap().len(), 0, "{v}");
    assert_eq!(backend.list_uploads().unwrap().len(), open.len());
    let v = sb.json(&[
        "cleanup",
        "--store",
        &store,
        "--older-than",
        "0s",
        "--state-dir",
        other,
        "--include-stopped-jobs",
        "--dry-run",
    ]);
    assert_eq!(v["aborted"].as_array().unwrap().len(), open.len(), "{v}");

    // abandon aborts the job's uploads and forgets it.
    let listed = jobs(&sb);
    let id = listed[0]["id"].as_str().unwrap();
    sb.json(&["abandon", id]);
    assert!(backend.list_uploads().unwrap().is_empty());
    assert!(jobs(&sb).is_empty());
    // A new run starts afresh and completes.
    let report = sb.replicate(&image, &[]);
    assert_eq!(report["resumed"], false);
    let out = sb.restore(report["snapshot"].as_str().unwrap(), "out.raw");
    assert_eq!(file_hash(&out), file_hash(&image));
    // Abandoned and finished jobs leave no record in the store.
    assert!(backend.list("jobs/").unwrap().is_empty());
}
