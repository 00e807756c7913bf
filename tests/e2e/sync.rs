//! Continuous replication: `sync` with a changes command that plays a running VM (random
//! writes between cycles, the cumulative list since the base's change id, as CBT gives),
//! killed at random moments and restarted; every snapshot it made restores to the disk's
//! state at its change id. SIGTERM stops it cleanly.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blockferry_tests::{MIB, PASSPHRASE, Rng, Sandbox, Value, bin, make_image, objects};

/// Plays the VM: writes state N into the image (its extents recorded first, so a kill never
/// loses a write from the lists), records the image's hash, prints the extents of every state
/// since the base's change id `t/B`.
const VM_SCRIPT: &str = r#"
import hashlib, json, os, random, sys
state, image = sys.argv[1], sys.argv[2]
size = os.path.getsize(image)
base = os.environ.get("BLOCKFERRY_BASE_CHANGE_ID", "")
n = len([f for f in os.listdir(state) if f.endswith(".extents")])
rng = random.Random(int(os.environ["VM_SEED"]) * 1000 + n)
exts = []
for _ in range(rng.randint(1, 4)):
    l = rng.randint(1, 1 << 20)
    exts.append([rng.randrange(0, size - l), l])
with open(f"{state}/{n}.tmp", "w") as f:
    json.dump(exts, f)
os.rename(f"{state}/{n}.tmp", f"{state}/{n}.extents")
with open(image, "r+b") as f:
    for o, l in exts:
        f.seek(o)
        f.write(rng.randbytes(l))
    f.flush()
    os.fsync(f.fileno())
