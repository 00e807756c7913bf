//! A fault-injecting HTTP/1.1 proxy on loopback, between blockferry and the S3 server.
//!
//! Each request is read whole from the client, then a rule decides what happens: forward it,
//! answer 503 SlowDown without forwarding, cut the connection before forwarding, forward and
//! then lose the answer, forward and cut the answer's body short, or answer 200 with an
//! error body. The proxy counts the body bytes of every upload request it forwards, so tests
//! can tell how much was sent again after a fault.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// What to do with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Forward,
    /// Answer `503 SlowDown` without forwarding.
    SlowDown,
    /// Close the connection without forwarding (a network cut).
    Cut,
    /// Forward, then close the connection without answering (the answer is lost).
    LoseAnswer,
    /// Forward, then send the answer's headers and half its body.
    TruncateAnswer,
    /// Answer 200 with an `InternalError` body without forwarding.
    ErrorIn200,
    /// Answer `403 AccessDenied` without forwarding (an error no client retries).
    Deny,
    /// Answer 200 with a body no S3 client can parse (as a server that answers a call in
    /// its own, wrong, shape).
    Garbage200,
    /// Take the whole request, then answer nothing for this long and close (a stalled
    /// server).
    Stall(std::time::Duration),
    /// Forward after this long (a slow link).
    Delay(std::time::Duration),
}

/// A request as the rule sees it.
#[derive(Debug)]
pub struct Request<'a> {
    pub method: &'a str,
    /// Path and query.
    pub target: &'a str,
    pub body_len: usize,
    /// Requests seen so far, this one included.
    pub n: u64,
}

impl Request<'_> {
    pub fn is_upload_part(&self) -> bool {
        self.method == "PUT" && self.target.contains("partNumber=")
    }

    pub fn is_complete(&self) -> bool {
        self.method == "POST" && self.target.contains("uploadId=")
    }

    pub fn is_list_parts(&self) -> bool {
        self.method == "GET" && self.target.contains("uploadId=")
    }
}

type Rule = dyn Fn(&Request<'_>) -> Action + Send + Sync;

/// The proxy; it runs until dropped.
pub struct Proxy {
    pub url: String,
    rule: Arc<Mutex<Arc<Rule>>>,
    requests: Arc<AtomicU64>,
    part_bytes: Arc<AtomicU64>,
    part_requests: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Starts a proxy to `upstream` (`http://host:port`) that forwards everything.
    pub fn start(upstream: &str) -> Proxy {
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the proxy");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let rule: Arc<Mutex<Arc<Rule>>> =
            Arc::new(Mutex::new(Arc::new(|_: &Request<'_>| Action::Forward)));
        let requests = Arc::new(AtomicU64::new(0));
        let part_bytes = Arc::new(AtomicU64::new(0));
        let part_requests = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (rule, requests, part_bytes, part_requests, stop) = (
                rule.clone(),
                requests.clone(),
                part_bytes.clone(),
                part_requests.clone(),
                stop.clone(),
            );
            listener.set_nonblocking(true).unwrap();
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            client.set_nonblocking(false).unwrap();
                            let counts = Counts {
                                requests: requests.clone(),
                                part_bytes: part_bytes.clone(),
                                part_requests: part_requests.clone(),
                            };
                            let (rule, upstream) = (rule.clone(), upstream.clone());
                            thread::spawn(move || {
                                let _ = serve(client, &upstream, &rule, &counts);
                            });
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
            });
        }
        Proxy {
            url,
            rule,
            requests,
            part_bytes,
            part_requests,
            stop,
        }
    }

    /// Replaces the rule.
    pub fn set_rule(&self, rule: impl Fn(&Request<'_>) -> Action + Send + Sync + 'static) {
        *self.rule.lock().unwrap() = Arc::new(rule);
    }

    /// Body bytes of the part uploads forwarded so far.
    pub fn part_bytes(&self) -> u64 {
        self.part_bytes.load(Ordering::Relaxed)
    }

    /// Part uploads forwarded so far.
    pub fn part_requests(&self) -> u64 {
        self.part_requests.load(Ordering::Relaxed)
    }

    /// Requests seen so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Reads a header block (up to the empty line); `None` at a clean end of stream.
fn read_head(r: &mut impl BufRead) -> std::io::Result<Option<Vec<String>>> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return if lines.is_empty() {
                Ok(None)
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
        let line = line.trim_end_matches(['\r', '\n']).to_owned();
        if line.is_empty() {
            return Ok(Some(lines));
        }
        lines.push(line);
    }
}

fn header<'a>(head: &'a [String], name: &str) -> Option<&'a str> {
    head.iter().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Reads a message body: by Content-Length, chunked (kept encoded), or none.
fn read_body(r: &mut impl BufRead, head: &[String], until_close: bool) -> std::io::Result<Vec<u8>> {
    if let Some(len) = header(head, "content-length") {
        let len: usize = len.parse().map_err(|_| std::io::ErrorKind::InvalidData)?;
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        return Ok(body);
    }
    if header(head, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let mut body = Vec::new();
        loop {
            let mut line = String::new();
            r.read_line(&mut line)?;
            body.extend_from_slice(line.as_bytes());
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16)
                .map_err(|_| std::io::ErrorKind::InvalidData)?;
            if size == 0 {
                // Trailers, then the empty line.
                loop {
                    let mut t = String::new();
                    r.read_line(&mut t)?;
                    body.extend_from_slice(t.as_bytes());
                    if t.trim().is_empty() {
                        return Ok(body);
                    }
                }
            }
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk)?;
            body.extend_from_slice(&chunk);
        }
    }
    let mut body = Vec::new();
    if until_close {
        r.read_to_end(&mut body)?;
    }
    Ok(body)
}

