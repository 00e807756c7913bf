//! The tamper-evident audit log: a scripted run of operations is recorded and verifies; each
//! tampering (a record deleted, altered, reordered, replaced by another store's, the newest
//! removed) is found with its position; Object Lock retention on SeaweedFS refuses a delete.

use std::path::{Path, PathBuf};
use std::process::Command;

use blockferry_tests::{MIB, Rng, Sandbox, make_image, s3, write_at};
use serde_json::Value;

/// The records' files of a local store, by chain, in order.
fn chains(store: &Path) -> Vec<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(store.join("audit"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    for d in dirs {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        out.push(files);
    }
    out
}

fn audit_verify(sb: &Sandbox) -> (i32, Value) {
    let store = sb.store();
    let out = sb.run(&["audit", "verify", "--store", &store, "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}", String::from_utf8_lossy(&out.stderr));
    });
    (out.status.code().unwrap_or(-1), v)
}

fn has_problem(v: &Value, chain: &str, position: &str, needle: &str) -> bool {
    v["problems"].as_array().unwrap().iter().any(|p| {
        p["chain"] == chain
            && p["position"] == position
            && p["problem"].as_str().unwrap().contains(needle)
    })
}

/// Moves a file away and back around `f`.
fn without<T>(path: &Path, f: impl FnOnce() -> T) -> T {
    let aside = path.with_extension("aside");
    std::fs::rename(path, &aside).unwrap();
    let r = f();
    std::fs::rename(&aside, path).unwrap();
    r
}

/// A new store with a 16 MiB disk `vm1.raw` replicated twice (1 MiB changed between):
/// the disk and the two reports.
fn two_replications(sb: &Sandbox, seed: &str) -> (PathBuf, Value, Value) {
    sb.init(&[]);
    let mut rng = Rng::seeded(seed);
    let disk = sb.path("vm1.raw");
    make_image(&disk, 16 * MIB, &[(0, rng.bytes(3 << 20))]);
    let first = sb.replicate(&disk, &[]);
    write_at(&disk, 8 * MIB, &rng.bytes(1 << 20));
    let second = sb.replicate(&disk, &[]);
    (disk, first, second)
}

