//! A read-only NBD server of a snapshot: `qemu-img`, `nbdcopy`, `nbdinfo` or a hypervisor
//! read the disk without a restore first. Chunks are read from the store (local or S3) when
//! a client first reads them, kept in a cache of bounded size, and read ahead of a client
//! reading in order.
//!
//! The protocol is the NBD project's fixed newstyle negotiation (`NBD_OPT_GO`, `INFO`,
//! `LIST`, `EXPORT_NAME`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT`/`SET_META_CONTEXT` with
//! `base:allocation`, `STARTTLS`, `ABORT`) and the transmission commands a read-only disk
//! answers (`READ`, `BLOCK_STATUS`, `CACHE`, `FLUSH`, `DISC`; writes are refused with
//! `EPERM`). One thread per connection; anything a client sends that breaks the protocol
//! ends that connection only.
//!
//! By default the server listens on a unix socket or a loopback address; another address
//! needs TLS (`STARTTLS`, required of every client before anything else) or an explicit
//! `insecure`.

pub(crate) mod disk;
mod proto;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::{
    BASE_ALLOCATION, BASE_ALLOCATION_ID, CMD_BLOCK_STATUS, CMD_CACHE, CMD_DISC, CMD_FLAG_DF,
    CMD_FLAG_PAYLOAD_LEN, CMD_FLAG_REQ_ONE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE,
    CMD_WRITE_ZEROES, EINVAL, EIO, EOVERFLOW, EPERM, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES,
    FLAG_CAN_MULTI_CONN, FLAG_FIXED_NEWSTYLE, FLAG_HAS_FLAGS, FLAG_NO_ZEROES, FLAG_READ_ONLY,
    FLAG_SEND_CACHE, FLAG_SEND_DF, FLAG_SEND_FLUSH, IHAVEOPT, INFO_BLOCK_SIZE, INFO_DESCRIPTION,
    INFO_EXPORT, INFO_NAME, MAX_OPTION, MAX_REQUEST, NBDMAGIC, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO,
    OPT_INFO, OPT_LIST, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_STARTTLS,
    OPT_STRUCTURED_REPLY, REP_ACK, REP_ERR_INVALID, REP_ERR_POLICY, REP_ERR_TLS_REQD,
    REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_INFO, REP_META_CONTEXT, REP_SERVER, REPLY_FLAG_DONE,
    REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR, REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA,
    REPLY_TYPE_OFFSET_HOLE, Request, STATE_HOLE, STATE_ZERO, chunk_header, option_reply,
    simple_reply,
};

use disk::{Chunk, Disk};

use crate::error::{Error, Result};
use crate::job::{CancelToken, Observer};
use crate::store::Store;

/// Default chunk cache.
pub const DEFAULT_NBD_CACHE: u64 = 256 << 20;
/// Time a client has for each step of the negotiation.
const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Threads that read ahead.
const READAHEAD_THREADS: usize = 4;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdListen {
    /// A unix socket at this path (created; it must not exist).
    Unix(PathBuf),
    /// `HOST:PORT` (port 0: any free port).
    Tcp(String),
}

impl NbdListen {
    /// `unix:PATH` or `HOST:PORT` (`[::1]:10809` for IPv6).
    pub fn parse(s: &str) -> Result<NbdListen> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(Error::config("unix: needs a socket path").with_setting("listen"));
            }
            return Ok(NbdListen::Unix(PathBuf::from(path)));
        }
        if s.rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(
                Error::config(format!("{s:?}: listen on unix:PATH or HOST:PORT"))
                    .with_setting("listen"),
            );
        }
        Ok(NbdListen::Tcp(s.to_owned()))
    }
}

/// Options of [`serve_nbd`].
#[derive(Debug, Clone)]
pub struct NbdOptions {
    /// Where to listen.
    pub listen: NbdListen,
    /// The export's name (clients asking for the empty name get it too).
    pub export_name: String,
    /// Bytes of chunks kept in the cache.
    pub cache_bytes: u64,
    /// Chunks read ahead of a client reading in order (0: none).
    pub readahead: usize,
    /// Connections served at once; more are refused.
    pub max_connections: usize,
    /// Serve a non-loopback address without TLS.
    pub insecure: bool,
    /// A PEM certificate chain and key: clients must use TLS (`STARTTLS`).
    pub tls: Option<(PathBuf, PathBuf)>,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            listen: NbdListen::Tcp("127.0.0.1:10809".to_owned()),
            export_name: String::new(),
            cache_bytes: DEFAULT_NBD_CACHE,
            readahead: 8,
            max_connections: 16,
            insecure: false,
            tls: None,
        }
    }
}

