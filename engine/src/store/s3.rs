//! The S3 backend: objects under a prefix of a bucket, through aws-sdk-s3.
//!
//! The engine's threads are synchronous; the SDK is async. Each store owns a small tokio
//! runtime and its callers block on it (never call these methods from inside an async task).
//!
//! Retries live in one layer only, the SDK's standard strategy (exponential backoff with
//! jitter on 5xx, throttling, timeouts and connection errors), with per-attempt and
//! per-operation timeouts and stalled-stream protection; an interceptor logs every retry at
//! INFO with the reason. Opening a store probes it with few attempts so that a wrong endpoint,
//! bucket or key fails in seconds, not after the long retry budget meant for a running job.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    Intercept, Region, RuntimeComponents, StalledStreamProtectionConfig, interceptors,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_smithy_runtime::client::retries::{RetryPartition, TokenBucket};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::orchestrator::{HttpResponse, Metadata};
use aws_smithy_runtime_api::client::retries::RequestAttempts;
use aws_smithy_types::config_bag::{ConfigBag, Storable, StoreReplace};
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;

use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};

use super::{ObjectStore, Part, PartRules, PutMode, PutOutcome, S3Options, Upload, check_key};
use crate::error::{Error, ErrorKind, Result};

/// Fetches of one object tried when its body breaks off mid-transfer.
const BODY_ATTEMPTS: u32 = 4;

/// Completions of one upload tried when the store claims success but shows no object.
const COMPLETE_ATTEMPTS: u32 = 3;

/// Attempts per request while opening a store: fail fast on a wrong endpoint or bucket.
const PROBE_ATTEMPTS: u32 = 3;
/// Time limit of one attempt while opening a store.
const PROBE_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(8);
/// Time limit of the whole probe: a store that cannot be reached fails in this time.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// A store under `s3://bucket/prefix`.
pub(crate) struct S3Store {
    rt: tokio::runtime::Runtime,
    client: Client,
    bucket: String,
    /// Empty or ending in `/`.
    prefix: String,
    endpoint: String,
    part_rules: PartRules,
    /// Keys are any S3 takes (an export's target object), not only a store's own.
    any_keys: bool,
    /// The options it was opened with.
    opts: S3Options,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("location", &self.location())
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// Splits `s3://bucket/prefix` into a bucket and a prefix (empty or ending in `/`).
pub(crate) fn parse_url(url: &str) -> Result<(String, String)> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| Error::config(format!("{url:?} is not an s3:// URL")))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let valid_bucket = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && bucket.as_bytes()[0].is_ascii_alphanumeric()
        && bucket.as_bytes()[bucket.len() - 1].is_ascii_alphanumeric();
    if !valid_bucket {
        return Err(Error::config(format!(
            "{url:?}: {bucket:?} is not a valid bucket name (3 to 63 lowercase letters, digits, \
             dots and hyphens)"
        )));
    }
    let prefix = prefix.trim_end_matches('/');
    if !prefix.is_empty() {
        // The prefix follows the key rules, so a store's keys stay plain paths.
        check_key(prefix).map_err(|_| {
            Error::config(format!(
                "{url:?}: the prefix must be `/`-separated lowercase letters, digits, `.`, `_` \
                 and `-`"
            ))
        })?;
    }
    let prefix = if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}/")
    };
    Ok((bucket.to_owned(), prefix))
}

impl S3Store {
    /// Connects to the bucket of `url` and checks that it can be reached, with clear errors
    /// for a missing bucket, refused credentials or an unreachable endpoint.
    pub(crate) fn open(url: &str, opts: &S3Options) -> Result<S3Store> {
        let (bucket, prefix) = parse_url(url)?;
        S3Store::connect(bucket, prefix, false, opts)
    }

