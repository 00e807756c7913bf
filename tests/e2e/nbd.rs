//! `blockferry serve --nbd`: independent clients (libnbd's nbdinfo and nbdcopy, qemu-img)
//! read a snapshot as the restore writes it, from local and S3 stores, several at once; bad
//! clients end their own connection only; the cache stays within its bound.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blockferry_tests::{MIB, PASSPHRASE, Rng, Sandbox, Value, bin, have_qemu, random_disk, s3};

/// Whether libnbd's tools are here; under `BF_REQUIRE_TOOLS=1` (CI) their absence fails.
fn have_libnbd() -> bool {
    let ok = Command::new("nbdinfo").arg("--version").output().is_ok();
    assert!(
        ok || std::env::var_os("BF_REQUIRE_TOOLS").is_none(),
        "nbdinfo is missing: apt-get install libnbd-bin"
    );
    ok
}

/// A running `blockferry serve`, stopped (SIGTERM) when dropped.
struct Server {
    child: Child,
    uri: String,
    socket: PathBuf,
}

impl Server {
    fn start(sb: &Sandbox, snap: &str, extra: &[&str]) -> Server {
        let socket = sb.path(&format!("nbd-{}.sock", rand_tag()));
        let mut cmd = Command::new(bin());
        cmd.args(["serve", snap, "--store", &sb.store()])
            .args(["--nbd", &format!("unix:{}", socket.display())])
            .args(extra)
            .env("BLOCKFERRY_PASSPHRASE", PASSPHRASE)
            .env("BLOCKFERRY_STATE_DIR", sb.path("state"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if sb.store_url.is_some() {
            cmd.envs(s3().vars());
        }
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("nbd+unix://"), "serve printed {line:?}");
        Server {
            child,
            uri: line.trim().to_owned(),
            socket,
        }
    }

    /// Peak resident memory of the server so far, in bytes.
    fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kb * 1024
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(self.child.id().cast_signed(), libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn rand_tag() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The allocation nbdinfo maps: (offset, length, is data).
fn nbd_map(uri: &str) -> Vec<(u64, u64, bool)> {
    let json = run(Command::new("nbdinfo").args(["--map", "--json", uri]));
    let v: Value = serde_json::from_str(&json).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap() == 0,
            )
        })
        .collect()
}

/// The allocation of a raw image as the store records it: chunks of 1 MiB holding anything
/// but zeros, runs joined.
fn chunk_map(raw: &Path) -> Vec<(u64, u64, bool)> {
    let data = std::fs::read(raw).unwrap();
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for (i, c) in data.chunks(MIB as usize).enumerate() {
        let has = c.iter().any(|&b| b != 0);
        match out.last_mut() {
            Some(last) if last.2 == has => last.1 += c.len() as u64,
            _ => out.push((i as u64 * MIB, c.len() as u64, has)),
        }
    }
    out
}

fn copies_equal(server: &Server, sb: &Sandbox, want: &[u8], tag: &str) {
    let out = sb.path(&format!("nbdcopy-{tag}.raw"));
    run(Command::new("nbdcopy").arg(&server.uri).arg(&out));
    assert!(std::fs::read(&out).unwrap() == want, "{tag}: nbdcopy");
    if have_qemu() {
        let q = sb.path(&format!("qemu-{tag}.raw"));
        run(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &server.uri])
            .arg(&q));
        assert!(
            std::fs::read(&q).unwrap() == want,
            "{tag}: qemu-img convert"
        );
    }
}

#[test]
fn nbd_clients_read_the_snapshot_from_a_local_and_an_s3_store() {
    if !have_libnbd() {
        return;
    }
    let mut rng = Rng::seeded("nbd_clients_read_the_snapshot");
    for (tag, sb) in [("local", Sandbox::new()), ("s3", Sandbox::new_s3("nbd"))] {
        sb.init(&[]);
        let raw = sb.path("disk.raw");
        // Not a whole number of chunks: the last is short.
        random_disk(&mut rng, &raw, 40 * MIB + 4096);
        let snap = sb.replicate(&raw, &[])["snapshot"]
            .as_str()
            .unwrap()
            .to_owned();
        let want = std::fs::read(&raw).unwrap();
        let server = Server::start(&sb, &snap, &[]);
        // The size, and the allocation as the snapshot has it.
        let size = run(Command::new("nbdinfo").args(["--size", &server.uri]));
        assert_eq!(size.trim(), want.len().to_string());
        assert_eq!(
            nbd_map(&server.uri),
            chunk_map(&raw),
            "{tag}: nbdinfo --map"
        );
        copies_equal(&server, &sb, &want, tag);
        // Four clients at once.
        let children: Vec<_> = (0..4)
            .map(|i| {
                let out = sb.path(&format!("par-{tag}-{i}.raw"));
                let c = Command::new("nbdcopy")
                    .arg(&server.uri)
                    .arg(&out)
                    .spawn()
                    .unwrap();
                (c, out)
            })
            .collect();
        for (mut c, out) in children {
            assert!(c.wait().unwrap().success());
            assert!(
                std::fs::read(&out).unwrap() == want,
                "{tag}: a parallel copy"
            );
        }
        drop(server);
    }
}