with open(image, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
with open(f"{state}/{n}.sha256", "w") as f:
    f.write(digest)
b = int(base.split("/")[1]) if base else -1
listed = []
for k in range(b + 1, n + 1):
    with open(f"{state}/{k}.extents") as f:
        listed += json.load(f)
print(json.dumps({"changeId": base or "*", "newChangeId": f"t/{n}", "extents": listed}))
"#;

fn spawn_sync(sb: &Sandbox, image: &std::path::Path, every: &str) -> Child {
    let script = sb.path("vm.py");
    let cmd = format!(
        "python3 {} {} {}",
        script.display(),
        sb.path("vm").display(),
        image.display()
    );
    let store = sb.store();
    Command::new(bin())
        .args(["sync", image.to_str().unwrap(), "--store", &store])
        .args(["--every", every, "--changes-command", &cmd, "--name", "vm"])
        .env("BLOCKFERRY_PASSPHRASE", PASSPHRASE)
        .env("BLOCKFERRY_STATE_DIR", sb.path("state"))
        .env("VM_SEED", "7")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap()
}

/// SIGKILL to the whole group: sync and its changes command.
fn kill_group(child: &mut Child) {
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: kill(2) with a negative pid signals the process group the test created; no
    // memory is involved.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
    child.wait().unwrap();
}

fn snapshots(sb: &Sandbox) -> Vec<Value> {
    let store = sb.store();
    sb.json(&["snapshots", "--store", &store])["snapshots"]
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn sync_survives_kills_and_every_snapshot_restores() {
    let mut rng = Rng::seeded("sync_kills");
    let sb = Sandbox::new();
    sb.init(&[]);
    std::fs::write(sb.path("vm.py"), VM_SCRIPT).unwrap();
    std::fs::create_dir_all(sb.path("vm")).unwrap();
    let image = sb.path("vm.raw");
    make_image(&image, 32 * MIB, &[(0, rng.bytes((20 * MIB) as usize))]);
    let store = sb.store();
    let start = Instant::now();
    let mut kills = 0;
    while objects(&store, "snapshots").len() < 22 {
        assert!(start.elapsed() < Duration::from_secs(400), "too slow");
        let mut child = spawn_sync(&sb, &image, "100ms");
        std::thread::sleep(Duration::from_millis(150 + rng.below(900)));
        kill_group(&mut child);
        kills += 1;
    }
    // A last cycle, then SIGTERM while it waits: a clean stop.
    let before = objects(&store, "snapshots").len();
    let mut child = spawn_sync(&sb, &image, "1h");
    let waiting = Instant::now();
    while objects(&store, "snapshots").len() == before {
        assert!(child.try_wait().unwrap().is_none(), "sync ended early");
        if waiting.elapsed() > Duration::from_secs(120) {
            kill_group(&mut child);
            panic!("no cycle completed in 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on the child's pid; no memory is involved.
    unsafe {
        libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGTERM);
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("stopped by signal"), "{stderr}");
    assert!(stderr.contains("lag"), "{stderr}");

    let snaps = snapshots(&sb);
    println!("{kills} kills, {} snapshots", snaps.len());
    assert!(snaps.len() >= 20);
    let mut deltas = 0;
    for s in &snaps {
        let id = s["id"].as_str().unwrap();
        let state = s["change_id"].as_str().unwrap().trim_start_matches("t/");
        let want = std::fs::read_to_string(sb.path(&format!("vm/{state}.sha256"))).unwrap();
        let out = sb.restore(id, &format!("{id}.out"));
        let got = Command::new("sha256sum").arg(&out).output().unwrap();
        let got = String::from_utf8_lossy(&got.stdout);
        assert_eq!(
            got.split_whitespace().next(),
            Some(want.trim()),
            "snapshot {id} of state {state}: {s}"
        );
        std::fs::remove_file(out).unwrap();
        if !s["parent"].is_null() {
            deltas += 1;
            assert!(s["changes"]["fallback"].is_null(), "{s}");
        }
    }
    assert!(deltas >= snaps.len() - 1, "{snaps:?}");
}

#[test]
fn sync_takes_dropped_lists_together_and_files_them() {
    let mut rng = Rng::seeded("sync_drop");
    let sb = Sandbox::new();
    sb.init(&[]);
    let image = sb.path("vm.raw");
    make_image(&image, 16 * MIB, &[(0, rng.bytes((10 * MIB) as usize))]);
    let dir = sb.path("lists");
    std::fs::create_dir_all(&dir).unwrap();
    let store = sb.store();
    let sync = |sb: &Sandbox| {
        sb.run(&[
            "sync",
            image.to_str().unwrap(),
            "--store",
            &store,
            "--changes-dir",
            dir.to_str().unwrap(),
            "--cycles",
            "1",
        ])
    };
    // No snapshot yet: the first cycle copies everything, list or not.
    assert!(sync(&sb).status.success());
    assert_eq!(objects(&store, "snapshots").len(), 1);
    // Two lists wait (dropped whole: a dot file renamed); one cycle takes both.
    for name in ["001.list", "002.list"] {
        let len = 1 + rng.below(MIB);
        let offset = rng.below(16 * MIB - len);
        blockferry_tests::write_at(&image, offset, &rng.bytes(len as usize));
        let tmp = dir.join(format!(".{name}"));
        std::fs::write(&tmp, format!("{offset},{len}\n")).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
    let out = sync(&sb);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let snaps = snapshots(&sb);
    assert_eq!(snaps.len(), 2);
    let delta = snaps.iter().find(|s| !s["parent"].is_null()).unwrap();
    let id = delta["id"].as_str().unwrap();
    let restored = sb.restore(id, "delta.out");
    assert_eq!(
        blockferry_tests::file_hash(&restored),
        blockferry_tests::file_hash(&image)
    );
    assert!(dir.join("done/001.list").exists() && dir.join("done/002.list").exists());
    // An empty file is refused, not taken as "nothing changed"; it stays for a look.
    std::fs::write(dir.join("003.list"), "").unwrap();
    let out = sync(&sb);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is empty"), "{stderr}");
    assert!(dir.join("003.list").exists());
    assert_eq!(snapshots(&sb).len(), 2);
}

#[test]
fn sync_by_hash_chains_across_restarts_and_reports_the_lag_after_one() {
    let mut rng = Rng::seeded("sync_hash");
    let sb = Sandbox::new();
    sb.init(&[]);
    let image = sb.path("vm.raw");
    make_image(&image, 16 * MIB, &[(0, rng.bytes((10 * MIB) as usize))]);
    let store = sb.store();
    let sync = |image: &std::path::Path| {
        sb.run(&[
            "sync",
            image.to_str().unwrap(),
            "--name",
            "vm",
            "--store",
            &store,
            "--changes",
            "hash",
            "--cycles",
            "1",
            "--json",
        ])
    };
    let line = |out: &std::process::Output| -> Value {
        serde_json::from_slice(&out.stdout).expect("one JSON line per cycle")
    };
    let first = sync(&image);
    assert!(first.status.success());
    for _ in 0..2 {
        let len = 1 + rng.below(MIB);
        let offset = rng.below(16 * MIB - len);
        blockferry_tests::write_at(&image, offset, &rng.bytes(len as usize));
        let out = sync(&image);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cycle = line(&out);
        assert!(cycle["lag_seconds"].as_f64().is_some(), "{cycle}");
    }
    let snaps = snapshots(&sb);
    assert_eq!(snaps.len(), 3);
    let newest = snaps
        .iter()
        .max_by_key(|s| s["created_unix_ms"].as_u64())
        .unwrap();
    assert!(!newest["parent"].is_null(), "{newest}");
    assert_eq!(newest["changes"]["source"], "hash", "{newest}");
    let restored = sb.restore(newest["id"].as_str().unwrap(), "out.raw");
    assert_eq!(
        blockferry_tests::file_hash(&restored),
        blockferry_tests::file_hash(&image)
    );
    // A restarted sync whose cycle fails still reports the lag, from the newest snapshot.
    let out = sync(&sb.path("gone.raw"));
    let cycle = line(&out);
    assert!(
        cycle["error"].is_string() || cycle["error"].is_object(),
        "{cycle}"
    );
    assert!(cycle["lag_seconds"].as_f64().is_some(), "{cycle}");
    assert!(cycle["last_success"].is_string(), "{cycle}");
}

/// Fetches `path` from the HTTP server at `addr`: the status line, the head and the body.
fn http_get(addr: &str, path: &str) -> (String, String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    let (head, body) = all.split_once("\r\n\r\n").unwrap();
    let status = head.lines().next().unwrap().to_owned();
    (status, head.to_owned(), body.to_owned())
}

/// The value of the series whose line starts with `series` (name and labels).
fn sample(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{body}"))
}

#[test]
fn sync_serves_its_metrics_while_it_runs() {
    let mut rng = Rng::seeded("sync_metrics");
    let sb = Sandbox::new();
    sb.init(&[]);
    let image = sb.path("vm.raw");
    make_image(&image, 16 * MIB, &[(0, rng.bytes((6 * MIB) as usize))]);
    let mut child = Command::new(bin())
        .args(["sync", image.to_str().unwrap(), "--store", &sb.store()])
        .args(["--changes", "hash", "--every", "1s", "--name", "vm"])
        .args(["--metrics", "127.0.0.1:0"])
        .env("BLOCKFERRY_PASSPHRASE", PASSPHRASE)
        .env("BLOCKFERRY_STATE_DIR", sb.path("state"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The address comes first on stderr.
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut err, &mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("metrics: http://")
        .and_then(|s| s.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("{line}"))
        .to_owned();
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    let scrape = |want_cycles: f64| -> String {
        let t = Instant::now();
        loop {
            let (status, head, body) = http_get(&addr, "/metrics");
            assert!(status.contains("200"), "{status}");
            assert!(head.contains("application/openmetrics-text"), "{head}");
            let ok = body
                .lines()
                .find_map(|l| {
                    l.strip_prefix("blockferry_sync_cycles_total{disk=\"vm\",result=\"ok\"}")
                })
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0);
            if ok >= want_cycles {
                return body;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "{body}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let first = scrape(1.0);
    assert!(first.trim_end().ends_with("# EOF"), "{first}");
    assert!(
        first.contains("# TYPE blockferry_bytes_sent counter"),
        "{first}"
    );
    let sent = sample(&first, "blockferry_bytes_sent_total{disk=\"vm\"}");
    let mib = f64::from(1u32 << 20);
    assert!(sent >= 6.0 * mib, "{first}");
    let lag = sample(&first, "blockferry_replication_lag_seconds{disk=\"vm\"}");
    assert!((0.0..30.0).contains(&lag), "{first}");
    // A change: the next cycles send it, and the counter grows by about that much.
    blockferry_tests::write_at(&image, 8 * MIB, &rng.bytes(MIB as usize));
    let cycles = sample(
        &first,
        "blockferry_sync_cycles_total{disk=\"vm\",result=\"ok\"}",
    );
    let later = scrape(cycles + 2.0);
    let more = sample(&later, "blockferry_bytes_sent_total{disk=\"vm\"}") - sent;
    assert!(more >= mib && more < 2.0 * mib, "{later}");
    assert!(sample(&later, "blockferry_snapshots_total{disk=\"vm\"}") >= 3.0);
    let (status, _, _) = http_get(&addr, "/elsewhere");
    assert!(status.contains("404"), "{status}");
    // SAFETY: kill(2) of our own child process.
    unsafe {
        libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGTERM);
    }
    assert!(child.wait().unwrap().success());
}
