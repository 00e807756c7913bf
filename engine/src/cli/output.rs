//! Human output: byte counts, times, and the progress bar.

use std::sync::Mutex;
use std::time::{Duration, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressStyle};

use blockferry::{Event, Observer};

/// Writes one line to stdout. A closed pipe (`blockferry snapshots | head -1`) is an error
/// that `main` ends the program on quietly, instead of the panic of `println!`.
pub(crate) fn write_line(args: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .map_err(anyhow::Error::new)
}

/// Whether an error is a write to a closed pipe (the reader of our output went away).
pub(crate) fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// `1.5 GiB`-style sizes.
// Display rounding: f64's 52-bit mantissa is plenty for one decimal.
#[allow(clippy::cast_precision_loss)]
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// An RFC 3339 UTC time, to the second.
pub(crate) fn rfc3339(unix_ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(unix_ms)).to_string()
}

/// A progress bar on stderr, fed by engine events; invisible when disabled.
pub(crate) struct Bar {
    progress: Option<Mutex<ProgressBar>>,
    label: &'static str,
    /// The phase shown (its counters say different things in each).
    shown: Mutex<&'static str>,
}

impl Bar {
    pub(crate) fn new(enabled: bool, label: &'static str) -> Bar {
        Bar {
            progress: enabled.then(|| Mutex::new(ProgressBar::hidden())),
            label,
            shown: Mutex::new(""),
        }
    }

    pub(crate) fn done(&self) {
        if let Some(bar) = &self.progress
            && let Ok(bar) = bar.lock()
        {
            bar.finish_and_clear();
        }
    }
}

impl Observer for Bar {
    fn event(&self, event: &Event) {
        let Some(bar) = &self.progress else {
            match event {
                Event::Warning(w) => eprintln!("warning: {w}"),
                Event::Note(n) => eprintln!("{n}"),
                _ => {}
            }
            return;
        };
        let Ok(mut bar) = bar.lock() else {
            return;
        };
        match event {
            Event::Started { phase, bytes_total } => {
                if let Ok(mut p) = self.shown.lock() {
                    *p = phase.name();
                }
                bar.finish_and_clear();
                let b = ProgressBar::new(*bytes_total);
                b.set_style(
                    ProgressStyle::with_template(
                        "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                b.set_prefix(if phase.name() == "committing" {
                    phase.name()
                } else {
                    self.label
                });
                *bar = b;
            }
            Event::Progress(p) | Event::Finished(p) => {
                bar.set_position(p.bytes_done);
                let in_flight = if p.parts_in_flight > 0 {
                    format!(" ({} parts in flight)", p.parts_in_flight)
                } else {
                    String::new()
                };
                let engine = if p.io_engine.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", p.io_engine)
                };
                let phase = self.shown.lock().map_or("", |p| *p);
                bar.set_message(match phase {
                    "restoring" => format!(
                        "written {} zero {}",
                        human_bytes(p.bytes_written),
                        human_bytes(p.bytes_zero)
                    ),
                    "verifying" if p.bytes_read > 0 => {
                        format!("image read {}", human_bytes(p.bytes_read))
                    }
                    "replicating" => format!(
                        "read {}{engine} dedup {} sent {}{in_flight}",
                        human_bytes(p.bytes_read),
                        human_bytes(p.bytes_deduplicated),
                        human_bytes(p.bytes_written),
                    ),
                    _ => String::new(),
                });
            }
            Event::Warning(w) => bar.suspend(|| eprintln!("warning: {w}")),
            Event::Note(n) => bar.suspend(|| eprintln!("{n}")),
        }
    }
}