/// What a server did so far.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct NbdStats {
    /// Connections accepted.
    pub connections: u64,
    /// Connections open now.
    pub open: u64,
    /// Read requests answered.
    pub reads: u64,
    /// Bytes answered to reads.
    pub bytes_read: u64,
    /// Chunks fetched from the store.
    pub chunks_fetched: u64,
    /// Reads of a chunk the cache held.
    pub cache_hits: u64,
    /// The most bytes the cache held at once.
    pub cache_peak: u64,
}

/// A running NBD server; dropping it (or [`NbdServer::stop`]) stops it and closes every
/// connection.
pub struct NbdServer {
    address: String,
    shared: Arc<Shared>,
    accept: Option<std::thread::JoinHandle<()>>,
    readahead: Vec<std::thread::JoinHandle<()>>,
    unix_path: Option<PathBuf>,
    _lock: Option<crate::store::lock::StoreLock>,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

struct Shared {
    disk: Disk,
    name: String,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: AtomicBool,
    readahead: usize,
    prefetch: crossbeam_channel::Sender<u64>,
    max_connections: usize,
    open: AtomicUsize,
    connections: AtomicU64,
    reads: AtomicU64,
    bytes_read: AtomicU64,
    /// The streams of open connections, to shut them down on stop.
    streams: Mutex<Vec<(u64, Link)>>,
}

/// Serves snapshot `spec` (id, unique prefix, `DISK@latest`, `latest`) of `store` over NBD,
/// read-only, until the returned server is stopped. Holds a reader lock on the store
/// meanwhile (a garbage collection waits).
pub fn serve_nbd(
    store: Arc<Store>,
    spec: &str,
    opts: &NbdOptions,
    observer: &dyn Observer,
) -> Result<NbdServer> {
    let lock = crate::store::lock::reader_lock(&store, "serve", &CancelToken::new(), observer)?;
    let tls = opts
        .tls
        .as_ref()
        .map(|(c, k)| tls_config(c, k))
        .transpose()?;
    let disk = Disk::open(store, spec, opts.cache_bytes)?;
    let name = if opts.export_name.is_empty() {
        disk.snapshot.id.clone()
    } else {
        opts.export_name.clone()
    };
    let (listener, address, unix_path) = bind(&opts.listen, tls.is_some() || opts.insecure)?;
    let (tx, rx) = crossbeam_channel::bounded::<u64>(opts.readahead.max(1) * 2);
    let shared = Arc::new(Shared {
        disk,
        name,
        tls,
        stop: AtomicBool::new(false),
        readahead: opts.readahead,
        prefetch: tx,
        max_connections: opts.max_connections.max(1),
        open: AtomicUsize::new(0),
        connections: AtomicU64::new(0),
        reads: AtomicU64::new(0),
        bytes_read: AtomicU64::new(0),
        streams: Mutex::new(Vec::new()),
    });
    let readahead = (0..READAHEAD_THREADS)
        .map(|_| {
            let (shared, rx) = (shared.clone(), rx.clone());
            std::thread::spawn(move || {
                while !shared.stop.load(Ordering::SeqCst) {
                    match rx.recv_timeout(Duration::from_millis(100)) {
                        Ok(c) if !shared.disk.has(c) => {
                            let _ = shared.disk.chunk(c);
                        }
                        Ok(_) | Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                    }
                }
            })
        })
        .collect();
    let accept = {
        let shared = shared.clone();
        std::thread::spawn(move || accept_loop(&listener, &shared))
    };
    Ok(NbdServer {
        address,
        shared,
        accept: Some(accept),
        readahead,
        unix_path,
        _lock: lock,
    })
}

impl NbdServer {
    /// Where it listens: `unix:PATH` or `HOST:PORT` (the port bound, when 0 was asked).
    pub fn address(&self) -> &str {
        &self.address
    }