    /// Connects to the bucket of `s3://bucket/key` to write or read the one object `key`,
    /// which may be any key S3 takes (an export's target), and returns the key.
    pub(crate) fn open_object(url: &str, opts: &S3Options) -> Result<(S3Store, String)> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| Error::config(format!("{url:?} is not an s3:// URL")))?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        let (bucket, _) = parse_url(&format!("s3://{bucket}"))?;
        check_object_key(key).map_err(|_| {
            Error::config(format!(
                "{url:?}: name an object, s3://BUCKET/KEY (a key of at most 1024 bytes, no \
                 control characters, not ending in `/`)"
            ))
        })?;
        let store = S3Store::connect(bucket, String::new(), true, opts)?;
        Ok((store, key.to_owned()))
    }

    fn connect(
        bucket: String,
        prefix: String,
        any_keys: bool,
        opts: &S3Options,
    ) -> Result<S3Store> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("blockferry-s3")
            .enable_all()
            .build()
            .map_err(|e| {
                Error::new(ErrorKind::Internal, "starting the S3 runtime").with_source(e)
            })?;
        let ca_bundle = opts
            .ca_bundle
            .clone()
            .or_else(|| std::env::var_os("AWS_CA_BUNDLE").map(std::path::PathBuf::from))
            .filter(|p| !p.as_os_str().is_empty());
        let mut http = aws_smithy_http_client::Builder::new().tls_provider(
            aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ),
        );
        if let Some(path) = &ca_bundle {
            // These authorities only, as AWS_CA_BUNDLE means to other AWS tools.
            let pem =
                std::fs::read(path).map_err(|e| Error::io("reading the CA bundle", path, e))?;
            if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
                return Err(Error::config("the CA bundle holds no PEM certificate").with_path(path));
            }
            let trust = aws_smithy_http_client::tls::TrustStore::empty().with_pem_certificate(pem);
            let tls = aws_smithy_http_client::tls::TlsContext::builder()
                .with_trust_store(trust)
                .build()
                .map_err(|e| {
                    Error::config("the CA bundle cannot be used")
                        .with_path(path)
                        .with_source(e)
                })?;
            http = http.tls_context(tls);
        }
        let http = http.build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(opts.max_attempts.max(1))
                    .with_initial_backoff(Duration::from_millis(200))
                    .with_max_backoff(Duration::from_secs(20)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(opts.connect_timeout)
                    .operation_attempt_timeout(opts.attempt_timeout)
                    .operation_timeout(opts.operation_timeout)
                    .build(),
            )
            .stalled_stream_protection(
                StalledStreamProtectionConfig::enabled()
                    .grace_period(Duration::from_secs(30))
                    .build(),
            );
        if let Some(endpoint) = &opts.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some((key, secret)) = &opts.static_credentials {
            loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
                key.clone(),
                secret.clone(),
                None,
                None,
                "blockferry options",
            ));
        }
        if let Some(region) = &opts.region {
            loader = loader.region(Region::new(region.clone()));
        }
        let shared = rt.block_on(loader.load());
        let custom_endpoint = shared.endpoint_url().map(str::to_owned);
        let mut conf = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(opts.path_style.unwrap_or(custom_endpoint.is_some()))
            // No client-side retry quota: under a long throttling storm a migration keeps
            // trying within each request's attempts and deadline instead of giving up early.
            .retry_partition(
                RetryPartition::custom("blockferry")
                    .token_bucket(TokenBucket::unlimited())
                    .build(),
            )
            .interceptor(LogRetries);
        if shared.region().is_none() {
            conf = conf.region(Region::from_static("us-east-1"));
        }
        let store = S3Store {
            rt,
            client: Client::from_conf(conf.build()),
            bucket,
            prefix,
            endpoint: custom_endpoint.unwrap_or_else(|| "AWS S3".to_owned()),
            part_rules: PartRules {
                min_part: opts.min_part_size.unwrap_or(PartRules::S3.min_part),
                ..PartRules::S3
            },
            any_keys,
            opts: opts.clone(),
        };
        store.probe()?;
        Ok(store)
    }

    /// One cheap listing with few attempts: the bucket exists, the credentials are accepted
    /// and allow listing.
    fn probe(&self) -> Result<()> {
        let req = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&self.prefix)
            .max_keys(1)
            .customize()
            .config_override(
                aws_sdk_s3::config::Builder::default()
                    .retry_config(
                        RetryConfig::standard()
                            .with_max_attempts(PROBE_ATTEMPTS)
                            .with_initial_backoff(Duration::from_millis(200)),
                    )
                    .timeout_config(
                        TimeoutConfig::builder()
                            .connect_timeout(PROBE_ATTEMPT_TIMEOUT)
                            .operation_attempt_timeout(PROBE_ATTEMPT_TIMEOUT)
                            .operation_timeout(PROBE_TIMEOUT)
                            .build(),
                    ),
            );
        self.block(req.send()).map(|_| ()).map_err(|e| {
            let err = self.sdk_err("opening the store", None, &e);
            if err.kind() == ErrorKind::NotFound {
                // A 404 on listing a bucket: no such bucket, or no S3 service there.
                Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "opening the store: bucket {:?} does not exist at {} (or that is \
                             not an S3 endpoint)",
                        self.bucket, self.endpoint
                    ),
                )
            } else {
                err
            }
        })
    }

    /// Every object under a prefix: key, size and `LastModified` (ms), sorted by key.
    fn listing(&self, prefix: &str) -> Result<Vec<(String, u64, Option<u64>)>> {
        let full = format!("{}{prefix}", self.prefix);
        let mut keys = Vec::new();
        self.block(async {
            let mut pages = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&full)
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| self.sdk_err("listing objects", None, &e))?;
                for obj in page.contents() {
                    if let Some(k) = obj.key().and_then(|k| k.strip_prefix(&self.prefix)) {
                        // Objects that are not ours (other tools' files) are not listed.
                        if check_key(k).is_ok() {
                            let size = obj.size().and_then(|n| u64::try_from(n).ok());
                            let modified = obj
                                .last_modified()
                                .and_then(|t| t.to_millis().ok())
                                .and_then(|t| u64::try_from(t).ok());
                            keys.push((k.to_owned(), size.unwrap_or(0), modified));
                        }
                    }
                }
            }
            Ok::<_, Error>(())
        })?;
        keys.sort();
        Ok(keys)
    }

    fn block<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    fn full_key(&self, key: &str) -> Result<String> {
        if self.any_keys {
            check_object_key(key)?;
        } else {
            check_key(key)?;
        }
        Ok(format!("{}{key}", self.prefix))
    }

    /// The object's size, ETag and user metadata; `None` if there is no such object.
    pub(crate) fn head(&self, key: &str) -> Result<Option<ObjectHead>> {
        let full = self.full_key(key)?;
        match self.block(
            self.client
                .head_object()
                .bucket(&self.bucket)
                .key(&full)
                .send(),
        ) {
            Ok(resp) => Ok(Some(ObjectHead {
                size: resp
                    .content_length()
                    .and_then(|n| u64::try_from(n).ok())
                    .unwrap_or(0),
                etag: resp.e_tag().unwrap_or_default().to_owned(),
                metadata: resp.metadata().cloned().unwrap_or_default(),
            })),
            Err(e) if e.raw_response().map(|r| r.status().as_u16()) == Some(404) => Ok(None),
            Err(e) => Err(self.sdk_err("reading an object's description", Some(key), &e)),
        }
    }

    /// Starts a multipart upload of `key` whose object will carry `metadata` (user metadata,
    /// `x-amz-meta-*`).
    pub(crate) fn create_upload_with(
        &self,
        key: &str,
        metadata: &std::collections::HashMap<String, String>,
    ) -> Result<String> {
        let full = self.full_key(key)?;
        let resp = self
            .block(
                self.client
                    .create_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&full)
                    .set_metadata(Some(metadata.clone()))
                    .checksum_algorithm(aws_sdk_s3::types::ChecksumAlgorithm::Crc32C)
                    .send(),
            )
            .map_err(|e| self.sdk_err("starting a multipart upload", Some(key), &e))?;
        resp.upload_id().map(str::to_owned).ok_or_else(|| {
            Error::new(ErrorKind::Store, "the store gave no upload id").with_object(key)
        })
    }

    /// Makes part `number` of an upload of `key` a copy, made by the store, of the bytes
    /// `range` of the object `source` of the same bucket, provided that object's ETag is
    /// still `if_match`; `None` if the source changed (or vanished).
    pub(crate) fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        source: &str,
        range: std::ops::Range<u64>,
        if_match: &str,
    ) -> Result<Option<Part>> {
        let full = self.full_key(key)?;
        let source_full = self.full_key(source)?;
        if range.is_empty() {
            return Err(Error::internal("an empty part copy"));
        }
        let sent =
            self.block(
                self.client
                    .upload_part_copy()
                    .bucket(&self.bucket)
                    .key(&full)
                    .upload_id(upload_id)
                    .part_number(i32::try_from(number).map_err(|_| {
                        Error::internal("part number out of range").with_object(key)
                    })?)
                    .copy_source(format!("{}/{}", self.bucket, encode_key(&source_full)))
                    .copy_source_range(format!("bytes={}-{}", range.start, range.end - 1))
                    .copy_source_if_match(if_match)
                    .send(),
            );
        let resp = match sent {
            Ok(resp) => resp,
            Err(e)
                if e.code() == Some("PreconditionFailed")
                    || e.code() == Some("NoSuchKey")
                    || matches!(
                        e.raw_response().map(|r| r.status().as_u16()),
                        Some(412 | 404)
                    ) =>
            {
                return Ok(None);
            }
            Err(e) => {
                return Err(self
                    .sdk_err(&format!("copying part {number}"), Some(key), &e)
                    .with_part(number));
            }
        };
        let result = resp.copy_part_result();
        let etag = result
            .and_then(|r| r.e_tag())
            .map(str::to_owned)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Store,
                    format!("part {number}: the store gave no ETag for a copied part"),
                )
                .with_object(key)
                .with_part(number)
            })?;
        Ok(Some(Part {
            number,
            size: range.end - range.start,
            etag,
            crc32c: result
                .and_then(|r| r.checksum_crc32_c())
                .unwrap_or_default()
                .to_owned(),
        }))
    }

    /// The multipart uploads open for exactly `key`.
    pub(crate) fn uploads_of(&self, key: &str) -> Result<Vec<Upload>> {
        Ok(self
            .list_uploads()?
            .into_iter()
            .filter(|u| u.key == key)
            .collect())
    }

    /// The multipart uploads open for keys that start with `prefix`.
    pub(crate) fn uploads_under(&self, prefix: &str) -> Result<Vec<Upload>> {
        Ok(self
            .list_uploads()?
            .into_iter()
            .filter(|u| u.key.starts_with(prefix))
            .collect())
    }

    /// GETs an object or an inclusive byte range of it, refusing more than `max_len` bytes.
    /// A body that breaks off mid-transfer is fetched again (the SDK retries a request only
    /// until its answer's headers arrive).
    fn get_bytes(&self, key: &str, range: Option<(u64, u64)>, max_len: u64) -> Result<Vec<u8>> {
        let full = self.full_key(key)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let fetched = self.block(async {
                let mut req = self.client.get_object().bucket(&self.bucket).key(&full);
                if let Some((first, last)) = range {
                    req = req.range(format!("bytes={first}-{last}"));
                }
                let resp = req.send().await.map_err(|e| {
                    let status = e.raw_response().map(|r| r.status().as_u16());
                    Fetch::Failed(if e.code() == Some("InvalidRange") || status == Some(416) {
                        Error::corrupt(key, "range past the end of the object (truncated)")
                            .with_offset(range.map_or(0, |r| r.0))
                    } else {
                        self.sdk_err("reading an object", Some(key), &e)
                    })
                })?;
                let announced = resp.content_length().and_then(|n| u64::try_from(n).ok());
                if announced.is_some_and(|n| n > max_len) {
                    return Err(Fetch::Failed(Error::corrupt(
                        key,
                        format!("object is larger than the {max_len} bytes it may have"),
                    )));
                }
                let body = collect_body(resp.body, key, max_len).await?;
                if announced.is_some_and(|n| n != body.len() as u64) {
                    return Err(Fetch::Broken(
                        Error::new(
                            ErrorKind::Store,
                            format!(
                                "reading an object: the answer ended after {} of {} bytes",
                                body.len(),
                                announced.unwrap_or_default()
                            ),
                        )
                        .with_object(key),
                    ));
                }
                Ok(body)
            });
            match fetched {
                Ok(body) => return Ok(body),
                Err(Fetch::Broken(e)) if attempt < BODY_ATTEMPTS => {
                    tracing::info!(key, attempt, reason = %e, "retrying S3 read");
                    std::thread::sleep(Duration::from_millis(200 * u64::from(attempt)));
                }
                Err(Fetch::Broken(e) | Fetch::Failed(e)) => return Err(e),
            }
        }
    }

    /// Turns an SDK error into an engine error that says what failed and how to fix it.
    fn sdk_err<E>(&self, doing: &str, key: Option<&str>, e: &SdkError<E, HttpResponse>) -> Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let status = e.raw_response().map(|r| r.status().as_u16());
        let detail = e.message().map(|m| format!(": {m}")).unwrap_or_default();
        let why = chain(e);
        let (kind, message) = match e {
            // Before any request went out: no credentials, or an endpoint that is no URL.
            SdkError::ConstructionFailure(_) | SdkError::DispatchFailure(_)
                if why.contains("loading credentials")
                    || why.contains("provided credentials")
                    || why.contains("no credentials") =>
            {
                (
                    ErrorKind::AccessDenied,
                    format!(
                        "{doing}: no AWS credentials found; set AWS_ACCESS_KEY_ID and \
                         AWS_SECRET_ACCESS_KEY, an AWS profile or an instance role ({why})"
                    ),
                )
            }
            SdkError::ConstructionFailure(_) | SdkError::DispatchFailure(_)
                if why.contains("not a valid URI") =>
            {
                (
                    ErrorKind::Config,
                    format!(
                        "{doing}: the endpoint {:?} is not a URL: give one such as \
                         http://127.0.0.1:8333 ({why})",
                        self.endpoint
                    ),
                )
            }
            SdkError::DispatchFailure(_)
                if why.contains("certificate")
                    || why.contains("UnknownIssuer")
                    || why.contains("NotValidForName") =>
            {
                (
                    ErrorKind::Store,
                    format!(
                        "{doing}: {} presented a certificate this client does not trust, or one \
                         for another name: refused ({why}); give the authority that signed it \
                         (--ca-bundle, AWS_CA_BUNDLE) or the name it was made for",
                        self.endpoint
                    ),
                )
            }
            SdkError::DispatchFailure(d) if d.is_timeout() => (
                ErrorKind::Store,
                format!("{doing}: timed out connecting to {}", self.endpoint),
            ),
            SdkError::DispatchFailure(d) if d.is_io() => (
                ErrorKind::Store,
                format!(
                    "{doing}: cannot reach {} ({}); check the endpoint and the network",
                    self.endpoint,
                    chain(e)
                ),
            ),
            SdkError::ResponseError(_) => (
                ErrorKind::Store,
                format!(
                    "{doing}: the connection to {} broke before a whole answer came ({})",
                    self.endpoint,
                    chain(e)
                ),
            ),
            SdkError::TimeoutError(_) => (
                ErrorKind::Store,
                format!("{doing}: {} did not answer in time", self.endpoint),
            ),
            _ => self.service_err(doing, e, status, &detail),
        };
        let mut err = Error::new(kind, message);
        if let Some(key) = key {
            err = err.with_object(key);
        }
        err
    }

    /// The kind and message of an error the service answered (by its code and status).
    fn service_err<E>(
        &self,
        doing: &str,
        e: &SdkError<E, HttpResponse>,
        status: Option<u16>,
        detail: &str,
    ) -> (ErrorKind, String)
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let code = e.code().unwrap_or_default();
        let where_ = format!("s3://{}/{}", self.bucket, self.prefix);
        match (code, status) {
            ("NoSuchBucket", _) => (
                ErrorKind::NotFound,
                format!(
                    "{doing}: bucket {:?} does not exist at {}",
                    self.bucket, self.endpoint
                ),
            ),
            ("NoSuchKey" | "NotFound", _) | (_, Some(404)) => (
                ErrorKind::NotFound,
                format!("{doing}: no such object{detail}"),
            ),
            ("InvalidAccessKeyId", _) => (
                ErrorKind::AccessDenied,
                format!(
                    "{doing}: {} does not know this access key id; check AWS_ACCESS_KEY_ID \
                 or the AWS profile",
                    self.endpoint
                ),
            ),
            ("SignatureDoesNotMatch", _) => (
                ErrorKind::AccessDenied,
                format!(
                    "{doing}: {} refused the request signature; check AWS_SECRET_ACCESS_KEY \
                 or the AWS profile",
                    self.endpoint
                ),
            ),
            ("ExpiredToken" | "InvalidToken" | "TokenRefreshRequired", _) => (
                ErrorKind::AccessDenied,
                format!("{doing}: the AWS session token is expired or invalid; refresh it"),
            ),
            ("AccessDenied" | "AllAccessDisabled", _) | (_, Some(403)) => (
                ErrorKind::AccessDenied,
                format!(
                    "{doing}: access denied to {where_}; the credentials need \
                 s3:ListBucket, s3:GetObject, s3:PutObject, s3:DeleteObject and the \
                 multipart permissions on it{detail}"
                ),
            ),
            _ if matches!(e, SdkError::ConstructionFailure(_))
                && chain(e).contains("credentials") =>
            {
                (
                    ErrorKind::AccessDenied,
                    format!(
                        "{doing}: no AWS credentials found; set AWS_ACCESS_KEY_ID and \
                     AWS_SECRET_ACCESS_KEY, an AWS profile or an instance role ({})",
                        chain(e)
                    ),
                )
            }
            _ => (
                ErrorKind::Store,
                match status {
                    Some(status) => format!(
                        "{doing}: {} answered {status}{}{detail} ({})",
                        self.endpoint,
                        if code.is_empty() {
                            String::new()
                        } else {
                            format!(" {code}")
                        },
                        chain(e)
                    ),
                    None => format!("{doing}: {}", chain(e)),
                },
            ),
        }
    }
}