#[test]
fn a_scripted_run_is_recorded_and_every_tampering_is_found() {
    let sb = Sandbox::new();
    let store = sb.store();
    let (disk, first, second) = two_replications(&sb, "audit");
    let disk_s = disk.to_str().unwrap();
    sb.ok(&[
        "sync",
        "--store",
        &store,
        disk_s,
        "--changes",
        "hash",
        "--every",
        "1s",
        "--cycles",
        "3",
    ]);
    sb.ok(&[
        "verify",
        "--store",
        &store,
        "vm1.raw@latest",
        "--image",
        disk_s,
    ]);
    let out = sb.path("vm1.vhd");
    sb.ok(&[
        "export",
        "--store",
        &store,
        "--format",
        "vhd",
        "vm1.raw@latest",
        out.to_str().unwrap(),
    ]);
    sb.ok(&["prune", "--store", &store, "--keep-last", "3"]);
    sb.ok(&["gc", "--store", &store]);

    let (code, v) = audit_verify(&sb);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["passed"], true);
    let ops: Vec<&str> = v["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["op"].as_str().unwrap())
        .collect();
    assert_eq!(
        ops,
        [
            "init",
            "replicate",
            "replicate",
            "sync-cycle",
            "sync-cycle",
            "sync-cycle",
            "verify",
            "export",
            "forget",
            "forget",
            "prune",
            "gc"
        ],
        "{v:#}"
    );
    let log = v["log"].as_array().unwrap();
    // Each record holds what its operation reported.
    assert_eq!(log[1]["snapshot"], first["snapshot"]);
    assert_eq!(log[1]["bytes"], first["bytes_stored"]);
    assert_eq!(log[2]["snapshot"], second["snapshot"]);
    assert_eq!(log[2]["details"]["bytes_new"], second["bytes_new"]);
    assert_eq!(log[7]["object"], out.to_str().unwrap());
    for r in log {
        assert_eq!(r["result"], "ok");
        assert!(r["host"].as_str().is_some_and(|h| !h.is_empty()) && r["user"].as_str().is_some());
        assert!(r["tool"].as_str().unwrap().starts_with("blockferry "));
    }
    // The three cycles are one writer's chain, linked; later chains name the earlier ones.
    let sync_chain = log[3]["chain"].as_str().unwrap().to_owned();
    assert_eq!(log[5]["chain"], sync_chain.as_str());
    assert_eq!(log[5]["seq"], 3);
    assert!(log[5]["prev"].is_string());
    assert!(
        log[8]["heads"]
            .as_object()
            .unwrap()
            .contains_key(&sync_chain),
        "{:#}",
        log[8]
    );
    // `audit log` filters.
    let listed = sb.json(&["audit", "log", "--store", &store, "--disk", "vm1.raw"]);
    assert_eq!(listed.as_array().unwrap().len(), 7, "{listed:#}");

    let store_dir = PathBuf::from(&store);
    let files = chains(&store_dir);
    let sync_files = files
        .iter()
        .find(|c| c[0].parent().unwrap().ends_with(&sync_chain))
        .expect("the sync's chain")
        .clone();
    assert_eq!(sync_files.len(), 3);

    // Deleted: the sync's second record.
    let (code, v) = without(&sync_files[1], || audit_verify(&sb));
    assert_eq!(code, 3);
    assert!(
        has_problem(&v, &sync_chain, "2", "missing: the record was deleted"),
        "{v:#}"
    );

    // Altered: one byte of the second record.
    let original = std::fs::read(&sync_files[1]).unwrap();
    let mut altered = original.clone();
    let at = altered.len() - 20;
    altered[at] ^= 1;
    std::fs::write(&sync_files[1], &altered).unwrap();
    let (code, v) = audit_verify(&sb);
    assert_eq!(code, 3);
    assert!(
        has_problem(&v, &sync_chain, "2", "fails authentication"),
        "{v:#}"
    );
    std::fs::write(&sync_files[1], &original).unwrap();

    // Reordered: records 1 and 2 swapped.
    let one = std::fs::read(&sync_files[0]).unwrap();
    std::fs::write(&sync_files[0], &original).unwrap();
    std::fs::write(&sync_files[1], &one).unwrap();
    let (code, v) = audit_verify(&sb);
    assert_eq!(code, 3);
    assert!(
        has_problem(&v, &sync_chain, "1", "fails authentication"),
        "{v:#}"
    );
    assert!(
        has_problem(&v, &sync_chain, "2", "fails authentication"),
        "{v:#}"
    );
    std::fs::write(&sync_files[0], &one).unwrap();
    std::fs::write(&sync_files[1], &original).unwrap();

    // Replaced by a record sealed with another store's key (that store's init record).
    let other = Sandbox::new();
    other.init(&[]);
    let foreign = &chains(&PathBuf::from(other.store()))[0][0];
    std::fs::copy(foreign, &sync_files[1]).unwrap();
    let (code, v) = audit_verify(&sb);
    assert_eq!(code, 3);
    assert!(
        has_problem(&v, &sync_chain, "2", "sealed with another store's key"),
        "{v:#}"
    );
    std::fs::write(&sync_files[1], &original).unwrap();

    let (code, v) = audit_verify(&sb);
    assert_eq!(code, 0, "restored: {v:#}");

    // The sync's newest record removed: later writers saw it.
    let (code, v) = without(&sync_files[2], || audit_verify(&sb));
    assert_eq!(code, 3);
    assert!(
        has_problem(&v, &sync_chain, "3", "saw the chain at record 3"),
        "{v:#}"
    );
    // Rolled back: the log's newest record (the gc's) removed. No other record names it;
    // this client saw it.
    let gc_chain = log[11]["chain"].as_str().unwrap();
    let newest = files
        .iter()
        .flatten()
        .find(|p| p.parent().unwrap().ends_with(gc_chain))
        .unwrap();
    let (code, v) = without(newest, || audit_verify(&sb));
    assert_eq!(code, 3);
    assert!(has_problem(&v, gc_chain, "1", "rolled back"), "{v:#}");
    // The first cycle's record gone: its snapshot (kept by the prune) has no record either.
    let snapshot = log[3]["snapshot"].as_str().unwrap();
    let (code, v) = without(&sync_files[0], || audit_verify(&sb));
    assert_eq!(code, 3);
    assert!(
        v["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["problem"].as_str().unwrap().contains(&format!(
                "snapshot {snapshot} of disk vm1.raw has no audit record"
            ))),
        "{v:#}"
    );
    let text = sb.run(&["audit", "verify", "--store", &store]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("the audit log is whole"));
}