    /// An NBD URI of the export (`nbd+unix:///NAME?socket=PATH` or `nbd://HOST:PORT/NAME`).
    pub fn uri(&self) -> String {
        let name = &self.shared.name;
        let scheme = if self.shared.tls.is_some() {
            "nbds"
        } else {
            "nbd"
        };
        match self.address.strip_prefix("unix:") {
            Some(path) => format!("{scheme}+unix:///{name}?socket={path}"),
            None => format!("{scheme}://{}/{name}", self.address),
        }
    }

    /// The export's name.
    pub fn export_name(&self) -> &str {
        &self.shared.name
    }

    /// What it did so far.
    pub fn stats(&self) -> NbdStats {
        let s = &self.shared;
        let c = &s.disk.counters;
        NbdStats {
            connections: s.connections.load(Ordering::Relaxed),
            open: s.open.load(Ordering::Relaxed) as u64,
            reads: s.reads.load(Ordering::Relaxed),
            bytes_read: s.bytes_read.load(Ordering::Relaxed),
            chunks_fetched: c.fetched.load(Ordering::Relaxed),
            cache_hits: c.hits.load(Ordering::Relaxed),
            cache_peak: c.cached_bytes_peak.load(Ordering::Relaxed),
        }
    }

    /// Stops listening and closes every connection.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for (_, link) in self.shared.streams.lock().expect("streams").drain(..) {
            link.shutdown();
        }
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        for t in self.readahead.drain(..) {
            let _ = t.join();
        }
        if let Some(path) = self.unix_path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Binds the address; a TCP address must be loopback unless the server is `secured` (TLS,
/// or explicitly insecure).
fn bind(listen: &NbdListen, secured: bool) -> Result<(Listener, String, Option<PathBuf>)> {
    match listen {
        NbdListen::Unix(path) => {
            if path.exists() {
                return Err(Error::config(format!(
                    "{} exists: give a path where the socket can be made",
                    path.display()
                ))
                .with_setting("listen"));
            }
            let l = UnixListener::bind(path)
                .map_err(|e| Error::io("listening on the unix socket", path, e))?;
            l.set_nonblocking(true)
                .map_err(|e| Error::io("configuring the socket", path, e))?;
            Ok((
                Listener::Unix(l),
                format!("unix:{}", path.display()),
                Some(path.clone()),
            ))
        }
        NbdListen::Tcp(addr) => {
            let addrs: Vec<_> = addr
                .to_socket_addrs()
                .map_err(|e| {
                    Error::config(format!("{addr}: cannot resolve it ({e})")).with_setting("listen")
                })?
                .collect();
            if !secured && addrs.iter().any(|a| !a.ip().is_loopback()) {
                return Err(Error::config(format!(
                    "{addr} is not a loopback address: serving a disk to the network needs TLS \
                     (a certificate and key) or an explicit insecure"
                ))
                .with_setting("listen"));
            }
            let l = TcpListener::bind(&addrs[..])
                .map_err(|e| Error::io("listening", std::path::Path::new(addr), e))?;
            l.set_nonblocking(true)
                .map_err(|e| Error::io("configuring the socket", std::path::Path::new(addr), e))?;
            let bound = l
                .local_addr()
                .map_err(|e| Error::io("listening", std::path::Path::new(addr), e))?;
            Ok((Listener::Tcp(l), bound.to_string(), None))
        }
    }
}

fn tls_config(cert: &std::path::Path, key: &std::path::Path) -> Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect)
        .map_err(|e| {
            Error::config(format!("reading the TLS certificate: {e}"))
                .with_path(cert)
                .with_setting("tls")
        })?;
    if certs.is_empty() {
        return Err(
            Error::config("the TLS certificate file holds no certificate")
                .with_path(cert)
                .with_setting("tls"),
        );
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        Error::config(format!("reading the TLS key: {e}"))
            .with_path(key)
            .with_setting("tls")
    })?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::internal(format!("TLS versions: {e}")))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| {
        Error::config(format!(
            "the TLS certificate and key do not go together: {e}"
        ))
        .with_setting("tls")
    })?;
    Ok(Arc::new(config))
}