fn write_message(w: &mut impl Write, head: &[String], body: &[u8]) -> std::io::Result<()> {
    let mut out = head.join("\r\n").into_bytes();
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body);
    w.write_all(&out)
}

fn canned(w: &mut impl Write, status: &str, code: &str) -> std::io::Result<()> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>injected by the test proxy</Message></Error>"
    );
    let head = vec![
        format!("HTTP/1.1 {status}"),
        "Content-Type: application/xml".to_owned(),
        format!("Content-Length: {}", body.len()),
    ];
    write_message(w, &head, body.as_bytes())
}

/// The proxy's counters, shared by its connection threads.
struct Counts {
    requests: Arc<AtomicU64>,
    part_bytes: Arc<AtomicU64>,
    part_requests: Arc<AtomicU64>,
}

fn serve(
    client: TcpStream,
    upstream: &str,
    rule: &Mutex<Arc<Rule>>,
    counts: &Counts,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut writer = client;
    loop {
        let Some(head) = read_head(&mut reader)? else {
            return Ok(());
        };
        let body = read_body(&mut reader, &head, false)?;
        let mut parts = head[0].split(' ');
        let method = parts.next().unwrap_or("").to_owned();
        let target = parts.next().unwrap_or("").to_owned();
        let n = counts.requests.fetch_add(1, Ordering::Relaxed) + 1;
        let req = Request {
            method: &method,
            target: &target,
            body_len: body.len(),
            n,
        };
        let current = rule.lock().unwrap().clone();
        let action = current(&req);
        match action {
            Action::SlowDown => {
                canned(&mut writer, "503 Slow Down", "SlowDown")?;
                continue;
            }
            Action::ErrorIn200 => {
                canned(&mut writer, "200 OK", "InternalError")?;
                continue;
            }
            Action::Deny => {
                canned(&mut writer, "403 Forbidden", "AccessDenied")?;
                continue;
            }
            Action::Garbage200 => {
                let body = b"<?xml version=\"1.0\"?><NotListPartsResult><Part>?</Part>";
                let head = vec![
                    "HTTP/1.1 200 OK".to_owned(),
                    "Content-Type: application/xml".to_owned(),
                    format!("Content-Length: {}", body.len()),
                ];
                write_message(&mut writer, &head, body)?;
                continue;
            }
            Action::Cut => {
                let _ = writer.shutdown(Shutdown::Both);
                return Ok(());
            }
            Action::Stall(d) => {
                std::thread::sleep(d);
                let _ = writer.shutdown(Shutdown::Both);
                return Ok(());
            }
            Action::Delay(d) => std::thread::sleep(d),
            _ => {}
        }
        if req.is_upload_part() {
            counts
                .part_bytes
                .fetch_add(body.len() as u64, Ordering::Relaxed);
            counts.part_requests.fetch_add(1, Ordering::Relaxed);
        }
        // One upstream connection per request: simple, and faults never leave it half-read.
        let mut up = TcpStream::connect(upstream)?;
        let mut up_head = head.clone();
        up_head.retain(|l| !l.to_ascii_lowercase().starts_with("connection:"));
        up_head.push("Connection: close".to_owned());
        write_message(&mut up, &up_head, &body)?;
        let mut up_reader = BufReader::new(up);
        let resp_head = read_head(&mut up_reader)?.ok_or(std::io::ErrorKind::UnexpectedEof)?;
        let no_body =
            method == "HEAD" || resp_head[0].contains(" 204 ") || resp_head[0].contains(" 304 ");
        let resp_body = if no_body {
            Vec::new()
        } else {
            read_body(&mut up_reader, &resp_head, true)?
        };
        let mut resp_head: Vec<String> = resp_head
            .into_iter()
            .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
            .collect();
        if !no_body
            && header(&resp_head, "content-length").is_none()
            && header(&resp_head, "transfer-encoding").is_none()
        {
            resp_head.push(format!("Content-Length: {}", resp_body.len()));
        }
        match action {
            Action::LoseAnswer => {
                let _ = writer.shutdown(Shutdown::Both);
                return Ok(());
            }
            Action::TruncateAnswer => {
                write_message(&mut writer, &resp_head, &resp_body[..resp_body.len() / 2])?;
                let _ = writer.shutdown(Shutdown::Both);
                return Ok(());
            }
            _ => write_message(&mut writer, &resp_head, &resp_body)?,
        }
    }
}
