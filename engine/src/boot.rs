//! Boot test: a snapshot booted in qemu before anyone trusts it. The snapshot is served over
//! NBD on a private unix socket, a throwaway qcow2 overlay takes the guest's writes (the
//! store is never written), and `qemu-system-x86_64` boots it (KVM when `/dev/kvm` opens,
//! else TCG; UEFI with OVMF when the disk has an EFI system partition) with the serial
//! console in a log and the screen saved as a PNG (QMP `screendump`). The test passes when
//! the expected text shows on the console.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, ErrorKind, Result};
use crate::job::{CancelToken, Observer};
use crate::nbd::{NbdListen, NbdOptions, serve_nbd};
use crate::store::{Snapshot, Store};

/// qemu without a window, monitor, network or reboot (the guest's serial console and
/// screen are captured otherwise).
const HEADLESS: [&str; 10] = [
    "-nographic",
    "-no-reboot",
    "-nic",
    "none",
    "-monitor",
    "none",
    "-display",
    "none",
    "-vga",
    "std",
];

/// What a console shows once a system is up, unless told otherwise: a login prompt, or the
/// kernel starting init.
pub const DEFAULT_BOOT_EXPECT: &str = r"login:|Run /init as init process|Reached target|Welcome to";

/// Firmware of a boot test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// Legacy BIOS (`SeaBIOS`).
    Bios,
    /// UEFI (Debian's OVMF).
    Uefi,
    /// UEFI when the disk has a GPT with an EFI system partition (or an MBR EFI partition),
    /// else BIOS.
    Auto,
}

impl Firmware {
    /// `bios`, `uefi` or `auto`.
    pub fn from_name(name: &str) -> Result<Firmware> {
        match name {
            "bios" => Ok(Firmware::Bios),
            "uefi" => Ok(Firmware::Uefi),
            "auto" => Ok(Firmware::Auto),
            _ => Err(
                Error::config(format!("firmware {name:?}: bios, uefi or auto"))
                    .with_setting("firmware"),
            ),
        }
    }
}

/// Options of [`boot_test`].
#[derive(Debug, Clone)]
pub struct BootTestOptions {
    /// A regular expression the console must show ([`DEFAULT_BOOT_EXPECT`] when `None`).
    pub expect: Option<String>,
    /// How long the guest has to show it.
    pub timeout: Duration,
    /// The firmware.
    pub firmware: Firmware,
    /// Where the console log and the screenshot go (default: a new folder in the temporary
    /// folder); kept after the test.
    pub output_dir: Option<PathBuf>,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// `kvm`, `tcg`, or `auto`: KVM when `/dev/kvm` opens and a probe guest runs under it.
    pub accel: String,
    /// Cancels the test (the guest is stopped).
    pub cancel: CancelToken,
}

impl Default for BootTestOptions {
    fn default() -> Self {
        BootTestOptions {
            expect: None,
            timeout: Duration::from_secs(180),
            firmware: Firmware::Auto,
            output_dir: None,
            memory_mib: 1024,
            accel: "auto".to_owned(),
            cancel: CancelToken::new(),
        }
    }
}

/// What a boot test saw.
#[derive(Debug, Clone, Serialize)]
pub struct BootReport {
    /// Whether the expected text showed on the console in time.
    pub passed: bool,
    /// Why it passed or failed.
    pub reason: String,
    /// The snapshot booted.
    pub snapshot: String,
    /// Its disk.
    pub disk: String,
    /// The firmware used (`bios` or `uefi`).
    pub firmware: Firmware,
    /// `kvm` or `tcg`.
    pub accelerator: String,
    /// The text that matched, if any.
    pub matched: Option<String>,
    /// The serial console's log.
    pub console_log: PathBuf,
    /// The last screenshot taken, if any (PNG).
    pub screenshot: Option<PathBuf>,
    /// The guest's exit status, if it stopped by itself (powered off).
    pub qemu_exit: Option<i32>,
    /// Wall time in seconds.
    pub seconds: f64,
}