fn accept_loop(listener: &Listener, shared: &Arc<Shared>) {
    let mut next_id = 0u64;
    while !shared.stop.load(Ordering::SeqCst) {
        let accepted = match listener {
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Link::Tcp(s)
            }),
            Listener::Unix(l) => l.accept().map(|(s, _)| Link::Unix(s)),
        };
        let link = match accepted {
            Ok(link) => link,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => {
                tracing::warn!("accepting an NBD connection: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if link.set_blocking().is_err() {
            continue;
        }
        if shared.open.load(Ordering::SeqCst) >= shared.max_connections {
            tracing::warn!("an NBD client was refused: too many connections");
            link.shutdown();
            continue;
        }
        next_id += 1;
        let id = next_id;
        shared.open.fetch_add(1, Ordering::SeqCst);
        shared.connections.fetch_add(1, Ordering::SeqCst);
        if let Some(clone) = link.try_clone() {
            shared.streams.lock().expect("streams").push((id, clone));
        }
        let shared = shared.clone();
        std::thread::spawn(move || {
            let result = Connection::new(&shared, link).serve();
            if let Err(e) = result {
                tracing::debug!("NBD connection {id} ended: {e}");
            }
            shared
                .streams
                .lock()
                .expect("streams")
                .retain(|(i, _)| *i != id);
            shared.open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// A client's connection: plain, or TLS once `STARTTLS` was negotiated.
enum Link {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>),
    /// Between states (only while upgrading to TLS).
    Gone,
}

impl Link {
    fn set_blocking(&self) -> std::io::Result<()> {
        match self {
            Link::Tcp(s) => s.set_nonblocking(false),
            Link::Unix(s) => s.set_nonblocking(false),
            Link::Tls(s) => s.sock.set_nonblocking(false),
            Link::Gone => Ok(()),
        }
    }

    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Link::Tcp(s) => s.set_read_timeout(t),
            Link::Unix(s) => s.set_read_timeout(t),
            Link::Tls(s) => s.sock.set_read_timeout(t),
            Link::Gone => Ok(()),
        }
    }

    fn try_clone(&self) -> Option<Link> {
        match self {
            Link::Tcp(s) => s.try_clone().ok().map(Link::Tcp),
            Link::Unix(s) => s.try_clone().ok().map(Link::Unix),
            Link::Tls(_) | Link::Gone => None,
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Link::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Link::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Link::Tls(s) => s.sock.shutdown(std::net::Shutdown::Both),
            Link::Gone => Ok(()),
        };
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Link::Tcp(s) => s.read(buf),
            Link::Unix(s) => s.read(buf),
            Link::Tls(s) => s.read(buf),
            Link::Gone => Ok(0),
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Link::Tcp(s) => s.write(buf),
            Link::Unix(s) => s.write(buf),
            Link::Tls(s) => s.write(buf),
            Link::Gone => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Link::Tcp(s) => s.flush(),
            Link::Unix(s) => s.flush(),
            Link::Tls(s) => s.flush(),
            Link::Gone => Ok(()),
        }
    }
}

/// Why a connection ends: the client left, or broke the protocol (logged, not answered).
type Flow<T> = std::result::Result<T, String>;

fn io<T>(r: std::io::Result<T>) -> Flow<T> {
    r.map_err(|e| e.to_string())
}

struct Connection<'a> {
    shared: &'a Shared,
    link: Link,
    structured: bool,
    allocation: bool,
    tls_done: bool,
    /// The furthest end of the client's reads in order (read-ahead follows it).
    last_end: u64,
}