fn curl_s3(args: &[&str]) -> (bool, String) {
    let env = s3();
    let user = format!("{}:{}", env.access_key, env.secret_key);
    // Signed by curl (SigV4) with the payload hash SeaweedFS asks for (every request here
    // has an empty body); query parameters are given sorted and with `=`, as curl signs them.
    let out = Command::new("curl")
        .args([
            "-s",
            "-w",
            "\n%{http_code}",
            "--aws-sigv4",
            "aws:amz:us-east-1:s3",
            "--user",
            &user,
            "-H",
            "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        ])
        .args(args)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = text.lines().last().unwrap_or_default().to_owned();
    (code.starts_with('2'), text)
}

/// Object Lock on SeaweedFS (which implements it: retention on PUT, a versioned delete of a
/// retained object refused); moto refuses the delete too, but answers `GetObjectRetention`
/// with an error, so the test runs on SeaweedFS.
#[test]
fn audit_records_under_object_lock_cannot_be_deleted() {
    let env = s3();
    let bucket = format!("bflock{}", Rng::seeded("lock").next_u64() % 1_000_000);
    let (ok, text) = curl_s3(&[
        "-X",
        "PUT",
        "-H",
        "x-amz-bucket-object-lock-enabled: true",
        &format!("{}/{bucket}", env.endpoint),
    ]);
    assert!(ok, "creating a bucket with Object Lock: {text}");
    let mut sb = Sandbox::new();
    sb.store_url = Some(format!("s3://{bucket}/store"));
    sb.init(&[]);
    let mut rng = Rng::seeded("lock-disk");
    let disk = sb.path("d.raw");
    make_image(&disk, 4 * MIB, &[(0, rng.bytes(1 << 20))]);
    sb.replicate(
        &disk,
        &["--audit-retention", "1d", "--audit-lock-mode", "compliance"],
    );
    // The record's version, and its retention.
    let (ok, listing) = curl_s3(&[&format!(
        "{}/{bucket}?prefix=store%2Faudit%2F&versions=",
        env.endpoint
    )]);
    assert!(ok, "{listing}");
    let mut found = None;
    for part in listing.split("<Version>").skip(1) {
        let key = part
            .split("<Key>")
            .nth(1)
            .and_then(|k| k.split("</Key>").next())
            .unwrap();
        let version = part
            .split("<VersionId>")
            .nth(1)
            .and_then(|k| k.split("</VersionId>").next())
            .unwrap();
        let (ok, retention) = curl_s3(&[&format!("{}/{bucket}/{key}?retention=", env.endpoint)]);
        if ok && retention.contains("COMPLIANCE") {
            found = Some((key.to_owned(), version.to_owned()));
        }
    }
    let (key, version) = found.expect("a record under compliance retention");
    let (deleted, answer) = curl_s3(&[
        "-X",
        "DELETE",
        &format!("{}/{bucket}/{key}?versionId={version}", env.endpoint),
    ]);
    assert!(!deleted, "a retained record was deleted: {answer}");
    assert!(
        answer.contains("AccessDenied") || answer.trim_end().ends_with("403"),
        "{answer}"
    );
    let v = sb.json(&["audit", "verify", "--store", &sb.store()]);
    assert_eq!(v["passed"], true, "{v:#}");
    // A store on a backend without Object Lock refuses the setting with a clear error.
    let local = Sandbox::new();
    local.init(&[]);
    let d = local.path("d.raw");
    make_image(&d, MIB, &[(0, rng.bytes(4096))]);
    let store = local.store();
    let out = local.run(&[
        "replicate",
        "--store",
        &store,
        d.to_str().unwrap(),
        "--audit-retention",
        "1d",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Object Lock"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The compliance report of a scripted run: its JSON figures are the operations' own
/// reports; the HTML is one self-contained file that headless Chromium renders, with a
/// timeline chart (the screenshot is kept under target/test-artifacts/).
#[test]
fn the_compliance_report_holds_the_operations_figures_and_renders() {
    let sb = Sandbox::new();
    let store = sb.store();
    let (disk, first, second) = two_replications(&sb, "report");
    let disk_s = disk.to_str().unwrap();
    let verified = sb.json(&[
        "verify",
        "--store",
        &store,
        "vm1.raw@latest",
        "--image",
        disk_s,
    ]);
    let out = sb.path("vm1.vhd");
    let exported = sb.json(&[
        "export",
        "--store",
        &store,
        "--format",
        "vhd",
        "vm1.raw@latest",
        out.to_str().unwrap(),
    ]);
    let validated = sb.run(&["validate", disk_s, "--store", &store, "--json"]);
    assert!(validated.status.code().is_some(), "{validated:?}");

    let r = sb.json(&["report", "--store", &store, "--format", "json"]);
    assert_eq!(r["audit_passed"], true, "{r:#}");
    assert_eq!(r["encryption"]["algorithm"], "AES-256-GCM");
    let config: Value =
        serde_json::from_slice(&std::fs::read(PathBuf::from(&store).join("config")).unwrap())
            .unwrap();
    let kdf = r["encryption"]["kdf"].as_str().unwrap();
    assert!(
        kdf.contains(&format!(
            "memory {} KiB",
            config["encryption"]["kdf"]["m_kib"]
        )),
        "{kdf}"
    );
    let fp = r["encryption"]["key_fingerprint"].as_str().unwrap();
    assert_eq!(fp.len(), 32);
    assert!(
        !config.to_string().contains(fp),
        "the fingerprint is not in the config"
    );
    let d = &r["disks"][0];
    assert_eq!(d["disk"], "vm1.raw");
    let reps = d["replications"].as_array().unwrap();
    assert_eq!(reps.len(), 2);
    for (rep, own) in reps.iter().zip([&first, &second]) {
        assert_eq!(rep["snapshot"], own["snapshot"]);
        assert_eq!(rep["bytes_stored"], own["bytes_stored"]);
        assert_eq!(rep["bytes_read"], own["bytes_read"]);
    }
    assert_eq!(
        d["bytes_sent"].as_u64().unwrap(),
        first["bytes_stored"].as_u64().unwrap() + second["bytes_stored"].as_u64().unwrap()
    );
    assert_eq!(d["snapshots"].as_array().unwrap().len(), 2);
    assert_eq!(d["last_verify"]["snapshot"], verified["snapshot"]);
    assert_eq!(
        d["last_verify"]["details"]["bytes_checked"],
        verified["bytes_checked"]
    );
    assert_eq!(
        d["exports"][0]["details"]["bytes_written"],
        exported["bytes_written"]
    );
    assert!(d["rpo_worst_seconds"].as_f64().unwrap() >= 0.0);
    assert_eq!(r["validations"][0]["object"], disk_s);
    // Markdown says the same.
    let md = sb.ok(&["report", "--store", &store, "--format", "md"]);
    assert!(
        md.contains("## Disk vm1.raw") && md.contains("verified whole"),
        "{md}"
    );

    // HTML, rendered by headless Chromium.
    let html = sb.path("report.html");
    sb.ok(&[
        "report",
        "--store",
        &store,
        "--format",
        "html",
        "--output",
        html.to_str().unwrap(),
    ]);
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(
        !page.contains("http://") && !page.contains("https://") && !page.contains("<script"),
        "self-contained"
    );
    let have_chromium = Command::new("chromium")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        have_chromium || std::env::var_os("BF_REQUIRE_TOOLS").is_none(),
        "chromium is required"
    );
    if !have_chromium {
        return;
    }
    let artifacts = blockferry_tests::bin()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("compliance-report.png");
    let _ = std::fs::remove_file(&shot);
    let url = format!("file://{}", html.display());
    let chrome = |extra: &[&str]| {
        Command::new("chromium")
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--window-size=1000,900",
            ])
            .args(extra)
            .arg(&url)
            .output()
            .expect("chromium")
    };
    let dom = chrome(&["--dump-dom"]);
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert_eq!(dom.matches("class=\"replication\"").count(), 2, "{dom}");
    assert!(dom.contains("class=\"verify\"") && dom.contains("verified whole"));
    let shot_arg = format!("--screenshot={}", shot.display());
    let ran = chrome(&[&shot_arg]);
    assert!(shot.exists(), "{}", String::from_utf8_lossy(&ran.stderr));
    let png = std::fs::read(&shot).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    assert!(png.len() > 10_000, "a blank page? {} bytes", png.len());
    eprintln!("screenshot kept: {}", shot.display());
}
