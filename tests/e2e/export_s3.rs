//! Export to S3 (SeaweedFS on loopback): what is downloaded is what a local export writes;
//! a killed export continues; a delta export sends only changed parts and copies the rest
//! from the previous export, and sends everything when that export cannot be trusted.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use blockferry_tests::proxy::{Action, Proxy};
use blockferry_tests::{
    MIB, PASSPHRASE, Rng, Sandbox, Value, bin, have_qemu, qemu, qemu_raw, random_disk, s3,
    s3_backend, write_at,
};

/// A fresh folder of the tests' bucket for exports: its URL and the backend to look in it.
fn target(tag: &str) -> (String, std::sync::Arc<dyn blockferry::ObjectStore>) {
    let url = s3().fresh_url(tag);
    let backend = s3_backend(&url);
    (url, backend)
}

fn export(sb: &Sandbox, snap: &str, out: &str, format: &str, extra: &[&str]) -> Value {
    let store = sb.store();
    let mut args = vec!["export", snap, out, "--store", &store, "--format", format];
    args.extend_from_slice(extra);
    sb.json(&args)
}

#[test]
fn an_export_to_s3_downloads_as_the_local_export() {
    if !have_qemu() {
        return;
    }
    let mut rng = Rng::seeded("an_export_to_s3_downloads_as_the_local_export");
    let sb = Sandbox::new_s3("export-src");
    sb.init(&[]);
    let raw = sb.path("disk.raw");
    // A size a fixed VHD rounds up, over two parts of 16 MiB.
    random_disk(&mut rng, &raw, 37 * MIB - 512);
    let snap = sb.replicate(&raw, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let want = std::fs::read(&raw).unwrap();
    let (url, backend) = target("export-dst");
    for (format, qfmt) in [
        ("raw", "raw"),
        ("vhd-fixed", "vpc"),
        ("vhd", "vpc"),
        ("vhdx", "vhdx"),
        ("vmdk", "vmdk"),
    ] {
        let local = sb.path(&format!("local.{format}"));
        export(&sb, &snap, local.to_str().unwrap(), format, &[]);
        let key = format!("disk.{format}");
        let report = export(&sb, &snap, &format!("{url}/{key}"), format, &[]);
        assert_eq!(report["bytes_copied"], 0, "{report}");
        let got = backend.get(&key, u64::MAX).unwrap();
        let local_bytes = std::fs::read(&local).unwrap();
        assert_eq!(got.len(), local_bytes.len(), "{format}: size");
        assert_eq!(report["file_size"], got.len() as u64, "{format}: {report}");
        let downloaded = sb.path(&format!("downloaded.{format}"));
        std::fs::write(&downloaded, &got).unwrap();
        if format == "raw" {
            assert_eq!(got, local_bytes, "raw: the object is the local export");
        }
        let mut bytes = qemu_raw(&downloaded, qfmt);
        bytes.truncate(want.len());
        assert_eq!(
            bytes, want,
            "{format}: qemu reads the downloaded image as the disk"
        );
        if format == "vmdk" {
            let info = qemu(&["info", "--output=json", downloaded.to_str().unwrap()]);
            assert!(info.contains("streamOptimized"), "{info}");
        }
        if matches!(format, "vmdk" | "vhdx") {
            qemu(&["check", downloaded.to_str().unwrap()]);
        }
    }
    // Nothing is left half-written.
    assert!(backend.list_uploads().unwrap().is_empty());
}

/// Starts an export in the background through `endpoint` (output discarded).
fn spawn_export(
    sb: &Sandbox,
    endpoint: &str,
    snap: &str,
    out: &str,
    format: &str,
    extra: &[&str],
) -> std::process::Child {
    Command::new(bin())
        .args([
            "export",
            snap,
            out,
            "--store",
            &sb.store(),
            "--format",
            format,
        ])
        .args(extra)
        .env("BLOCKFERRY_PASSPHRASE", PASSPHRASE)
        .env("BLOCKFERRY_STATE_DIR", sb.path("state"))
        .envs(s3().vars())
        .env("AWS_ENDPOINT_URL", endpoint)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(sb.path("export.err")).unwrap())
        .spawn()
        .unwrap()
}