impl<'a> Connection<'a> {
    fn new(shared: &'a Shared, link: Link) -> Connection<'a> {
        Connection {
            shared,
            link,
            structured: false,
            allocation: false,
            tls_done: false,
            last_end: 0,
        }
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Flow<()> {
        io(self.link.read_exact(buf))
    }

    fn u32(&mut self) -> Flow<u32> {
        let mut b = [0u8; 4];
        self.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn u64(&mut self) -> Flow<u64> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    fn send(&mut self, bytes: &[u8]) -> Flow<()> {
        io(self.link.write_all(bytes).and_then(|()| self.link.flush()))
    }

    fn serve(mut self) -> Flow<()> {
        io(self.link.set_timeout(Some(NEGOTIATION_TIMEOUT)))?;
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        self.send(&hello)?;
        let flags = self.u32()?;
        if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(format!("unknown client flags {flags:#x}"));
        }
        let no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
        if !self.negotiate(no_zeroes)? {
            return Ok(());
        }
        io(self.link.set_timeout(None))?;
        self.transmit()
    }

    /// Option haggling; true when the client moved on to transmission.
    fn negotiate(&mut self, no_zeroes: bool) -> Flow<bool> {
        loop {
            if self.u64()? != IHAVEOPT {
                return Err("an option without its magic".to_owned());
            }
            let option = self.u32()?;
            let len = self.u32()?;
            if len > MAX_OPTION {
                return Err(format!("option {option} of {len} bytes"));
            }
            let mut data = vec![0u8; len as usize];
            self.read_exact(&mut data)?;
            if self.shared.tls.is_some()
                && !self.tls_done
                && !matches!(option, OPT_STARTTLS | OPT_ABORT)
            {
                if option == OPT_EXPORT_NAME {
                    return Err("NBD_OPT_EXPORT_NAME before TLS".to_owned());
                }
                self.reply(
                    option,
                    REP_ERR_TLS_REQD,
                    b"this server needs TLS (NBD_OPT_STARTTLS)",
                )?;
                continue;
            }
            match option {
                OPT_EXPORT_NAME => {
                    if !self.known(&data) {
                        return Err("an unknown export".to_owned());
                    }
                    let mut m = Vec::with_capacity(134);
                    m.extend_from_slice(&self.shared.disk.size.to_be_bytes());
                    m.extend_from_slice(&transmission_flags().to_be_bytes());
                    if !no_zeroes {
                        m.extend_from_slice(&[0u8; 124]);
                    }
                    self.send(&m)?;
                    return Ok(true);
                }
                OPT_ABORT => {
                    let _ = self.reply(option, REP_ACK, &[]);
                    return Ok(false);
                }
                OPT_LIST => {
                    if data.is_empty() {
                        let name = self.shared.name.clone();
                        let mut m = Vec::with_capacity(4 + name.len());
                        m.extend_from_slice(&u32_of(name.len()).to_be_bytes());
                        m.extend_from_slice(name.as_bytes());
                        self.reply(option, REP_SERVER, &m)?;
                        self.reply(option, REP_ACK, &[])?;
                    } else {
                        self.reply(option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                    }
                }
                OPT_STARTTLS => self.start_tls(option, &data)?,
                OPT_INFO | OPT_GO => {
                    if self.info(option, &data)? && option == OPT_GO {
                        return Ok(true);
                    }
                }
                OPT_STRUCTURED_REPLY => {
                    if data.is_empty() {
                        self.structured = true;
                        self.reply(option, REP_ACK, &[])?;
                    } else {
                        self.reply(option, REP_ERR_INVALID, b"no data expected")?;
                    }
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, &data)?,
                _ => self.reply(option, REP_ERR_UNSUP, b"not supported")?,
            }
        }
    }

    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) -> Flow<()> {
        self.send(&option_reply(option, kind, data))
    }

    /// Whether `name` is this server's export (or the default, empty, name).
    fn known(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.shared.name.as_bytes()
    }

    fn start_tls(&mut self, option: u32, data: &[u8]) -> Flow<()> {
        let Some(config) = self.shared.tls.clone() else {
            return self.reply(option, REP_ERR_POLICY, b"this server does not do TLS");
        };
        if !data.is_empty() || self.tls_done {
            return self.reply(option, REP_ERR_INVALID, b"TLS is already on");
        }
        let Link::Tcp(_) = &self.link else {
            return self.reply(option, REP_ERR_POLICY, b"TLS only over TCP");
        };
        self.reply(option, REP_ACK, &[])?;
        let Link::Tcp(sock) = std::mem::replace(&mut self.link, Link::Gone) else {
            return Err("the connection changed".to_owned());
        };
        let conn = rustls::ServerConnection::new(config).map_err(|e| e.to_string())?;
        let mut tls = rustls::StreamOwned::new(conn, sock);
        while tls.conn.is_handshaking() {
            tls.conn
                .complete_io(&mut tls.sock)
                .map_err(|e| format!("TLS handshake: {e}"))?;
        }
        self.link = Link::Tls(Box::new(tls));
        self.tls_done = true;
        Ok(())
    }

    /// `NBD_OPT_INFO` and `NBD_OPT_GO`; true when the export was described and acknowledged.
    fn info(&mut self, option: u32, data: &[u8]) -> Flow<bool> {
        let parsed = (|| {
            let name_len =
                usize::try_from(u32::from_be_bytes(data.get(0..4)?.try_into().ok()?)).ok()?;
            let name = data.get(4..4 + name_len)?;
            let at = 4 + name_len;
            let n = usize::from(u16::from_be_bytes(data.get(at..at + 2)?.try_into().ok()?));
            let requests = data.get(at + 2..)?;
            (requests.len() == 2 * n).then(|| {
                let kinds: Vec<u16> = requests
                    .chunks_exact(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect();
                (name.to_vec(), kinds)
            })
        })();
        let Some((name, kinds)) = parsed else {
            self.reply(option, REP_ERR_INVALID, b"malformed request")?;
            return Ok(false);
        };
        if !self.known(&name) {
            self.reply(option, REP_ERR_UNKNOWN, b"no such export")?;
            return Ok(false);
        }
        let mut export = Vec::with_capacity(12);
        export.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        export.extend_from_slice(&self.shared.disk.size.to_be_bytes());
        export.extend_from_slice(&transmission_flags().to_be_bytes());
        self.reply(option, REP_INFO, &export)?;
        for kind in kinds {
            let mut m = kind.to_be_bytes().to_vec();
            match kind {
                INFO_NAME => m.extend_from_slice(self.shared.name.as_bytes()),
                INFO_DESCRIPTION => m.extend_from_slice(
                    format!(
                        "blockferry snapshot {} of disk {}",
                        self.shared.disk.snapshot.id, self.shared.disk.snapshot.disk.name
                    )
                    .as_bytes(),
                ),
                INFO_BLOCK_SIZE => {
                    m.extend_from_slice(&1u32.to_be_bytes());
                    m.extend_from_slice(&4096u32.to_be_bytes());
                    m.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                }
                _ => continue,
            }
            self.reply(option, REP_INFO, &m)?;
        }
        self.reply(option, REP_ACK, &[])?;
        Ok(true)
    }

    fn meta_context(&mut self, option: u32, data: &[u8]) -> Flow<()> {
        let parsed = (|| {
            let name_len =
                usize::try_from(u32::from_be_bytes(data.get(0..4)?.try_into().ok()?)).ok()?;
            let name = data.get(4..4 + name_len)?.to_vec();
            let mut at = 4 + name_len;
            let n = u32::from_be_bytes(data.get(at..at + 4)?.try_into().ok()?);
            at += 4;
            let mut queries = Vec::new();
            for _ in 0..n {
                let len =
                    usize::try_from(u32::from_be_bytes(data.get(at..at + 4)?.try_into().ok()?))
                        .ok()?;
                queries.push(data.get(at + 4..at + 4 + len)?.to_vec());
                at += 4 + len;
            }
            (at == data.len()).then_some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            return self.reply(option, REP_ERR_INVALID, b"malformed request");
        };
        if option == OPT_SET_META_CONTEXT && !self.structured {
            return self.reply(option, REP_ERR_INVALID, b"structured replies first");
        }
        if !self.known(&name) {
            return self.reply(option, REP_ERR_UNKNOWN, b"no such export");
        }
        let matches = |q: &[u8]| q == BASE_ALLOCATION.as_bytes() || q == b"base:";
        let selected = if option == OPT_LIST_META_CONTEXT && queries.is_empty() {
            true
        } else {
            queries.iter().any(|q| matches(q))
        };
        if selected {
            let mut m = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
            m.extend_from_slice(BASE_ALLOCATION.as_bytes());
            self.reply(option, REP_META_CONTEXT, &m)?;
        }
        if option == OPT_SET_META_CONTEXT {
            self.allocation = selected;
        }
        self.reply(option, REP_ACK, &[])
    }

    fn transmit(&mut self) -> Flow<()> {
        loop {
            let mut header = [0u8; 28];
            match self.link.read_exact(&mut header) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e.to_string()),
            }
            let req = Request::parse(&header).ok_or("a request without its magic")?;
            if req.flags & CMD_FLAG_PAYLOAD_LEN != 0 && req.kind != CMD_WRITE {
                return Err("a payload this server did not negotiate".to_owned());
            }
            match req.kind {
                CMD_READ => self.read(req)?,
                CMD_WRITE => {
                    if req.length > MAX_REQUEST {
                        return Err(format!("a write of {} bytes", req.length));
                    }
                    let mut sink = vec![0u8; req.length as usize];
                    self.read_exact(&mut sink)?;
                    self.error(req, EPERM, "the export is read-only")?;
                }
                CMD_TRIM | CMD_WRITE_ZEROES => self.error(req, EPERM, "the export is read-only")?,
                CMD_FLUSH => self.send(&simple_reply(0, req.cookie))?,
                CMD_CACHE => {
                    if let Some((first, end)) = self.chunk_range(req) {
                        for c in first..end {
                            let _ = self.shared.prefetch.try_send(c);
                        }
                    }
                    self.send(&simple_reply(0, req.cookie))?;
                }
                CMD_BLOCK_STATUS => self.block_status(req)?,
                CMD_DISC => return Ok(()),
                _ => self.error(req, EINVAL, "unknown command")?,
            }
        }
    }

    /// The chunks a request covers, if it is within the disk.
    fn chunk_range(&self, req: Request) -> Option<(u64, u64)> {
        let size = self.shared.disk.size;
        let end = req.offset.checked_add(u64::from(req.length))?;
        if end > size || req.length == 0 {
            return None;
        }
        let chunk = self.shared.disk.chunk;
        Some((req.offset / chunk, end.div_ceil(chunk)))
    }

    /// An error reply: structured for the commands that use structured replies.
    fn error(&mut self, req: Request, errno: u32, message: &str) -> Flow<()> {
        if self.structured && matches!(req.kind, CMD_READ | CMD_BLOCK_STATUS) {
            let msg = &message.as_bytes()[..message.len().min(4096)];
            let mut m = Vec::with_capacity(26 + msg.len());
            m.extend_from_slice(&chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                req.cookie,
                u32_of(6 + msg.len()),
            ));
            m.extend_from_slice(&errno.to_be_bytes());
            m.extend_from_slice(&u16::try_from(msg.len()).unwrap_or(0).to_be_bytes());
            m.extend_from_slice(msg);
            self.send(&m)
        } else {
            self.send(&simple_reply(errno, req.cookie))
        }
    }

    fn read(&mut self, req: Request) -> Flow<()> {
        let disk = &self.shared.disk;
        if req.length > MAX_REQUEST {
            return self.error(
                req,
                EOVERFLOW,
                "a read larger than the 32 MiB served at once",
            );
        }
        if req.length == 0 {
            return if self.structured {
                self.send(&chunk_header(
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_NONE,
                    req.cookie,
                    0,
                ))
            } else {
                self.send(&simple_reply(0, req.cookie))
            };
        }
        let Some((first, end)) = self.chunk_range(req) else {
            return self.error(req, EINVAL, "a read past the end of the disk");
        };
        // The request's other chunks are fetched meanwhile, and, for a client reading in
        // order, the chunks after the furthest it read. A client with several requests in
        // flight (qemu-img has eight) sends them a little out of order: a read that starts
        // within the read-ahead window of that furthest end counts as in order.
        let window = self.shared.readahead as u64 * disk.chunk;
        let req_end = req.offset + u64::from(req.length);
        let sequential = req.offset <= self.last_end.saturating_add(window)
            && req_end.saturating_add(window) >= self.last_end;
        self.last_end = if sequential {
            self.last_end.max(req_end)
        } else {
            req_end
        };
        let ahead_end = if sequential {
            (self.last_end.div_ceil(disk.chunk) + self.shared.readahead as u64).max(end)
        } else {
            end
        };
        for c in first + 1..ahead_end.min(disk.chunks()) {
            if !disk.has(c) && self.shared.prefetch.try_send(c).is_err() {
                break;
            }
        }
        self.shared.reads.fetch_add(1, Ordering::Relaxed);
        self.shared
            .bytes_read
            .fetch_add(u64::from(req.length), Ordering::Relaxed);
        let pieces = |c: u64| {
            let start = (c * disk.chunk).max(req.offset);
            let stop = ((c + 1) * disk.chunk).min(req.offset + u64::from(req.length));
            (start, stop)
        };
        if self.structured && req.flags & CMD_FLAG_DF == 0 {
            // A chunk at a time: holes as holes, an error as an error chunk.
            for c in first..end {
                let (start, stop) = pieces(c);
                let len = u32_of(usize::try_from(stop - start).unwrap_or(0));
                match disk.chunk(c) {
                    Ok(Chunk::Zero) => {
                        let mut m =
                            chunk_header(0, REPLY_TYPE_OFFSET_HOLE, req.cookie, 12).to_vec();
                        m.extend_from_slice(&start.to_be_bytes());
                        m.extend_from_slice(&len.to_be_bytes());
                        io(self.link.write_all(&m))?;
                    }
                    Ok(Chunk::Data(data)) => {
                        let from = usize::try_from(start - c * disk.chunk).unwrap_or(0);
                        let to = usize::try_from(stop - c * disk.chunk).unwrap_or(0);
                        let mut m =
                            chunk_header(0, REPLY_TYPE_OFFSET_DATA, req.cookie, len + 8).to_vec();
                        m.extend_from_slice(&start.to_be_bytes());
                        io(self.link.write_all(&m))?;
                        io(self.link.write_all(&data[from..to]))?;
                    }
                    Err(e) => {
                        tracing::warn!("serving a read at {start}: {e}");
                        return self.error(req, EIO, &e.to_string());
                    }
                }
            }
            return self.send(&chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_NONE,
                req.cookie,
                0,
            ));
        }
        // One contiguous reply: every chunk is got before the header goes out.
        let mut chunks = Vec::new();
        for c in first..end {
            match disk.chunk(c) {
                Ok(chunk) => chunks.push(chunk),
                Err(e) => {
                    tracing::warn!("serving a read at {}: {e}", c * disk.chunk);
                    return self.error(req, EIO, &e.to_string());
                }
            }
        }
        let header = if self.structured {
            let mut m = chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                req.length + 8,
            )
            .to_vec();
            m.extend_from_slice(&req.offset.to_be_bytes());
            m
        } else {
            simple_reply(0, req.cookie).to_vec()
        };
        io(self.link.write_all(&header))?;
        let zeros = vec![0u8; usize::try_from(disk.chunk).unwrap_or(0)];
        for (c, chunk) in (first..end).zip(chunks) {
            let (start, stop) = pieces(c);
            let from = usize::try_from(start - c * disk.chunk).unwrap_or(0);
            let to = usize::try_from(stop - c * disk.chunk).unwrap_or(0);
            match chunk {
                Chunk::Zero => io(self.link.write_all(&zeros[from..to]))?,
                Chunk::Data(data) => io(self.link.write_all(&data[from..to]))?,
            }
        }
        io(self.link.flush())
    }

    fn block_status(&mut self, req: Request) -> Flow<()> {
        if !self.structured || !self.allocation {
            return self.error(req, EINVAL, "base:allocation was not negotiated");
        }
        let Some((first, end)) = self.chunk_range(req) else {
            return self.error(req, EINVAL, "a request past the end of the disk");
        };
        let disk = &self.shared.disk;
        let stop = req.offset + u64::from(req.length);
        // Runs of chunks alike: (length, flags).
        let mut runs: Vec<(u64, u32)> = Vec::new();
        for c in first..end {
            let start = (c * disk.chunk).max(req.offset);
            let len = ((c + 1) * disk.chunk).min(stop) - start;
            let flags = match disk.allocated(c) {
                Ok(true) => 0,
                Ok(false) => STATE_HOLE | STATE_ZERO,
                Err(e) => return self.error(req, EIO, &e.to_string()),
            };
            match runs.last_mut() {
                Some((l, f)) if *f == flags && u32::try_from(*l + len).is_ok() => *l += len,
                _ => {
                    if req.flags & CMD_FLAG_REQ_ONE != 0 && !runs.is_empty() {
                        break;
                    }
                    runs.push((len, flags));
                }
            }
        }
        let mut m = chunk_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            req.cookie,
            u32_of(4 + 8 * runs.len()),
        )
        .to_vec();
        m.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
        for (len, flags) in runs {
            m.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
            m.extend_from_slice(&flags.to_be_bytes());
        }
        self.send(&m)
    }
}

fn transmission_flags() -> u16 {
    FLAG_HAS_FLAGS
        | FLAG_READ_ONLY
        | FLAG_SEND_FLUSH
        | FLAG_SEND_DF
        | FLAG_CAN_MULTI_CONN
        | FLAG_SEND_CACHE
}

fn u32_of(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
