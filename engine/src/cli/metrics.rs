//! `sync --metrics ADDR`: a continuous replication's Prometheus metrics, served over HTTP at
//! `/metrics` in the OpenMetrics text format (by the `prometheus-client` crate).

use std::borrow::Cow;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use blockferry::{Event, Observer, SyncCycle, SyncStatus};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The content type of the OpenMetrics text format.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Longest request head read (a scrape's is a few hundred bytes).
const MAX_HEAD: u64 = 16 << 10;

type Labels = Vec<(String, String)>;

/// The metrics of one disk's continuous replication.
pub(crate) struct SyncMetrics {
    registry: Mutex<Registry>,
    bytes_sent: Counter,
    bytes_read: Counter,
    cycles: Family<Labels, Counter>,
    snapshots: Counter,
    lag: Gauge<f64, AtomicU64>,
    last_success: Gauge<f64, AtomicU64>,
    cycle_seconds: Gauge<f64, AtomicU64>,
    /// When the newest snapshot's view of the disk was taken (ms since the epoch; 0: none).
    last_success_ms: AtomicU64,
    /// Bytes sent and read by the running cycle so far, as counted into the counters.
    cycle_sent: AtomicU64,
    cycle_read: AtomicU64,
}

impl SyncMetrics {
    pub(crate) fn new(disk: &str) -> SyncMetrics {
        let mut registry = Registry::with_prefix_and_labels(
            "blockferry",
            [(Cow::Borrowed("disk"), Cow::Owned(disk.to_owned()))].into_iter(),
        );
        let mut m = SyncMetrics {
            registry: Mutex::new(Registry::default()),
            bytes_sent: Counter::default(),
            bytes_read: Counter::default(),
            cycles: Family::default(),
            snapshots: Counter::default(),
            lag: Gauge::default(),
            last_success: Gauge::default(),
            cycle_seconds: Gauge::default(),
            last_success_ms: AtomicU64::new(0),
            cycle_sent: AtomicU64::new(0),
            cycle_read: AtomicU64::new(0),
        };
        registry.register(
            "bytes_sent",
            "Bytes uploaded to the store (chunk data, compressed and sealed)",
            m.bytes_sent.clone(),
        );
        registry.register(
            "bytes_read",
            "Bytes read from the disk image",
            m.bytes_read.clone(),
        );
        registry.register(
            "sync_cycles",
            "Cycles run, by result: ok (a snapshot), idle (nothing to do) or failed",
            m.cycles.clone(),
        );
        registry.register(
            "snapshots",
            "Snapshots written by this process",
            m.snapshots.clone(),
        );
        registry.register(
            "replication_lag_seconds",
            "Seconds since the view of the disk its newest snapshot holds was taken (the RPO)",
            m.lag.clone(),
        );
        registry.register(
            "last_success_timestamp_seconds",
            "When the view of the disk the newest snapshot holds was taken (Unix time)",
            m.last_success.clone(),
        );
        registry.register(
            "sync_cycle_seconds",
            "How long the last cycle took",
            m.cycle_seconds.clone(),
        );
        m.registry = Mutex::new(registry);
        m
    }

    /// Takes a finished cycle's outcome (`cycle` is `None` for a cycle that failed).
    pub(crate) fn cycle_done(&self, status: &SyncStatus, cycle: Option<&SyncCycle>, seconds: f64) {
        let result = match cycle {
            Some(c) if c.report.is_some() => "ok",
            Some(_) => "idle",
            None => "failed",
        };
        if let Some(r) = cycle.and_then(|c| c.report.as_ref()) {
            // The cycle's own figures; progress events may have counted part of them.
            let sent = self.cycle_sent.swap(0, Ordering::Relaxed);
            let read = self.cycle_read.swap(0, Ordering::Relaxed);
            self.bytes_sent.inc_by(r.bytes_stored.saturating_sub(sent));
            self.bytes_read.inc_by(r.bytes_read.saturating_sub(read));
            self.snapshots.inc();
        }
        self.cycle_sent.store(0, Ordering::Relaxed);
        self.cycle_read.store(0, Ordering::Relaxed);
        self.cycles
            .get_or_create(&vec![("result".to_owned(), result.to_owned())])
            .inc();
        self.cycle_seconds.set(seconds);
        if let Some(ms) = status.last_success_unix_ms {
            self.last_success_ms.store(ms, Ordering::Relaxed);
        }
    }

    /// The exposition now (the lag as of this moment).
    fn render(&self) -> anyhow::Result<String> {
        let ms = self.last_success_ms.load(Ordering::Relaxed);
        if ms > 0 {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            let at = Duration::from_millis(ms).as_secs_f64();
            self.last_success.set(at);
            self.lag.set((now - at).max(0.0));
        }
        let mut out = String::new();
        let registry = self
            .registry
            .lock()
            .map_err(|_| anyhow::anyhow!("the metrics registry is poisoned"))?;
        encode(&mut out, &registry).context("encoding the metrics")?;
        Ok(out)
    }

    /// Serves `/metrics` on `addr` from a thread of its own, for as long as the process runs.
    pub(crate) fn serve(self: &Arc<Self>, addr: &str) -> anyhow::Result<std::net::SocketAddr> {
        let listener = TcpListener::bind(addr)
            .with_context(|| format!("cannot serve metrics on {addr} (--metrics)"))?;
        let local = listener
            .local_addr()
            .context("reading the metrics address")?;
        let metrics = Arc::clone(self);
        std::thread::Builder::new()
            .name("metrics".to_owned())
            .spawn(move || {
                for conn in listener.incoming() {
                    match conn {
                        Ok(stream) => {
                            if let Err(e) = metrics.answer(stream) {
                                tracing::debug!("a metrics request failed: {e:#}");
                            }
                        }
                        Err(e) => tracing::debug!("accepting a metrics connection: {e}"),
                    }
                }
            })
            .context("starting the metrics thread")?;
        Ok(local)
    }

    /// Answers one request: `GET /metrics`, anything else 404 (405 for another method).
    fn answer(&self, mut stream: TcpStream) -> anyhow::Result<()> {
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        let mut reader = BufReader::new((&stream).take(MAX_HEAD));
        let mut line = String::new();
        reader.read_line(&mut line)?;
        // The rest of the head, up to the blank line.
        let mut header = String::new();
        while reader.read_line(&mut header)? > 0 && header.trim_end() != "" {
            header.clear();
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let path = target.split('?').next().unwrap_or("");
        let (status, ctype, body) = match (method, path) {
            ("GET", "/metrics") => ("200 OK", CONTENT_TYPE, self.render()?),
            ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
            _ => (
                "405 Method Not Allowed",
                "text/plain",
                "only GET\n".to_owned(),
            ),
        };
        write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        stream.flush()?;
        Ok(())
    }
}

/// Counts a cycle's progress into the metrics as it runs (the replicating phase's counters;
/// the commit's start from zero again).
pub(crate) struct CycleObserver<'a> {
    metrics: &'a SyncMetrics,
    replicating: std::sync::atomic::AtomicBool,
}

impl<'a> CycleObserver<'a> {
    pub(crate) fn new(metrics: &'a SyncMetrics) -> CycleObserver<'a> {
        CycleObserver {
            metrics,
            replicating: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl Observer for CycleObserver<'_> {
    fn event(&self, event: &Event) {
        match event {
            Event::Started { phase, .. } => self
                .replicating
                .store(phase.name() == "replicating", Ordering::Relaxed),
            Event::Progress(p) | Event::Finished(p) if self.replicating.load(Ordering::Relaxed) => {
                let m = self.metrics;
                let sent = m.cycle_sent.swap(p.bytes_written, Ordering::Relaxed);
                m.bytes_sent.inc_by(p.bytes_written.saturating_sub(sent));
                let read = m.cycle_read.swap(p.bytes_read, Ordering::Relaxed);
                m.bytes_read.inc_by(p.bytes_read.saturating_sub(read));
            }
            _ => {}
        }
    }
}