/// Boots snapshot `spec` of `store` in qemu; the report says whether `opts.expect` showed.
/// A failure of the test is a report with `passed: false`; an error is a setup that could not
/// run (no qemu, no OVMF, a store that cannot be read).
pub fn boot_test(
    store: &Arc<Store>,
    spec: &str,
    opts: &BootTestOptions,
    observer: &dyn Observer,
) -> Result<BootReport> {
    let start = Instant::now();
    let expect = regex::Regex::new(opts.expect.as_deref().unwrap_or(DEFAULT_BOOT_EXPECT))
        .map_err(|e| Error::config(format!("the expected text: {e}")).with_setting("expect"))?;
    let qemu = find_tool("qemu-system-x86_64", "qemu-system-x86")?;
    let qemu_img = find_tool("qemu-img", "qemu-utils")?;
    let snapshot = store.snapshot(spec)?;
    let dir = match &opts.output_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!(
            "blockferry-boot-{}-{}",
            snapshot.id,
            crate::store::now_unix_ms()
        )),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating the output folder", &dir, e))?;
    let firmware = match opts.firmware {
        Firmware::Auto => detect_firmware(store, &snapshot)?,
        f => f,
    };
    let ovmf = if firmware == Firmware::Uefi {
        Some(ovmf(&dir)?)
    } else {
        None
    };
    // Private: a folder of our own for the sockets and the overlay.
    let work = dir.join("work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| Error::io("creating the work folder", &work, e))?;
    let server = serve_nbd(
        store.clone(),
        &snapshot.id,
        &NbdOptions {
            listen: NbdListen::Unix(work.join("nbd.sock")),
            cache_bytes: 128 << 20,
            ..NbdOptions::default()
        },
        observer,
    )?;
    let overlay = work.join("overlay.qcow2");
    let out = Command::new(&qemu_img)
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(server.uri())
        .arg(&overlay)
        .output()
        .map_err(|e| Error::io("running qemu-img", &qemu_img, e))?;
    if !out.status.success() {
        return Err(Error::new(
            ErrorKind::Io,
            format!(
                "qemu-img could not make the overlay over the served snapshot: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    let console = dir.join("console.log");
    let _ = std::fs::remove_file(&console);
    let qmp_path = work.join("qmp.sock");
    let qemu_log = dir.join("qemu.log");
    let accelerator = match opts.accel.as_str() {
        "kvm" => "kvm",
        "auto" if kvm_works(&qemu, &work) => "kvm",
        "tcg" | "auto" => "tcg",
        other => {
            return Err(
                Error::config(format!("accelerator {other:?}: kvm, tcg or auto"))
                    .with_setting("accel"),
            );
        }
    };
    let mut cmd = Command::new(&qemu);
    cmd.args(HEADLESS)
        .args(["-accel", accelerator])
        .args(["-m", &opts.memory_mib.to_string()])
        .arg("-drive")
        .arg(format!("file={},format=qcow2", overlay.display()))
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            std::fs::File::create(&qemu_log)
                .map_err(|e| Error::io("creating qemu's log", &qemu_log, e))?,
        );
    if let Some((code, vars)) = &ovmf {
        cmd.arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,readonly=on,file={}",
                code.display()
            ))
            .arg("-drive")
            .arg(format!("if=pflash,format=raw,file={}", vars.display()));
    }
    let child = cmd
        .spawn()
        .map_err(|e| Error::io("starting qemu", &qemu, e))?;
    tracing::info!(
        snapshot = snapshot.id,
        ?firmware,
        accelerator,
        console = %console.display(),
        "booting"
    );
    let mut guest = Guest {
        child,
        qmp: None,
        qmp_path,
        screenshot: dir.join("screen.png"),
        shot: None,
    };
    let outcome = guest.watch(&console, &expect, opts, start);
    let qemu_exit = guest.stop();
    drop(server);
    let _ = std::fs::remove_dir_all(&work);
    let (passed, reason, matched) = outcome?;
    let stderr: String = std::fs::read_to_string(&qemu_log)
        .unwrap_or_default()
        .trim()
        .chars()
        .take(2000)
        .collect();
    let reason = if !passed && !stderr.is_empty() {
        format!("{reason}; qemu said: {stderr}")
    } else {
        reason
    };
    Ok(BootReport {
        passed,
        reason,
        snapshot: snapshot.id.clone(),
        disk: snapshot.disk.name.clone(),
        firmware,
        accelerator: accelerator.to_owned(),
        matched,
        console_log: console,
        screenshot: guest.shot,
        qemu_exit,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The guest: qemu, its QMP socket, the screenshots.
struct Guest {
    child: Child,
    qmp: Option<Qmp>,
    qmp_path: PathBuf,
    screenshot: PathBuf,
    shot: Option<PathBuf>,
}

type Outcome = (bool, String, Option<String>);

impl Guest {
    /// Watches the console until the expected text shows, qemu stops, the time is up or the
    /// test is cancelled; screenshots every few seconds and at the end.
    fn watch(
        &mut self,
        console: &Path,
        expect: &regex::Regex,
        opts: &BootTestOptions,
        start: Instant,
    ) -> Result<Outcome> {
        let mut last_shot = Instant::now();
        loop {
            let text = std::fs::read(console).unwrap_or_default();
            let text = String::from_utf8_lossy(&text);
            if let Some(m) = expect.find(&text) {
                self.screendump();
                return Ok((
                    true,
                    format!("the console showed {:?}", m.as_str()),
                    Some(m.as_str().to_owned()),
                ));
            }
            if let Some(status) = self
                .child
                .try_wait()
                .map_err(|e| Error::new(ErrorKind::Io, format!("waiting for qemu: {e}")))?
            {
                return Ok((
                    false,
                    format!(
                        "the guest stopped ({status}) before the console showed {:?}",
                        expect.as_str()
                    ),
                    None,
                ));
            }
            if opts.cancel.is_cancelled() {
                return Err(Error::new(ErrorKind::Cancelled, "boot test cancelled"));
            }
            if start.elapsed() > opts.timeout {
                self.screendump();
                return Ok((
                    false,
                    format!(
                        "the console did not show {:?} within {}s",
                        expect.as_str(),
                        opts.timeout.as_secs()
                    ),
                    None,
                ));
            }
            if last_shot.elapsed() > Duration::from_secs(2) {
                self.screendump();
                last_shot = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Saves the screen as a PNG (best effort: a guest that is gone has no screen).
    fn screendump(&mut self) {
        if self.qmp.is_none() {
            self.qmp = Qmp::connect(&self.qmp_path).ok();
        }
        let Some(qmp) = self.qmp.as_mut() else {
            return;
        };
        let file = self.screenshot.display().to_string();
        let ok = qmp
            .execute(&serde_json::json!({
                "execute": "screendump",
                "arguments": { "filename": file, "format": "png" },
            }))
            .unwrap_or(false);
        if ok {
            self.shot = Some(self.screenshot.clone());
        } else {
            self.qmp = None;
        }
    }

    /// Stops qemu (asking first); its exit status if it had stopped by itself.
    fn stop(&mut self) -> Option<i32> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return status.code();
        }
        if let Some(qmp) = self.qmp.as_mut() {
            let _ = qmp.execute(&serde_json::json!({ "execute": "quit" }));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

/// A QMP connection.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> std::io::Result<Qmp> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut q = Qmp {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        };
        let mut greeting = String::new();
        q.reader.read_line(&mut greeting)?;
        if !q.execute(&serde_json::json!({ "execute": "qmp_capabilities" }))? {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        Ok(q)
    }

    /// Sends a command; whether it returned (not an error). Events on the way are skipped.
    fn execute(&mut self, cmd: &serde_json::Value) -> std::io::Result<bool> {
        self.writer.write_all(format!("{cmd}\r\n").as_bytes())?;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if v.get("return").is_some() {
                return Ok(true);
            }
            if v.get("error").is_some() {
                tracing::debug!("qmp: {line}");
                return Ok(false);
            }
        }
    }
}

/// The program `name` on the PATH, or an error naming the Debian package.
fn find_tool(name: &str, package: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::config(format!(
                "{name} is not installed: a boot test needs it (Debian: apt-get install \
                 {package})"
            ))
        })
}

/// Whether KVM runs a guest here: `/dev/kvm` opens, and a probe (a boot sector that
/// leaves through qemu's debug-exit port) ends as it should within seconds. Nested or
/// restricted hosts may offer a `/dev/kvm` that does not run guests.
fn kvm_works(qemu: &Path, work: &Path) -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return false;
    }
    // mov al, 0x31; out 0xf4, al; cli; hlt: qemu exits with (0x31 << 1) | 1.
    let mut sector = vec![0u8; 512];
    sector[..6].copy_from_slice(&[0xb0, 0x31, 0xe6, 0xf4, 0xfa, 0xf4]);
    sector[510..].copy_from_slice(&[0x55, 0xaa]);
    let probe = work.join("kvm-probe.raw");
    if std::fs::write(&probe, &sector).is_err() {
        return false;
    }
    let child = Command::new(qemu)
        .args(HEADLESS)
        .args(["-serial", "none", "-accel", "kvm", "-m", "64"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .arg("-drive")
        .arg(format!("file={},format=raw", probe.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return false;
    };
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(status)) = child.try_wait() {
            return status.code() == Some(0x63);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// OVMF's code and a private copy of its variables.
fn ovmf(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    const PAIRS: [(&str, &str); 3] = [
        (
            "/usr/share/OVMF/OVMF_CODE_4M.fd",
            "/usr/share/OVMF/OVMF_VARS_4M.fd",
        ),
        (
            "/usr/share/OVMF/OVMF_CODE.fd",
            "/usr/share/OVMF/OVMF_VARS.fd",
        ),
        ("/usr/share/ovmf/OVMF.fd", ""),
    ];
    for (code, vars) in PAIRS {
        if !Path::new(code).is_file() {
            continue;
        }
        let copy = dir.join("OVMF_VARS.fd");
        if vars.is_empty() {
            return Ok((PathBuf::from(code), copy));
        }
        std::fs::copy(vars, &copy)
            .map_err(|e| Error::io("copying the UEFI variables", Path::new(vars), e))?;
        return Ok((PathBuf::from(code), copy));
    }
    Err(Error::config(
        "UEFI firmware (OVMF) is not installed: a UEFI boot test needs it (Debian: apt-get \
         install ovmf)",
    ))
}

/// UEFI when guest inspection finds an EFI system partition (a disk made for UEFI, even if
/// the partition is not formatted yet), else BIOS.
fn detect_firmware(store: &Arc<Store>, snapshot: &Snapshot) -> Result<Firmware> {
    let found = crate::guest::inspect_snapshot(store, &snapshot.id, &crate::job::Silent)?;
    Ok(if found.table.has_esp() {
        Firmware::Uefi
    } else {
        Firmware::Bios
    })
}