/// The messages of an error and its causes, joined (the SDK's own error says little alone:
/// "service error", "dispatch failure"; what went wrong is in its causes).
fn chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !parts.contains(&s) {
            parts.push(s);
        }
        cur = c.source();
    }
    parts.join(": ")
}

impl ObjectStore for S3Store {
    fn location(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix.trim_end_matches('/'))
    }

    fn put(&self, key: &str, data: &[u8], mode: PutMode) -> Result<PutOutcome> {
        let full = self.full_key(key)?;
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&full)
            .checksum_algorithm(aws_sdk_s3::types::ChecksumAlgorithm::Crc32C)
            .body(ByteStream::from(data.to_vec()));
        if mode == PutMode::Create {
            req = req.if_none_match("*");
        }
        match self.block(req.send()) {
            Ok(_) => Ok(PutOutcome::Written),
            Err(e)
                if mode == PutMode::Create
                    && (e.code() == Some("PreconditionFailed")
                        || e.raw_response().map(|r| r.status().as_u16()) == Some(412)) =>
            {
                Ok(PutOutcome::AlreadyExists)
            }
            Err(e) => Err(self.sdk_err("writing an object", Some(key), &e)),
        }
    }

    fn put_retained(
        &self,
        key: &str,
        data: &[u8],
        until_unix_ms: u64,
        compliance: bool,
    ) -> Result<PutOutcome> {
        use aws_sdk_s3::types::ObjectLockMode;
        let full = self.full_key(key)?;
        let until = aws_smithy_types::DateTime::from_millis(
            i64::try_from(until_unix_ms).unwrap_or(i64::MAX),
        );
        let req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&full)
            .checksum_algorithm(aws_sdk_s3::types::ChecksumAlgorithm::Crc32C)
            .object_lock_mode(if compliance {
                ObjectLockMode::Compliance
            } else {
                ObjectLockMode::Governance
            })
            .object_lock_retain_until_date(until)
            .if_none_match("*")
            .body(ByteStream::from(data.to_vec()));
        match self.block(req.send()) {
            Ok(_) => Ok(PutOutcome::Written),
            Err(e)
                if e.code() == Some("PreconditionFailed")
                    || e.raw_response().map(|r| r.status().as_u16()) == Some(412) =>
            {
                match self.get(key, data.len() as u64) {
                    Ok(existing) if existing == data => Ok(PutOutcome::Written),
                    _ => Ok(PutOutcome::AlreadyExists),
                }
            }
            Err(e) => Err(self
                .sdk_err(
                    "writing an object under Object Lock retention",
                    Some(key),
                    &e,
                )
                .with_setting("audit_retention")),
        }
    }

    fn get(&self, key: &str, max_len: u64) -> Result<Vec<u8>> {
        self.get_bytes(key, None, max_len)
    }

    fn get_range(&self, key: &str, offset: u64, len: usize, buf: &mut Vec<u8>) -> Result<()> {
        buf.clear();
        if len == 0 {
            return Ok(());
        }
        let last = offset
            .checked_add(len as u64 - 1)
            .ok_or_else(|| Error::corrupt(key, "range past the end of the object"))?;
        let body = self.get_bytes(key, Some((offset, last)), len as u64)?;
        if body.len() != len {
            return Err(
                Error::corrupt(key, "range past the end of the object (truncated)")
                    .with_offset(offset),
            );
        }
        *buf = body;
        Ok(())
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .listing(prefix)?
            .into_iter()
            .map(|(k, _, _)| k)
            .collect())
    }

    fn list_sized(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        Ok(self
            .listing(prefix)?
            .into_iter()
            .map(|(k, size, _)| (k, size))
            .collect())
    }

    fn list_modified(&self, prefix: &str) -> Result<Vec<(String, Option<u64>)>> {
        Ok(self
            .listing(prefix)?
            .into_iter()
            .map(|(k, _, modified)| (k, modified))
            .collect())
    }

    fn size(&self, key: &str) -> Result<u64> {
        let full = self.full_key(key)?;
        let resp = self
            .block(
                self.client
                    .head_object()
                    .bucket(&self.bucket)
                    .key(&full)
                    .send(),
            )
            .map_err(|e| self.sdk_err("reading an object's size", Some(key), &e))?;
        resp.content_length()
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| {
                Error::new(ErrorKind::Store, "the store did not give the object's size")
                    .with_object(key)
            })
    }

    fn delete(&self, key: &str) -> Result<()> {
        let full = self.full_key(key)?;
        match self.block(
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(&full)
                .send(),
        ) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_response().map(|r| r.status().as_u16()) == Some(404) => Ok(()),
            Err(e) => Err(self.sdk_err("deleting an object", Some(key), &e)),
        }
    }

    fn multipart(&self) -> Option<PartRules> {
        Some(self.part_rules)
    }

    fn s3_options(&self) -> Option<&S3Options> {
        Some(&self.opts)
    }

    fn create_upload(&self, key: &str) -> Result<String> {
        let full = self.full_key(key)?;
        let resp = self
            .block(
                self.client
                    .create_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&full)
                    .checksum_algorithm(aws_sdk_s3::types::ChecksumAlgorithm::Crc32C)
                    .send(),
            )
            .map_err(|e| self.sdk_err("starting a multipart upload", Some(key), &e))?;
        resp.upload_id().map(str::to_owned).ok_or_else(|| {
            Error::new(ErrorKind::Store, "the store gave no upload id").with_object(key)
        })
    }

    fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        data: bytes::Bytes,
    ) -> Result<Part> {
        let full = self.full_key(key)?;
        let size = data.len() as u64;
        let crc = part_checksum(&data);
        let resp = self
            .block(
                self.client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(&full)
                    .upload_id(upload_id)
                    .part_number(i32::try_from(number).map_err(|_| {
                        Error::internal("part number out of range").with_object(key)
                    })?)
                    .checksum_crc32_c(&crc)
                    // The body shares the caller's buffer: no copy on the way to the socket.
                    .body(ByteStream::from(data))
                    .send(),
            )
            .map_err(|e| {
                self.sdk_err(&format!("uploading part {number}"), Some(key), &e)
                    .with_part(number)
            })?;
        if let Some(echo) = resp.checksum_crc32_c()
            && echo != crc
        {
            return Err(Error::new(
                ErrorKind::Store,
                format!(
                    "part {number}: the store acknowledged another checksum ({echo}, not {crc})"
                ),
            )
            .with_object(key)
            .with_part(number));
        }
        let etag = resp.e_tag().map(str::to_owned).ok_or_else(|| {
            Error::new(
                ErrorKind::Store,
                format!("part {number}: the store gave no ETag"),
            )
            .with_object(key)
            .with_part(number)
        })?;
        Ok(Part {
            number,
            size,
            etag,
            crc32c: crc,
        })
    }

    fn list_parts(&self, key: &str, upload_id: &str) -> Result<Vec<Part>> {
        let full = self.full_key(key)?;
        let mut parts = Vec::new();
        self.block(async {
            let mut pages = self
                .client
                .list_parts()
                .bucket(&self.bucket)
                .key(&full)
                .upload_id(upload_id)
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| self.sdk_err("listing parts", Some(key), &e))?;
                for p in page.parts() {
                    let (Some(n), Some(size), Some(etag)) = (p.part_number(), p.size(), p.e_tag())
                    else {
                        continue;
                    };
                    parts.push(Part {
                        number: u32::try_from(n).unwrap_or(0),
                        size: u64::try_from(size).unwrap_or(0),
                        etag: etag.to_owned(),
                        crc32c: p.checksum_crc32_c().unwrap_or_default().to_owned(),
                    });
                }
            }
            Ok::<_, Error>(())
        })?;
        parts.sort_by_key(|p| p.number);
        Ok(parts)
    }

    fn complete_upload(&self, key: &str, upload_id: &str, parts: &[Part]) -> Result<()> {
        let full = self.full_key(key)?;
        let total: u64 = parts.iter().map(|p| p.size).sum();
        let completed = CompletedMultipartUpload::builder()
            .set_parts(Some(
                parts
                    .iter()
                    .map(|p| {
                        // A part copied by a store that gave no checksum has none.
                        CompletedPart::builder()
                            .part_number(i32::try_from(p.number).unwrap_or(i32::MAX))
                            .e_tag(&p.etag)
                            .set_checksum_crc32_c((!p.crc32c.is_empty()).then(|| p.crc32c.clone()))
                            .build()
                    })
                    .collect(),
            ))
            .build();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = self.block(
                self.client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&full)
                    .upload_id(upload_id)
                    .multipart_upload(completed.clone())
                    .send(),
            );
            let mut no_such_upload = false;
            if let Err(e) = result {
                // The answer to an earlier attempt may have been lost after the store
                // assembled the object: the retry then finds no such upload. The object tells.
                if e.code() != Some("NoSuchUpload") {
                    return Err(self.sdk_err("completing a multipart upload", Some(key), &e));
                }
                no_such_upload = true;
                tracing::info!(key, "completing found no such upload: checking the object");
            }
            // A success is believed only once the object is there, whole.
            match self.size(key) {
                Ok(n) if n == total => return Ok(()),
                Ok(n) => {
                    return Err(Error::new(
                        ErrorKind::Store,
                        format!(
                            "after completing its upload the object has {n} bytes, not {total}"
                        ),
                    )
                    .with_object(key));
                }
                Err(e) if e.kind() == ErrorKind::NotFound && no_such_upload => {
                    return Err(Error::new(
                        ErrorKind::Store,
                        "the store lost a multipart upload before it was completed (expired, \
                         or aborted by a lifecycle rule?); run the job again to send it anew",
                    )
                    .with_object(key));
                }
                Err(e) if e.kind() == ErrorKind::NotFound && attempt < COMPLETE_ATTEMPTS => {
                    tracing::info!(
                        key,
                        attempt,
                        "the store answered the completion but has no object: completing again"
                    );
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn abort_upload(&self, key: &str, upload_id: &str) -> Result<()> {
        let full = self.full_key(key)?;
        match self.block(
            self.client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&full)
                .upload_id(upload_id)
                .send(),
        ) {
            Ok(_) => Ok(()),
            Err(e)
                if e.code() == Some("NoSuchUpload")
                    || e.raw_response().map(|r| r.status().as_u16()) == Some(404) =>
            {
                Ok(())
            }
            Err(e) => Err(self.sdk_err("aborting a multipart upload", Some(key), &e)),
        }
    }

    fn list_uploads(&self) -> Result<Vec<Upload>> {
        let mut out = Vec::new();
        let mut key_marker: Option<String> = None;
        let mut id_marker: Option<String> = None;
        loop {
            let page = self
                .block(
                    self.client
                        .list_multipart_uploads()
                        .bucket(&self.bucket)
                        .prefix(&self.prefix)
                        .set_key_marker(key_marker.clone())
                        .set_upload_id_marker(id_marker.clone())
                        .send(),
                )
                .map_err(|e| self.sdk_err("listing multipart uploads", None, &e))?;
            for u in page.uploads() {
                let (Some(k), Some(id)) = (u.key(), u.upload_id()) else {
                    continue;
                };
                let Some(k) = k.strip_prefix(&self.prefix) else {
                    continue;
                };
                out.push(Upload {
                    key: k.to_owned(),
                    upload_id: id.to_owned(),
                    initiated_unix_ms: u
                        .initiated()
                        .and_then(|t| u64::try_from(t.to_millis().ok()?).ok()),
                });
            }
            if page.is_truncated() != Some(true) {
                break;
            }
            key_marker = page.next_key_marker().map(str::to_owned);
            id_marker = page.next_upload_id_marker().map(str::to_owned);
            if key_marker.is_none() && id_marker.is_none() {
                break;
            }
        }
        Ok(out)
    }
}