/// A minimal NBD client: negotiates with `NBD_OPT_GO` (structured replies if asked).
struct RawClient {
    s: UnixStream,
}

impl RawClient {
    fn connect(socket: &Path, structured: bool) -> RawClient {
        let mut s = UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..8], b"NBDMAGIC");
        s.write_all(&3u32.to_be_bytes()).unwrap();
        let mut c = RawClient { s };
        if structured {
            c.option(8, &[]);
            assert_eq!(c.option_reply().0, 1);
        }
        let mut go = 0u32.to_be_bytes().to_vec();
        go.extend_from_slice(&0u16.to_be_bytes());
        c.option(7, &go);
        loop {
            let (kind, _) = c.option_reply();
            if kind == 1 {
                break;
            }
            assert_eq!(kind, 3, "NBD_REP_INFO");
        }
        c
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut m = b"IHAVEOPT".to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).unwrap();
    }

    fn option_reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).unwrap();
        (kind, data)
    }

    fn request(&mut self, kind: u16, offset: u64, length: u32) {
        let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&7u64.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&length.to_be_bytes());
        self.s.write_all(&m).unwrap();
    }

    /// A simple reply's error.
    fn simple_error(&mut self) -> u32 {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x6744_6698);
        u32::from_be_bytes(h[4..8].try_into().unwrap())
    }
}

#[test]
fn bad_nbd_clients_end_their_own_connection_only() {
    if !have_libnbd() {
        return;
    }
    let mut rng = Rng::seeded("bad_nbd_clients");
    let sb = Sandbox::new();
    sb.init(&[]);
    let raw = sb.path("disk.raw");
    random_disk(&mut rng, &raw, 24 * MIB);
    let snap = sb.replicate(&raw, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let want = std::fs::read(&raw).unwrap();
    let mut server = Server::start(&sb, &snap, &[]);

    // Garbage instead of a handshake: the server hangs up.
    let mut s = UnixStream::connect(&server.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&[0xff; 64]).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "nothing answers garbage");

    // A huge option length: hung up on, not allocated.
    let mut s = UnixStream::connect(&server.socket).unwrap();
    s.read_exact(&mut hello).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut m = b"IHAVEOPT".to_vec();
    m.extend_from_slice(&7u32.to_be_bytes());
    m.extend_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&m).unwrap();
    let _ = s.read_to_end(&mut rest);

    // Requests out of range or too large get errors; the connection goes on.
    let mut c = RawClient::connect(&server.socket, false);
    c.request(0, want.len() as u64 - 512, 4096);
    assert_eq!(c.simple_error(), 22, "EINVAL past the end");
    c.request(0, u64::MAX - 10, 4096);
    assert_eq!(c.simple_error(), 22, "EINVAL on an overflowing offset");
    c.request(0, 0, 64 << 20);
    assert_eq!(c.simple_error(), 75, "EOVERFLOW for a read over 32 MiB");
    c.request(1, 0, 4);
    c.s.write_all(&[1, 2, 3, 4]).unwrap();
    assert_eq!(c.simple_error(), 1, "EPERM for a write");
    c.request(0, 0, 4096);
    assert_eq!(c.simple_error(), 0);
    let mut data = vec![0u8; 4096];
    c.s.read_exact(&mut data).unwrap();
    assert_eq!(data, want[..4096]);
    // Structured replies: the same errors as error chunks.
    let mut c = RawClient::connect(&server.socket, true);
    c.request(0, want.len() as u64, 1);
    let mut h = [0u8; 20];
    c.s.read_exact(&mut h).unwrap();
    assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x668e_33ef);
    assert_eq!(
        u16::from_be_bytes(h[6..8].try_into().unwrap()),
        (1 << 15) + 1
    );

    // A client that asks for 32 MiB and vanishes mid-reply.
    for _ in 0..3 {
        let mut c = RawClient::connect(&server.socket, false);
        c.request(0, 0, 24 << 20);
        let mut some = [0u8; 1000];
        c.s.read_exact(&mut some).unwrap();
        drop(c);
    }
    // The server still serves everyone else.
    assert!(server.alive());
    copies_equal(&server, &sb, &want, "after-bad-clients");
}

