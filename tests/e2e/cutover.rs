//! `blockferry cutover` against a live source: a process writing to a raw image at a set
//! rate, stopped by the pre-hook. A failure in the final delta rolls back (the writer runs
//! again); a second cutover completes, and the target is the image as the writer left it.

use std::process::Command;
use std::time::Duration;

use blockferry_tests::{MIB, Rng, Sandbox, Value};

const WRITER: &str = r#"
import os, random, sys, time
path, rate, pidfile = sys.argv[1], float(sys.argv[2]), sys.argv[3]
with open(pidfile + ".tmp", "w") as p:
    p.write(str(os.getpid()))
os.rename(pidfile + ".tmp", pidfile)
fd = os.open(path, os.O_RDWR)
size = os.fstat(fd).st_size
rnd = random.Random(os.getpid())
block = 64 * 1024
while True:
    os.pwrite(fd, os.urandom(block), rnd.randrange(size // block) * block)
    time.sleep(1.0 / rate)
"#;

/// Whether the writer named in `pidfile` runs (a zombie does not).
fn pid_alive(pidfile: &std::path::Path) -> bool {
    let Ok(pid) = std::fs::read_to_string(pidfile) else {
        return false;
    };
    std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
        .is_ok_and(|stat| stat.split(' ').nth(2) != Some("Z"))
}

/// The names of a report's steps but the sync cycles.
fn steps_after_sync(report: &Value) -> Vec<String> {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] != "sync")
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_cutover_rolls_back_on_failure_and_completes_when_run_again() {
    let mut rng = Rng::seeded("a_cutover_rolls_back");
    let sb = Sandbox::new();
    sb.init(&[]);
    let disk = sb.path("disk.raw");
    std::fs::write(&disk, rng.bytes(192 * MIB as usize)).unwrap();
    let writer = sb.path("writer.py");
    std::fs::write(&writer, WRITER).unwrap();
    let pidfile = sb.path("writer.pid");
    let start_writer = format!(
        "nohup python3 {} {} 20 {} >/dev/null 2>&1 &",
        writer.display(),
        disk.display(),
        pidfile.display()
    );
    let status = Command::new("sh")
        .args(["-c", &start_writer])
        .status()
        .unwrap();
    assert!(status.success());
    for _ in 0..100 {
        if pid_alive(&pidfile) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(pid_alive(&pidfile), "the writer started");
    // Stopped: gone, or a zombie (its last write done) waiting for init to reap it.
    let stop_writer = format!(
        "p=$(cat {0}); kill $p; while [ -e /proc/$p ] && [ \"$(cut -d' ' -f3 /proc/$p/stat)\" != Z ]; \
         do sleep 0.02; done; rm -f {0}",
        pidfile.display()
    );
    let target = sb.path("target.raw");
    let store = sb.store();
    let cutover = |pre: &str, rollback: &str| -> (bool, Value) {
        let out = sb.run(&[
            "cutover",
            disk.to_str().unwrap(),
            "--store",
            &store,
            "--to",
            target.to_str().unwrap(),
            "--max-downtime",
            "10s",
            "--interval",
            "500ms",
            "--pre-hook",
            pre,
            "--rollback-hook",
            rollback,
            "--post-hook",
            &format!(
                "echo \"$BLOCKFERRY_SNAPSHOT $BLOCKFERRY_TARGET\" > {}",
                sb.path("post.txt").display()
            ),
            "--json",
        ]);
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "no report ({e}): {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.success(), report)
    };

    // 1. The final delta fails (the pre-hook also takes the image away): the rollback hook
    // puts it back and restarts the writer.
    let away = sb.path("disk.away");
    let (ok, report) = cutover(
        &format!("{stop_writer} && mv {} {}", disk.display(), away.display()),
        &format!("mv {} {} && {start_writer}", away.display(), disk.display()),
    );
    assert!(!ok, "{report}");
    assert_eq!(report["outcome"], "rolled-back", "{report}");
    let steps = steps_after_sync(&report);
    assert_eq!(
        steps,
        ["pre-hook", "final-delta", "rollback-hook"],
        "{report}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(pid_alive(&pidfile), "the rollback restarted the writer");
    assert!(
        !sb.path("post.txt").exists(),
        "no post-hook after a failure"
    );

    // 2. Run again: it continues, and completes.
    let (ok, report) = cutover(&stop_writer, &start_writer);
    assert!(ok, "{report}");
    assert_eq!(report["outcome"], "completed");
    assert!(!pid_alive(&pidfile), "the writer is stopped");
    // The target is the image as the writer left it.
    assert!(
        std::fs::read(&target).unwrap() == std::fs::read(&disk).unwrap(),
        "the target is the image at the moment the writer stopped"
    );
    assert_eq!(report["verified"], true, "{report}");
    let snapshot = report["snapshot"].as_str().unwrap();
    let post = std::fs::read_to_string(sb.path("post.txt")).unwrap();
    assert_eq!(
        post.trim(),
        format!("{snapshot} {}", target.display()),
        "the post-hook got the result"
    );
    let predicted = report["predicted_downtime_seconds"].as_f64().unwrap();
    let measured = report["measured_downtime_seconds"].as_f64().unwrap();
    eprintln!("downtime: predicted {predicted:.2}s, measured {measured:.2}s");
    assert!(
        measured <= 2.0 * predicted + 0.5 && predicted <= 2.0 * measured + 0.5,
        "predicted {predicted:.2}s, measured {measured:.2}s: {report:#}"
    );
    let steps = steps_after_sync(&report);
    assert_eq!(
        steps,
        ["pre-hook", "final-delta", "verify", "export", "post-hook"],
        "{report}"
    );
}