/// An object as a HEAD request describes it.
#[derive(Debug, Clone)]
pub(crate) struct ObjectHead {
    /// Size in bytes.
    pub(crate) size: u64,
    /// Its ETag, quotes included.
    pub(crate) etag: String,
    /// User metadata (`x-amz-meta-*`, without the prefix).
    pub(crate) metadata: std::collections::HashMap<String, String>,
}

/// A part's CRC-32C as S3 gives it: big-endian, base64.
pub(crate) fn part_checksum(data: &[u8]) -> String {
    aws_smithy_types::base64::encode(crc32c::crc32c(data).to_be_bytes())
}

/// Checks an object key as S3 takes it: 1 to 1024 bytes, no control characters, no leading
/// or trailing `/`.
pub(crate) fn check_object_key(key: &str) -> Result<()> {
    if key.is_empty()
        || key.len() > 1024
        || key.starts_with('/')
        || key.ends_with('/')
        || key.chars().any(char::is_control)
    {
        return Err(Error::config(format!("invalid object key {key:?}")));
    }
    Ok(())
}

/// A key as `x-amz-copy-source` takes it: percent-encoded but for `/` and unreserved bytes.
fn encode_key(key: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Why a GET failed: a body that broke off (worth fetching again) or anything else.
enum Fetch {
    Broken(Error),
    Failed(Error),
}

/// Reads a response body, refusing more than `max_len` bytes.
async fn collect_body(
    mut body: ByteStream,
    key: &str,
    max_len: u64,
) -> std::result::Result<Vec<u8>, Fetch> {
    let mut out = Vec::new();
    while let Some(piece) = body.next().await {
        let piece = piece.map_err(|e| {
            Fetch::Broken(
                Error::new(
                    ErrorKind::Store,
                    format!("reading an object: the transfer broke ({})", chain(&e)),
                )
                .with_object(key),
            )
        })?;
        if out.len() as u64 + piece.len() as u64 > max_len {
            return Err(Fetch::Failed(Error::corrupt(
                key,
                format!("object is larger than the {max_len} bytes it may have"),
            )));
        }
        out.extend_from_slice(&piece);
    }
    Ok(out)
}

/// Why the last attempt of a request failed, kept between attempts for [`LogRetries`].
#[derive(Debug, Clone)]
struct LastFailure(String);

impl Storable for LastFailure {
    type Storer = StoreReplace<Self>;
}

/// Logs each retry the SDK makes at INFO, with the operation and why the attempt before failed.
#[derive(Debug)]
struct LogRetries;

impl Intercept for LogRetries {
    fn name(&self) -> &'static str {
        "blockferry::LogRetries"
    }

    fn read_before_attempt(
        &self,
        _ctx: &interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> std::result::Result<(), BoxError> {
        let attempt = cfg
            .load::<RequestAttempts>()
            .map_or(1, RequestAttempts::attempts);
        if attempt > 1 {
            let op = cfg.load::<Metadata>().map_or("request", Metadata::name);
            let why = cfg
                .load::<LastFailure>()
                .map_or("unknown", |f| f.0.as_str());
            tracing::info!(operation = op, attempt, reason = why, "retrying S3 request");
        }
        Ok(())
    }

    fn read_after_attempt(
        &self,
        ctx: &interceptors::FinalizerInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> std::result::Result<(), BoxError> {
        let reason = match (ctx.response(), ctx.output_or_error()) {
            (_, Some(Err(e))) => Some(match ctx.response() {
                Some(r) => format!("HTTP {}: {}", r.status().as_u16(), chain(e)),
                None => chain(e),
            }),
            (Some(r), _) if !r.status().is_success() => {
                Some(format!("HTTP {}", r.status().as_u16()))
            }
            _ => None,
        };
        if let Some(reason) = reason {
            cfg.interceptor_state().store_put(LastFailure(reason));
        }
        Ok(())
    }
}
