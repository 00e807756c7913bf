//! S3 under faults, through a fault-injecting proxy in front of the real server: kill -9 at
//! random moments with resume, network cuts, 503 storms, lost and broken answers.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use blockferry_tests::proxy::{Action, Proxy, Request};
use blockferry_tests::{MIB, PASSPHRASE, Rng, Sandbox, bin, file_hash, make_image, s3, s3_backend};

/// Part size of these tests: S3's smallest (SeaweedFS, like AWS, refuses smaller parts when
/// an upload is completed), so that one job has many parts.
const PART: &str = "5M";
const PART_BYTES: u64 = 5 * MIB;
/// Uploads in flight at once in the kill test.
const JOBS: u64 = 2;

/// A sandbox whose store is reached through `proxy`.
fn through(proxy: &Proxy, tag: &str) -> (Sandbox, Vec<String>) {
    let sb = Sandbox::new_s3(tag);
    let args = vec!["--endpoint".to_owned(), proxy.url.clone()];
    (sb, args)
}

fn with<'a>(base: &[&'a str], extra: &'a [String]) -> Vec<&'a str> {
    let mut v = base.to_vec();
    v.extend(extra.iter().map(String::as_str));
    v
}

/// Makes `proxy` answer with `fault` (where it gives one) for `window` from the first
/// part upload on, and forward everything else.
fn fault_window(
    proxy: &Proxy,
    window: Duration,
    fault: impl Fn(&Request<'_>) -> Option<Action> + Send + Sync + 'static,
) {
    // Milliseconds since `t0` (plus one, so that 0 means "no part yet") of the first part.
    let first = AtomicU64::new(0);
    let t0 = Instant::now();
    let window = u64::try_from(window.as_millis()).unwrap();
    proxy.set_rule(move |r| {
        let now = u64::try_from(t0.elapsed().as_millis()).unwrap() + 1;
        if r.is_upload_part() {
            let _ = first.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        }
        let start = first.load(Ordering::Relaxed);
        if start > 0
            && now < start + window
            && let Some(action) = fault(r)
        {
            return action;
        }
        Action::Forward
    });
}

/// Bytes of the packs in a store.
fn pack_bytes(url: &str) -> u64 {
    let backend = s3_backend(url);
    backend
        .list("packs/")
        .unwrap()
        .iter()
        .map(|k| backend.size(k).unwrap())
        .sum()
}

/// `replicate --json` of `image` into `store` with the tests' part size and `jobs` uploads.
fn replicate_args<'a>(
    image: &'a std::path::Path,
    store: &'a str,
    extra: &'a [String],
    jobs: &'a str,
) -> Vec<&'a str> {
    let mut args = with(
        &[
            "replicate",
            image.to_str().unwrap(),
            "--store",
            store,
            "--part-size",
            PART,
            "--json",
        ],
        extra,
    );
    args.extend(["--jobs", jobs]);
    args
}

/// Replicates, restores and verifies; returns the replicate report and stderr.
fn replicate_and_check(
    sb: &Sandbox,
    image: &std::path::Path,
    extra: &[String],
) -> (blockferry_tests::Value, String) {
    replicate_with_and_check(sb, image, extra, &[])
}