/// Kills an export once the job database records at least `parts` acknowledged parts.
fn kill_after_parts(sb: &Sandbox, mut child: std::process::Child, parts: u64) {
    let start = Instant::now();
    let mut seen = Vec::new();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "the export ended ({status}) before {parts} parts were recorded (seen: {seen:?}): {}",
                std::fs::read_to_string(sb.path("export.err")).unwrap_or_default()
            );
        }
        let n = sb.job_db_count("SELECT count(*) FROM export_parts");
        if seen.last() != Some(&n) {
            seen.push(n);
        }
        if n >= parts {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "never got ready"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_killed_export_to_s3_resumes_and_leaves_nothing_behind() {
    let mut rng = Rng::seeded("a_killed_export_to_s3_resumes_and_leaves_nothing_behind");
    let sb = Sandbox::new_s3("export-kill");
    sb.init(&[]);
    // Random bytes throughout: the VMDK is as large as the disk.
    let raw = sb.path("disk.raw");
    std::fs::write(&raw, rng.bytes(64 * MIB as usize)).unwrap();
    let snap = sb.replicate(&raw, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let (url, backend) = target("export-kill-dst");
    // The smallest parts, one at a time over a slow link: a kill lands between parts.
    let slow = ["--part-size", "5M", "--jobs", "1"];
    let proxy = Proxy::start(&s3().endpoint);
    proxy.set_rule(|r| {
        if r.is_upload_part() {
            Action::Delay(Duration::from_millis(100))
        } else {
            Action::Forward
        }
    });
    for (format, key) in [("raw", "disk.raw"), ("vmdk", "disk.vmdk")] {
        let out = format!("{url}/{key}");
        for parts in [3, 8] {
            kill_after_parts(
                &sb,
                spawn_export(&sb, &proxy.url, &snap, &out, format, &slow),
                parts,
            );
        }
        let jobs = sb.json(&["jobs"]);
        let job = jobs["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["source"] == out.as_str())
            .unwrap_or_else(|| panic!("no job for {out}: {jobs}"))
            .clone();
        assert_eq!(job["kind"], "export", "{job}");
        assert_eq!(job["state"], "active", "{job}");
        let report = export(&sb, &snap, &out, format, &slow);
        assert_eq!(report["resumed"], true, "{report}");
        let resumed = report["bytes_resumed"].as_u64().unwrap();
        assert!(resumed >= 40 * MIB, "{report}");
        // What the runs sent adds up to the file, give or take the parts in flight at each
        // kill: nothing durable was sent again.
        let file = report["file_size"].as_u64().unwrap();
        assert_eq!(
            report["bytes_sent"].as_u64().unwrap() + resumed,
            file,
            "{report}"
        );
        let local = sb.path(&format!("local-{key}"));
        export(&sb, &snap, local.to_str().unwrap(), format, &[]);
        let got = backend.get(key, u64::MAX).unwrap();
        if format == "raw" {
            assert_eq!(got, std::fs::read(&local).unwrap(), "{format}");
        } else if have_qemu() {
            let downloaded = sb.path(&format!("downloaded-{key}"));
            std::fs::write(&downloaded, &got).unwrap();
            assert_eq!(qemu_raw(&downloaded, "vmdk"), std::fs::read(&raw).unwrap());
        }
        let jobs = sb.json(&["jobs"]);
        let done = jobs["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == job["id"])
            .unwrap()
            .clone();
        assert_eq!(done["state"], "done", "{done}");
        // Three runs; the parts the store acknowledged were counted once.
        assert_eq!(done["runs"], 3, "{done}");
        assert!(
            done["bytes_sent"].as_u64().unwrap() < file + 4 * MIB,
            "{done}"
        );
    }
    // An export abandoned half-way leaves no upload behind either.
    let out = format!("{url}/abandoned.raw");
    kill_after_parts(
        &sb,
        spawn_export(&sb, &proxy.url, &snap, &out, "raw", &slow),
        2,
    );
    let jobs = sb.json(&["jobs"]);
    let job = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["source"] == out.as_str())
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!backend.list_uploads().unwrap().is_empty());
    sb.ok(&["abandon", &job]);
    assert!(
        backend.list_uploads().unwrap().is_empty(),
        "abandoning the export aborted its upload"
    );
    sb.ok(&["cleanup", "--store", &sb.store(), "--older-than", "0s"]);
    assert!(
        backend.list_uploads().unwrap().is_empty(),
        "{:?}",
        backend.list_uploads()
    );
}

/// An incremental raw export of `snap` to `out`: its report, and what it said on stderr.
fn incremental(sb: &Sandbox, snap: &str, out: &str) -> (Value, String) {
    let store = sb.store();
    let run = sb.run(&[
        "export",
        snap,
        out,
        "--store",
        &store,
        "--format",
        "raw",
        "--incremental",
        "--json",
    ]);
    assert!(run.status.success(), "{run:?}");
    let report = serde_json::from_slice(&run.stdout).unwrap();
    (report, String::from_utf8_lossy(&run.stderr).into_owned())
}

#[test]
fn a_delta_export_copies_what_did_not_change() {
    let mut rng = Rng::seeded("a_delta_export_copies_what_did_not_change");
    let sb = Sandbox::new_s3("export-delta");
    sb.init(&[]);
    let raw = sb.path("disk.raw");
    random_disk(&mut rng, &raw, 128 * MIB);
    let first = sb.replicate(&raw, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let (url, backend) = target("export-delta-dst");
    for (format, key) in [("raw", "vm.raw"), ("vhd-fixed", "vm.vhd")] {
        let out = format!("{url}/{key}");
        let full = export(&sb, &first, &out, format, &[]);
        assert_eq!(full["bytes_copied"], 0);
        assert!(full["base"].is_null());
    }
    // Two 1 MiB chunks change, far apart.
    for at in [10 * MIB, 100 * MIB] {
        write_at(&raw, at, &rng.bytes(MIB as usize));
    }
    let second = sb.replicate(&raw, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    for (format, key) in [("raw", "vm.raw"), ("vhd-fixed", "vm.vhd")] {
        let out = format!("{url}/{key}");
        let delta = export(&sb, &second, &out, format, &["--incremental"]);
        assert_eq!(delta["base"], first.as_str(), "{delta}");
        let file = delta["file_size"].as_u64().unwrap();
        let sent = delta["bytes_sent"].as_u64().unwrap();
        // Two changed chunks (each staged behind a copy of the unchanged bytes before it,
        // rather than sent in a part of S3's smallest size), a fixed VHD's footer besides.
        assert_eq!(sent, 2 * MIB + file % MIB, "{format}: {delta}");
        assert_eq!(
            sent + delta["bytes_copied"].as_u64().unwrap(),
            file,
            "{delta}"
        );
        // Staging objects are gone.
        let left: Vec<_> = backend
            .list("")
            .unwrap()
            .into_iter()
            .filter(|k| k.contains(".blockferry-part-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        // The new object is the full export of the new snapshot.
        let local = sb.path(&format!("full-{key}"));
        export(&sb, &second, local.to_str().unwrap(), format, &[]);
        let got = backend.get(key, u64::MAX).unwrap();
        let want = std::fs::read(&local).unwrap();
        let data = if format == "raw" {
            want.len()
        } else {
            want.len() - 512
        };
        assert_eq!(got.len(), want.len());
        assert!(
            got[..data] == want[..data],
            "{format}: the delta export's bytes"
        );
        if format == "vhd-fixed" && have_qemu() {
            let downloaded = sb.path("downloaded.vhd");
            std::fs::write(&downloaded, &got).unwrap();
            assert_eq!(
                qemu_raw(&downloaded, "vpc")[..128 * MIB as usize],
                std::fs::read(&raw).unwrap()[..]
            );
        }
    }

    // A base named explicitly, written to another key.
    let out = format!("{url}/copy.raw");
    let delta = export(
        &sb,
        &second,
        &out,
        "raw",
        &["--base-export", &format!("{url}/vm.raw@{second}")],
    );
    assert_eq!(
        delta["bytes_sent"], 0,
        "same snapshot: everything copied: {delta}"
    );
    assert_eq!(
        backend.get("copy.raw", u64::MAX).unwrap(),
        std::fs::read(&raw).unwrap()
    );

    // An object overwritten by someone else, or deleted, is no base: all is sent.
    backend
        .put("vm.raw", b"not an export", blockferry::PutMode::Overwrite)
        .unwrap();
    write_at(&raw, 50 * MIB, &rng.bytes(MIB as usize));
    let third = sb.replicate(&raw, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let store = sb.store();
    for round in ["overwritten", "deleted"] {
        if round == "deleted" {
            backend.delete("vm.raw").unwrap();
        }
        let (report, err) = incremental(&sb, &third, &format!("{url}/vm.raw"));
        assert!(
            err.contains("cannot serve as the base export"),
            "{round}: {err}"
        );
        assert_eq!(report["bytes_copied"], 0, "{round}: {report}");
        assert!(report["base"].is_null());
        assert_eq!(
            backend.get("vm.raw", u64::MAX).unwrap(),
            std::fs::read(&raw).unwrap()
        );
    }
    // The export then made is a base again; rewritten by another client (its own parts, so
    // another ETag, with the same metadata), it is not the object this client wrote.
    let other = sb.path("other-state");
    let rewrite = sb.run_env(
        &[
            "export",
            &third,
            &format!("{url}/vm.raw"),
            "--store",
            &store,
            "--format",
            "raw",
            "--part-size",
            "8M",
        ],
        &[
            ("BLOCKFERRY_PASSPHRASE", PASSPHRASE),
            ("BLOCKFERRY_STATE_DIR", other.to_str().unwrap()),
        ],
    );
    assert!(rewrite.status.success(), "{rewrite:?}");
    write_at(&raw, 60 * MIB, &rng.bytes(MIB as usize));
    let fourth = sb.replicate(&raw, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let (report, err) = incremental(&sb, &fourth, &format!("{url}/vm.raw"));
    assert!(err.contains("overwritten"), "{err}");
    assert_eq!(report["bytes_copied"], 0, "{report}");
    // And from then on, deltas again.
    write_at(&raw, 70 * MIB, &rng.bytes(MIB as usize));
    let fifth = sb.replicate(&raw, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let delta = export(
        &sb,
        &fifth,
        &format!("{url}/vm.raw"),
        "raw",
        &["--incremental"],
    );
    assert_eq!(delta["base"], fourth.as_str(), "{delta}");
    assert_eq!(delta["bytes_sent"], MIB, "{delta}");
    assert_eq!(
        backend.get("vm.raw", u64::MAX).unwrap(),
        std::fs::read(&raw).unwrap()
    );
    // A delta onto a format whose parts move with the content is refused.
    sb.fails(
        &[
            "export",
            &third,
            &format!("{url}/vm.vhdx"),
            "--store",
            &store,
            "--format",
            "vhdx",
            "--incremental",
        ],
        1,
        &["only raw and vhd-fixed"],
    );
}

/// Staging objects (and their uploads) of delta exports to `key`.
fn staging_left(backend: &dyn blockferry::ObjectStore, key: &str) -> Vec<String> {
    let prefix = format!("{key}.blockferry-part-");
    let mut left: Vec<String> = backend
        .list_uploads()
        .unwrap()
        .into_iter()
        .map(|u| u.key)
        .chain(backend.list("").unwrap())
        .filter(|k| k.starts_with(&prefix))
        .collect();
    left.sort();
    left
}

#[test]
fn a_delta_export_killed_while_staging_resumes_or_is_abandoned_cleanly() {
    let mut rng =
        Rng::seeded("a_delta_export_killed_while_staging_resumes_or_is_abandoned_cleanly");
    let sb = Sandbox::new_s3("export-stage");
    sb.init(&[]);
    let raw = sb.path("disk.raw");
    random_disk(&mut rng, &raw, 64 * MIB);
    let mut base = sb.replicate(&raw, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let (url, backend) = target("export-stage-dst");
    let out = format!("{url}/vm.raw");
    export(&sb, &base, &out, "raw", &[]);
    // Requests about staging objects crawl: a kill lands while a part is being staged.
    let proxy = Proxy::start(&s3().endpoint);
    proxy.set_rule(|r| {
        if r.target.contains(".blockferry-part-") {
            Action::Delay(Duration::from_millis(300))
        } else {
            Action::Forward
        }
    });
    for abandon in [false, true] {
        let before = backend.get("vm.raw", u64::MAX).unwrap();
        for at in [20 * MIB, 40 * MIB] {
            write_at(&raw, at, &rng.bytes(MIB as usize));
        }
        let snap = sb.replicate(&raw, &[])["snapshot"]
            .as_str()
            .unwrap()
            .to_owned();
        let incremental = ["--incremental", "--jobs", "1"];
        let mut child = spawn_export(&sb, &proxy.url, &snap, &out, "raw", &incremental);
        let start = Instant::now();
        while staging_left(backend.as_ref(), "vm.raw").is_empty() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "the export ended first"
            );
            assert!(start.elapsed() < Duration::from_secs(60), "nothing staged");
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!staging_left(backend.as_ref(), "vm.raw").is_empty());
        if abandon {
            let jobs = sb.json(&["jobs"]);
            let job = jobs["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .find(|j| j["source"] == out.as_str() && j["state"] == "active")
                .unwrap_or_else(|| panic!("no active job for {out}: {jobs}"))["id"]
                .as_str()
                .unwrap()
                .to_owned();
            sb.ok(&["abandon", &job]);
            // The object is the previous export still.
            assert_eq!(backend.get("vm.raw", u64::MAX).unwrap(), before);
        } else {
            let report = export(&sb, &snap, &out, "raw", &incremental);
            assert_eq!(report["base"], base.as_str(), "{report}");
            // The killed run's job, run again.
            let jobs = sb.json(&["jobs"]);
            let job = jobs["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .find(|j| j["id"] == report["job"])
                .unwrap_or_else(|| panic!("no job {}: {jobs}", report["job"]))
                .clone();
            assert_eq!(job["runs"], 2, "{job}");
            assert!(
                report["bytes_sent"].as_u64().unwrap() <= 2 * MIB,
                "{report}"
            );
            assert_eq!(
                backend.get("vm.raw", u64::MAX).unwrap(),
                std::fs::read(&raw).unwrap()
            );
            base = snap;
        }
        assert_eq!(
            staging_left(backend.as_ref(), "vm.raw"),
            Vec::<String>::new()
        );
        assert!(backend.list_uploads().unwrap().is_empty());
    }
}

#[test]
fn an_export_killed_once_complete_is_not_sent_again() {
    let mut rng = Rng::seeded("an_export_killed_once_complete_is_not_sent_again");
    let sb = Sandbox::new_s3("export-done");
    sb.init(&[]);
    let raw = sb.path("disk.raw");
    random_disk(&mut rng, &raw, 24 * MIB);
    let snap = sb.replicate(&raw, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let (url, backend) = target("export-done-dst");
    let out = format!("{url}/vm.raw");
    // Once the object is complete, the client's look at it hangs: the kill lands between
    // the completion and its record in the job database.
    let proxy = Proxy::start(&s3().endpoint);
    proxy.set_rule(|r| {
        if r.method == "HEAD" && r.target.contains("/vm.raw") {
            Action::Delay(Duration::from_secs(60))
        } else {
            Action::Forward
        }
    });
    let mut child = spawn_export(&sb, &proxy.url, &snap, &out, "raw", &["--part-size", "5M"]);
    let start = Instant::now();
    while !backend.list("").unwrap().iter().any(|k| k == "vm.raw") {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the export ended first"
        );
        assert!(start.elapsed() < Duration::from_secs(60), "never completed");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let active = sb.job_db_count("SELECT count(*) FROM jobs WHERE state = 'active'");
    assert_eq!(active, 1, "the kill left the job unfinished");
    // Run again with another part size: the object is complete, whatever plan made it.
    let report = export(&sb, &snap, &out, "raw", &[]);
    assert_eq!(report["bytes_sent"], 0, "{report}");
    assert_eq!(report["resumed"], true, "{report}");
    assert_eq!(report["file_size"], 24 * MIB, "{report}");
    assert_eq!(
        sb.job_db_count("SELECT count(*) FROM jobs WHERE state = 'done' AND kind = 'export'"),
        1
    );
    assert_eq!(
        backend.get("vm.raw", u64::MAX).unwrap(),
        std::fs::read(&raw).unwrap()
    );
    assert!(backend.list_uploads().unwrap().is_empty());
}