#[test]
fn nbd_serving_stays_within_its_cache() {
    if !have_libnbd() {
        return;
    }
    let sb = Sandbox::new();
    sb.init(&[]);
    let raw = sb.path("disk.raw");
    let mut rng = Rng::seeded("nbd_cache");
    // A 2 GiB disk, 4 MiB of data in every 16 MiB: 512 MiB go through a 16 MiB cache.
    let size = 2048 * MIB;
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(size).unwrap();
    for i in 0..size / (16 * MIB) {
        std::os::unix::fs::FileExt::write_all_at(&f, &rng.bytes(4 * MIB as usize), i * 16 * MIB)
            .unwrap();
    }
    drop(f);
    let snap = sb.replicate(&raw, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let server = Server::start(&sb, &snap, &["--cache", "16M"]);
    let before = server.peak_rss();
    let out = sb.path("copy.raw");
    let start = Instant::now();
    run(Command::new("nbdcopy").arg(&server.uri).arg(&out));
    eprintln!("nbdcopy of 2 GiB: {:?}", start.elapsed());
    let peak = server.peak_rss();
    assert_eq!(std::fs::metadata(&out).unwrap().len(), size);
    let (copy, orig) = (
        std::fs::File::open(&out).unwrap(),
        std::fs::File::open(&raw).unwrap(),
    );
    let (mut a, mut b) = (vec![0u8; 64 << 20], vec![0u8; 64 << 20]);
    for at in (0..size).step_by(a.len()) {
        std::os::unix::fs::FileExt::read_exact_at(&copy, &mut a, at).unwrap();
        std::os::unix::fs::FileExt::read_exact_at(&orig, &mut b, at).unwrap();
        assert!(a == b, "the copy differs in the 64 MiB at {at}");
    }
    // The cache (16 MiB), chunks in flight and each connection's replies: far below the
    // disk, whose every chunk went through.
    assert!(
        peak < before + 96 * MIB,
        "peak RSS {} MiB (before the copy {} MiB)",
        peak >> 20,
        before >> 20
    );
}

#[test]
fn serving_the_network_needs_tls_or_insecure() {
    let sb = Sandbox::new();
    sb.init(&[]);
    let raw = sb.path("disk.raw");
    std::fs::write(&raw, vec![1u8; MIB as usize]).unwrap();
    let snap = sb.replicate(&raw, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    sb.fails(
        &["serve", &snap, "--store", &sb.store(), "--nbd", "0.0.0.0:0"],
        1,
        &["not a loopback address", "TLS"],
    );
}

#[test]
fn a_tls_server_serves_tls_clients_only() {
    if !have_libnbd() {
        return;
    }
    let sb = Sandbox::new();
    sb.init(&[]);
    let raw = sb.path("disk.raw");
    let mut rng = Rng::seeded("nbd_tls");
    random_disk(&mut rng, &raw, 8 * MIB);
    let snap = sb.replicate(&raw, &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    // A self-signed certificate for 127.0.0.1, which libnbd trusts as its CA.
    let pki = sb.path("pki");
    std::fs::create_dir_all(&pki).unwrap();
    run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .arg("-keyout")
        .arg(pki.join("server-key.pem"))
        .arg("-out")
        .arg(pki.join("server-cert.pem")));
    std::fs::copy(pki.join("server-cert.pem"), pki.join("ca-cert.pem")).unwrap();
    let mut child = Command::new(bin())
        .args([
            "serve",
            &snap,
            "--store",
            &sb.store(),
            "--nbd",
            "127.0.0.1:0",
        ])
        .arg("--tls-cert")
        .arg(pki.join("server-cert.pem"))
        .arg("--tls-key")
        .arg(pki.join("server-key.pem"))
        .env("BLOCKFERRY_PASSPHRASE", PASSPHRASE)
        .env("BLOCKFERRY_STATE_DIR", sb.path("state"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut uri = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut uri)
        .unwrap();
    let uri = uri.trim().to_owned();
    assert!(uri.starts_with("nbds://127.0.0.1:"), "{uri}");
    let tls = format!("{uri}?tls-certificates={}", pki.display());
    let size = run(Command::new("nbdinfo").args(["--size", &tls]));
    assert_eq!(size.trim(), (8 * MIB).to_string());
    let out = sb.path("copy.raw");
    run(Command::new("nbdcopy").arg(&tls).arg(&out));
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&raw).unwrap());
    // Without TLS: refused.
    let plain = uri.replacen("nbds://", "nbd://", 1);
    let refused = Command::new("nbdinfo")
        .args(["--size", &plain])
        .output()
        .unwrap();
    assert!(!refused.status.success(), "a client without TLS was served");
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(child.id().cast_signed(), libc::SIGTERM) };
    let _ = child.wait();
}