/// [`replicate_and_check`], with `own` given to the replication only.
fn replicate_with_and_check(
    sb: &Sandbox,
    image: &std::path::Path,
    extra: &[String],
    own: &[String],
) -> (blockferry_tests::Value, String) {
    let store = sb.store();
    let all: Vec<String> = extra.iter().chain(own).cloned().collect();
    let out = sb.run(&replicate_args(image, &store, &all, "4"));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "replicate failed:\n{stderr}");
    let report: blockferry_tests::Value = serde_json::from_slice(&out.stdout).unwrap();
    let snap = report["snapshot"].as_str().unwrap().to_owned();
    let restored = sb.path(&format!("{snap}.out"));
    let out = sb.run(&with(
        &[
            "restore",
            "--store",
            &store,
            &snap,
            restored.to_str().unwrap(),
        ],
        extra,
    ));
    assert!(
        out.status.success(),
        "restore failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(file_hash(&restored), file_hash(image), "restore differs");
    let out = sb.run(&with(
        &[
            "verify",
            "--store",
            &store,
            &snap,
            "--image",
            image.to_str().unwrap(),
        ],
        extra,
    ));
    assert!(
        out.status.success(),
        "verify failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (report, stderr)
}

fn sample(sb: &Sandbox, rng: &mut Rng, mib: u64) -> std::path::PathBuf {
    let image = sb.path("disk.raw");
    let half = (mib / 2 * MIB) as usize;
    make_image(
        &image,
        mib * MIB,
        &[(0, rng.bytes(half)), (mib / 2 * MIB, rng.texty(half))],
    );
    image
}

#[test]
fn kill_9_twenty_times_resumes_and_resends_only_what_was_in_flight() {
    let mut rng = Rng::seeded("s3_kill_9");
    let proxy = Proxy::start(&s3().endpoint);
    let (sb, extra) = through(&proxy, "kill9");
    sb.init(&with(&[], &extra));
    let image = sample(&sb, &mut rng, 128);
    let store = sb.store();
    let mut kills = 0;
    let mut resumed_runs = 0;
    let mut failures = 0;
    while kills < 20 {
        let mut child = Command::new(bin())
            .args(replicate_args(&image, &store, &extra, "2"))
            .env("BLOCKFERRY_PASSPHRASE", PASSPHRASE)
            .env("BLOCKFERRY_STATE_DIR", sb.path("state"))
            .envs(s3().vars())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Kill at a random moment of the upload: the parts sent tell how far it got.
        let before = proxy.part_bytes();
        let target = before + MIB / 2 + rng.below(3 * PART_BYTES);
        let start = Instant::now();
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if proxy.part_bytes() >= target || start.elapsed() > Duration::from_secs(20) {
                child.kill().unwrap();
                kills += 1;
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let out = child.wait_with_output().unwrap();
        let status = out.status;
        if !status.success() && std::os::unix::process::ExitStatusExt::signal(&status).is_none() {
            failures += 1;
            assert!(
                failures < 3,
                "replicate failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if status.success() {
            // The job finished before the kill point: it made its snapshot; start another
            // job on a changed image so the kills go on.
            resumed_runs += 1;
            let n = rng.below(90);
            blockferry_tests::write_at(&image, n * MIB, &rng.bytes(MIB as usize));
        }
    }
    let (report, _) = replicate_and_check(&sb, &image, &extra);
    let sent = proxy.part_bytes();
    let stored = pack_bytes(&store);
    let resent = sent.saturating_sub(stored);
    let bound = kills * JOBS * (PART_BYTES + MIB);
    println!(
        "{kills} kills ({resumed_runs} runs finished first): parts sent {sent} bytes, packs stored \
         {stored} bytes, re-sent {resent} bytes (bound: {JOBS} parts in flight per kill = {bound})"
    );
    assert!(resent <= bound, "re-sent {resent} > {bound}");
    assert!(
        report["bytes_resumed"].as_u64().unwrap() > 0 || resumed_runs > 0,
        "{report}"
    );
}

#[test]
fn network_cuts_and_slowdown_storms_are_ridden_out() {
    let mut rng = Rng::seeded("s3_storms");
    let proxy = Proxy::start(&s3().endpoint);
    let (sb, extra) = through(&proxy, "storms");
    sb.init(&with(&[], &extra));
    let image = sample(&sb, &mut rng, 24);

    // Every third request answered 503 SlowDown.
    proxy.set_rule(|r| {
        if r.n % 3 == 0 {
            Action::SlowDown
        } else {
            Action::Forward
        }
    });
    let (_, stderr) = replicate_and_check(&sb, &image, &extra);
    assert!(
        stderr.contains("retrying S3 request"),
        "retries are not logged:\n{stderr}"
    );
    assert!(
        stderr.contains("SlowDown") || stderr.contains("503"),
        "{stderr}"
    );

    // The network drops every upload connection for two seconds from the first part on.
    fault_window(&proxy, Duration::from_secs(2), |r| {
        (r.is_upload_part() || r.is_complete()).then_some(Action::Cut)
    });
    blockferry_tests::write_at(&image, 3 * MIB, &rng.bytes(8 << 20));
    let (_, stderr) = replicate_and_check(&sb, &image, &extra);
    assert!(stderr.contains("retrying S3 request"), "{stderr}");
}

/// How long the outage and stall tests' faults last: `default` seconds (what CI runs), or
/// `BF_FAULT_SECONDS` (60 makes the outage test the one-minute outage it once was).
fn fault_seconds(default: u64) -> Duration {
    Duration::from_secs(
        std::env::var("BF_FAULT_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default),
    )
}

#[test]
fn an_outage_is_ridden_out() {
    let mut rng = Rng::seeded("s3_outage");
    let proxy = Proxy::start(&s3().endpoint);
    let (sb, extra) = through(&proxy, "outage");
    sb.init(&with(&[], &extra));
    let image = sample(&sb, &mut rng, 24);
    // From the first part on, the network refuses every request for a while (longer than
    // a few retries last): the run waits it out and completes on its own.
    let outage = fault_seconds(8);
    fault_window(&proxy, outage, |_| Some(Action::Cut));
    let began = Instant::now();
    let (_, stderr) = replicate_and_check(&sb, &image, &extra);
    assert!(began.elapsed() >= outage, "no outage happened");
    let retries = stderr.matches("retrying S3 request").count();
    assert!(retries >= 2, "{stderr}");
}

#[test]
fn stalled_requests_are_retried_and_reported() {
    let mut rng = Rng::seeded("s3_stall");
    let proxy = Proxy::start(&s3().endpoint);
    let (sb, mut extra) = through(&proxy, "stall");
    sb.init(&with(&[], &extra));
    let image = sample(&sb, &mut rng, 24);
    // For a while from the first part on, the server takes every part and never answers:
    // each attempt times out and is retried, and the wait is reported meanwhile.
    let stall = fault_seconds(8);
    fault_window(&proxy, stall, |r| {
        r.is_upload_part()
            .then_some(Action::Stall(Duration::from_secs(300)))
    });
    let attempt = (stall / 3).max(Duration::from_secs(1));
    extra.extend([
        "--s3-attempt-timeout".to_owned(),
        format!("{}s", attempt.as_secs()),
    ]);
    let warn = [
        "--stall-warning".to_owned(),
        format!("{}s", attempt.as_secs()),
    ];
    let began = Instant::now();
    let (_, stderr) = replicate_with_and_check(&sb, &image, &extra, &warn);
    let took = began.elapsed();
    assert!(took >= stall, "no stall happened");
    assert!(took < stall * 3 + Duration::from_secs(30), "took {took:?}");
    assert!(stderr.contains("retrying S3 request"), "{stderr}");
    assert!(
        stderr.contains("the store has acknowledged nothing for"),
        "the wait is not reported:\n{stderr}"
    );
}

#[test]
fn lost_and_broken_answers_neither_lose_nor_duplicate() {
    let mut rng = Rng::seeded("s3_answers");
    let proxy = Proxy::start(&s3().endpoint);
    let (sb, extra) = through(&proxy, "answers");
    sb.init(&with(&[], &extra));
    let image = sample(&sb, &mut rng, 24);
    let completes = Arc::new(AtomicU64::new(0));
    let parts = Arc::new(AtomicU64::new(0));
    let gets = Arc::new(AtomicU64::new(0));
    {
        let (completes, parts, gets) = (completes.clone(), parts.clone(), gets.clone());
        proxy.set_rule(move |r| {
            if r.is_complete() {
                // 1st: done by the server, answer lost; 2nd: 200 with an error inside.
                match completes.fetch_add(1, Ordering::Relaxed) {
                    0 => return Action::LoseAnswer,
                    1 => return Action::ErrorIn200,
                    _ => {}
                }
            }
            if r.is_upload_part() && parts.fetch_add(1, Ordering::Relaxed) == 3 {
                // Stored by the server, answer lost.
                return Action::LoseAnswer;
            }
            if r.method == "GET"
                && r.target.contains("/packs/")
                && gets.fetch_add(1, Ordering::Relaxed) == 2
            {
                return Action::TruncateAnswer;
            }
            Action::Forward
        });
    }
    let (_, stderr) = replicate_and_check(&sb, &image, &extra);
    assert!(completes.load(Ordering::Relaxed) >= 3, "{stderr}");
    assert!(
        gets.load(Ordering::Relaxed) >= 3,
        "the truncated read was not exercised"
    );
}

/// Issue 16.7: the answer to a create-only PUT (the config, an index object, the snapshot
/// manifest) is lost after the server stored it; the SDK retries and gets 412. The object is
/// ours, so the run goes on: before the fix `init` said "a store already exists" and
/// replicate failed "random name collided" after committing (and a rerun made a duplicate).
#[test]
fn a_lost_answer_to_a_create_only_put_is_recognised_as_ours() {
    let mut rng = Rng::seeded("s3_lost_put");
    let proxy = Proxy::start(&s3().endpoint);
    let (sb, extra) = through(&proxy, "lostput");
    let lost = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    {
        let lost = lost.clone();
        proxy.set_rule(move |r| {
            let kind = ["/config", "/index/", "/snapshots/"]
                .into_iter()
                .find(|k| r.method == "PUT" && r.target.contains(k));
            if let Some(kind) = kind {
                let mut lost = lost.lock().unwrap();
                if !lost.iter().any(|l| l == kind) {
                    lost.push(kind.to_owned());
                    return Action::LoseAnswer;
                }
            }
            Action::Forward
        });
    }
    sb.init(&with(&[], &extra));
    let image = sample(&sb, &mut rng, 12);
    replicate_and_check(&sb, &image, &extra);
    assert_eq!(lost.lock().unwrap().len(), 3, "{:?}", lost.lock().unwrap());
    let backend = s3_backend(&sb.store());
    assert_eq!(backend.list("snapshots/").unwrap().len(), 1);
}

/// Issue 16.8: after kills, every rerun failed with `listing parts: … answered 200` when the
/// store's ListParts answer could not be read (moto's, in the review), with the cause dropped
/// and nothing suggested. Resume now gives up the packs whose parts cannot be listed and sends
/// their chunks again, and errors keep their causes.
#[test]
fn a_resume_whose_parts_cannot_be_listed_sends_those_packs_again() {
    let mut rng = Rng::seeded("s3_listparts");
    let proxy = Proxy::start(&s3().endpoint);
    let (sb, extra) = through(&proxy, "listparts");
    sb.init(&with(&[], &extra));
    let image = sample(&sb, &mut rng, 48);
    let store = sb.store();
    let args = replicate_args(&image, &store, &extra, "2");
    let mut child = Command::new(bin())
        .args(&args)
        .env("BLOCKFERRY_PASSPHRASE", PASSPHRASE)
        .env("BLOCKFERRY_STATE_DIR", sb.path("state"))
        .envs(s3().vars())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while proxy.part_requests() < 4 {
        assert!(start.elapsed() < Duration::from_secs(60), "no parts");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    proxy.set_rule(|r| {
        if r.is_list_parts() {
            Action::Garbage200
        } else {
            Action::Forward
        }
    });
    let (report, stderr) = replicate_and_check(&sb, &image, &extra);
    assert_eq!(report["resumed"], true, "{report}");
    assert!(stderr.contains("cannot be listed"), "{stderr}");
}

/// Issue 16.8, against moto as well: kill, then resume through moto's own ListParts.
#[test]
fn kill_and_resume_against_moto() {
    let (endpoint, bucket) = blockferry_tests::moto();
    let mut rng = Rng::seeded("moto_resume");
    let sb = Sandbox::new();
    let store = format!("s3://{bucket}/resume-{}", std::process::id());
    let extra: Vec<String> = ["--endpoint", endpoint.as_str(), "--s3-min-part-size", "64K"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let env = [
        ("AWS_ACCESS_KEY_ID", "moto"),
        ("AWS_SECRET_ACCESS_KEY", "moto"),
        ("AWS_REGION", "us-east-1"),
        ("BLOCKFERRY_PASSPHRASE", PASSPHRASE),
    ];
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(extra.iter().map(String::as_str));
        sb.run_env(&all, &env)
    };
    assert!(
        run(&["init", "--store", &store, "--chunk-size", "64K"])
            .status
            .success()
    );
    let image = sample(&sb, &mut rng, 8);
    let img = image.to_str().unwrap();
    let mut child = Command::new(bin())
        .args([
            "replicate",
            img,
            "--store",
            &store,
            "--part-size",
            "64K",
            "--bwlimit",
            "2M",
        ])
        .args(&extra)
        .envs(env)
        .env("BLOCKFERRY_STATE_DIR", sb.path("state"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed once the store acknowledged a part (the run takes seconds at 2 MB/s).
    let start = std::time::Instant::now();
    while sb.job_db_count("SELECT coalesce(sum(bytes_sent), 0) FROM jobs WHERE state = 'active'")
        == 0
    {
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "nothing was sent"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let out = run(&[
        "replicate",
        img,
        "--store",
        &store,
        "--part-size",
        "64K",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: blockferry_tests::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["resumed"], true, "{report}");
    let restored = sb.path("out.raw");
    let out = run(&[
        "restore",
        "--store",
        &store,
        report["snapshot"].as_str().unwrap(),
        restored.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(file_hash(&restored), file_hash(&image));
}

/// A restore from S3 reads neighbouring records of a pack with one ranged GET (not one per
/// chunk), and rides out 503s and cut answers on the way.
#[test]
fn restores_read_neighbouring_chunks_together() {
    let mut rng = Rng::seeded("s3_restore_ranges");
    let proxy = Proxy::start(&s3().endpoint);
    let (sb, extra) = through(&proxy, "ranges");
    sb.init(&with(&["--chunk-size", "262144"], &extra));
    let image = sample(&sb, &mut rng, 32);
    let store = sb.store();
    let out = sb.run(&replicate_args(&image, &store, &extra, "2"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let chunks = 32 * MIB / (256 << 10);
    let gets = Arc::new(AtomicU64::new(0));
    let counted = gets.clone();
    proxy.set_rule(move |r| {
        if r.method == "GET" && r.target.contains("/packs/") {
            let n = counted.fetch_add(1, Ordering::Relaxed);
            // Every fifth answer refused, every seventh cut off mid-body.
            if n % 5 == 4 {
                return Action::SlowDown;
            }
            if n % 7 == 6 {
                return Action::TruncateAnswer;
            }
        }
        Action::Forward
    });
    let restored = sb.path("restored.raw");
    let out = sb.run(&with(
        &[
            "restore",
            "--store",
            &store,
            "latest",
            restored.to_str().unwrap(),
        ],
        &extra,
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(file_hash(&restored), file_hash(&image));
    let gets = gets.load(Ordering::Relaxed);
    // 128 chunks in packs of a few MiB: a GET per range of up to 8 MiB, plus the retries.
    assert!(
        gets < chunks / 4,
        "{gets} GETs of packs for {chunks} chunks"
    );
}

/// Spawns `replicate --json` of `image` with the job database in `state`, through `extra`.
fn spawn_replicate(
    sb: &Sandbox,
    image: &std::path::Path,
    extra: &[String],
    state: &str,
    own: &[&str],
) -> std::process::Child {
    let store = sb.store();
    let mut args = replicate_args(image, &store, extra, "2");
    args.extend(own);
    Command::new(bin())
        .args(args)
        .env("BLOCKFERRY_PASSPHRASE", PASSPHRASE)
        .env("BLOCKFERRY_STATE_DIR", sb.path(state))
        .envs(s3().vars())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until the proxy has seen `bytes` more part bytes than `from`, then kills `child`.
fn kill_after_parts(proxy: &Proxy, child: &mut std::process::Child, from: u64, bytes: u64) {
    let start = Instant::now();
    while proxy.part_bytes() < from + bytes {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before the kill"
        );
        assert!(start.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    let _ = child.wait();
}

#[test]
fn a_job_killed_with_one_state_folder_resumes_from_the_store_with_another() {
    let mut rng = Rng::seeded("portable_resume");
    let proxy = Proxy::start(&s3().endpoint);
    let (sb, extra) = through(&proxy, "portable");
    sb.init(&with(&[], &extra));
    let image = sample(&sb, &mut rng, 96);
    let store = sb.store();
    // Host A: killed once about 40 MiB of parts are acknowledged, a second or more after it
    // started (positions are journaled every second).
    proxy.set_rule(|r| {
        if r.is_upload_part() {
            Action::Delay(Duration::from_millis(300))
        } else {
            Action::Forward
        }
    });
    let mut child = spawn_replicate(&sb, &image, &extra, "state-a", &[]);
    kill_after_parts(&proxy, &mut child, 0, 40 * MIB);
    // The store records the job and a journal of its parts.
    let backend = s3_backend(&store);
    assert_eq!(backend.list("jobs/").unwrap().len(), 1);
    let journal = backend.list("journal/").unwrap();
    assert!(
        journal.iter().filter(|k| k.contains("/part-")).count() >= 4,
        "{journal:?}"
    );
    // Host B: an empty state folder (`state`, the sandbox's), the same store and source.
    proxy.set_rule(|_| Action::Forward);
    let (report, stderr) = replicate_and_check(&sb, &image, &extra);
    assert!(stderr.contains("from the store's journal"), "{stderr}");
    assert_eq!(report["resumed"], true, "{report}");
    assert!(report["bytes_resumed"].as_u64().unwrap() > 0, "{report}");
    let sent = proxy.part_bytes();
    let stored = pack_bytes(&store);
    let resent = sent.saturating_sub(stored);
    let bound = JOBS * (PART_BYTES + MIB);
    println!("parts sent {sent} bytes, packs stored {stored} bytes, re-sent {resent} bytes");
    assert!(resent <= bound, "re-sent {resent} > {bound}");
    // The job is finished: its record and journal are gone from the store.
    assert!(backend.list("jobs/").unwrap().is_empty());
    assert!(backend.list("journal/").unwrap().is_empty());
    // Host A again: its database still holds the job another host finished; it notices, and
    // the new job finds every chunk stored already.
    let before = proxy.part_bytes();
    let out = spawn_replicate(&sb, &image, &extra, "state-a", &[])
        .wait_with_output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("finished or abandoned by another host"),
        "{stderr}"
    );
    let report: blockferry_tests::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["resumed"], false, "{report}");
    assert_eq!(report["bytes_stored"], 0, "{report}");
    assert_eq!(proxy.part_bytes(), before);
}

#[test]
fn two_runs_of_one_job_at_once_never_both_write() {
    let mut rng = Rng::seeded("one_job_twice");
    let proxy = Proxy::start(&s3().endpoint);
    let (sb, extra) = through(&proxy, "jobtwice");
    sb.init(&with(&[], &extra));
    let image = sample(&sb, &mut rng, 160);
    let mut child = spawn_replicate(&sb, &image, &extra, "state-a", &[]);
    kill_after_parts(&proxy, &mut child, 0, 12 * MIB);
    // Two hosts resume the job at once: the one that starts second finds the disk held (the
    // parts go slowly, so that the first run is still sending when the second gives up).
    proxy.set_rule(|r| {
        if r.is_upload_part() {
            Action::Delay(Duration::from_millis(150))
        } else {
            Action::Forward
        }
    });
    let before = proxy.part_bytes();
    let first = spawn_replicate(&sb, &image, &extra, "state-b", &[]);
    let start = Instant::now();
    while proxy.part_bytes() == before {
        assert!(start.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    let second = spawn_replicate(&sb, &image, &extra, "state-c", &[])
        .wait_with_output()
        .unwrap();
    let first = first.wait_with_output().unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "both runs wrote:\n{stderr}");
    assert!(
        stderr.contains("is being replicated by another run"),
        "{stderr}"
    );
    // The second run left nothing: the store holds the one snapshot, and no job.
    let backend = s3_backend(&sb.store());
    assert_eq!(backend.list("snapshots/").unwrap().len(), 1);
    assert!(backend.list("jobs/").unwrap().is_empty());
    // Waiting instead of failing: with a wait, the second run starts once the first
    // committed, finds its job finished (a new job) and every chunk stored.
    blockferry_tests::write_at(&image, 0, &rng.bytes(40 << 20));
    let before = proxy.part_bytes();
    let first = spawn_replicate(&sb, &image, &extra, "state-d", &[]);
    while proxy.part_bytes() == before {
        assert!(start.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    let second = spawn_replicate(&sb, &image, &extra, "state-e", &["--wait", "60s"]);
    let (first, second) = (
        first.wait_with_output().unwrap(),
        second.wait_with_output().unwrap(),
    );
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        first.status.success() && second.status.success(),
        "{stderr}"
    );
    assert!(stderr.contains("waiting"), "{stderr}");
    let report: blockferry_tests::Value = serde_json::from_slice(&second.stdout).unwrap();
    assert_eq!(report["bytes_stored"], 0, "{report}");
    assert_eq!(backend.list("snapshots/").unwrap().len(), 3);
}
