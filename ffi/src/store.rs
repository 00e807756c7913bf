//! Stores: opening and creating them, with their S3 settings.

use std::ffi::c_char;

use blockferry::{InitOptions, JobDb, S3Options, default_state_dir};

use crate::abi::{self, sized};
use crate::error::{self, Fail, FfiResult, boundary, invalid};
use crate::handle::{box_out, bytes_arg, free_box, opt_str_arg, str_arg};
use crate::{bf_result, ffi_arg};

/// An open store (opaque). Safe to use from several threads at once, including for
/// concurrent replications; free it once no call on it is running.
#[derive(Debug)]
pub struct bf_store {
    pub(crate) store: blockferry::Store,
}

/// How S3 requests address the bucket (`bf_s3_options.path_style`).
pub type bf_path_style = u32;
/// Path-style for a custom endpoint, virtual-hosted for AWS (the default).
pub const BF_PATH_STYLE_AUTO: bf_path_style = 0;
/// `http://endpoint/bucket/key`: what most S3-compatible servers on one host need.
pub const BF_PATH_STYLE_PATH: bf_path_style = 1;
/// `http://bucket.endpoint/key`.
pub const BF_PATH_STYLE_VIRTUAL_HOSTED: bf_path_style = 2;

/// How to reach S3 (ignored for local stores). Fill with `bf_s3_options_init`; zero fields
/// take the defaults: the standard AWS chain for credentials and region,
/// `AWS_ENDPOINT_URL`. Over HTTPS, only the authorities in the PEM file `AWS_CA_BUNDLE`
/// names are trusted when it is set (else the system's).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct bf_s3_options {
    /// The struct's size in bytes (set by `bf_s3_options_init`).
    pub size: usize,
    /// Endpoint URL of an S3-compatible service, or NULL.
    pub endpoint: *const c_char,
    /// Region, or NULL.
    pub region: *const c_char,
    /// Access key id, or NULL (then `secret_key` must be NULL too, and the AWS chain is used).
    pub access_key: *const c_char,
    /// Secret access key, or NULL.
    pub secret_key: *const c_char,
    /// Bucket addressing (`BF_PATH_STYLE_*`).
    pub path_style: bf_path_style,
    /// Time limit of one attempt of one request, in seconds; 0 for the default (300).
    pub attempt_timeout_secs: u32,
}

sized!(
    bf_s3_options,
    bf_s3_options {
        size: size_of::<bf_s3_options>(),
        endpoint: std::ptr::null(),
        region: std::ptr::null(),
        access_key: std::ptr::null(),
        secret_key: std::ptr::null(),
        path_style: BF_PATH_STYLE_AUTO,
        attempt_timeout_secs: 0,
    }
);

/// Fills `opts`, a struct of `size` bytes (give `sizeof *opts`), with the defaults.
///
/// # Safety
/// `opts` is writable for `size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_s3_options_init(opts: *mut bf_s3_options, size: usize) -> bf_result {
    boundary(|| ffi_arg!(abi::init(opts, size, "opts")))
}

/// S3 settings from C (NULL: defaults).
///
/// # Safety
/// `s3` is NULL or initialised, with its strings NULL or NUL-terminated.
pub(crate) unsafe fn s3_options(s3: *const bf_s3_options) -> FfiResult<S3Options> {
    let mut o = S3Options::default();
    if s3.is_null() {
        return Ok(o);
    }
    let c = ffi_arg!(abi::read(s3, "s3"))?;
    let endpoint = ffi_arg!(opt_str_arg(c.endpoint, "s3.endpoint"))?;
    let region = ffi_arg!(opt_str_arg(c.region, "s3.region"))?;
    let key = ffi_arg!(opt_str_arg(c.access_key, "s3.access_key"))?;
    let secret = ffi_arg!(opt_str_arg(c.secret_key, "s3.secret_key"))?;
    o.endpoint = endpoint.map(str::to_owned);
    o.region = region.map(str::to_owned);
    o.path_style = match c.path_style {
        BF_PATH_STYLE_AUTO => None,
        BF_PATH_STYLE_PATH => Some(true),
        BF_PATH_STYLE_VIRTUAL_HOSTED => Some(false),
        v => {
            return Err(invalid(format!(
                "s3.path_style {v} is none of BF_PATH_STYLE_AUTO (0), _PATH (1) or \
                 _VIRTUAL_HOSTED (2)"
            )));
        }
    };
    o.static_credentials = match (key, secret) {
        (Some(k), Some(s)) => Some((k.to_owned(), s.to_owned())),
        (None, None) => None,
        _ => {
            return Err(invalid(
                "give both s3.access_key and s3.secret_key, or neither",
            ));
        }
    };
    if c.attempt_timeout_secs > 0 {
        o.attempt_timeout = std::time::Duration::from_secs(u64::from(c.attempt_timeout_secs));
    }
    Ok(o)
}

/// Settings of a new store (`bf_store_create`). Fill with `bf_create_options_init`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct bf_create_options {
    /// The struct's size in bytes (set by `bf_create_options_init`).
    pub size: usize,
    /// Chunk size: a power of two from 65536 to 16777216 (0: 1 MiB).
    pub chunk_size: u32,
    /// Encrypt (the default: true). An unencrypted store must be asked for with `false` and a
    /// NULL passphrase.
    pub encrypted: bool,
}

sized!(
    bf_create_options,
    bf_create_options {
        size: size_of::<bf_create_options>(),
        chunk_size: 0,
        encrypted: true,
    }
);

/// Fills `opts`, a struct of `size` bytes (give `sizeof *opts`), with the defaults.
///
/// # Safety
/// `opts` is writable for `size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_create_options_init(
    opts: *mut bf_create_options,
    size: usize,
) -> bf_result {
    boundary(|| ffi_arg!(abi::init(opts, size, "opts")))
}

/// Creates a store at `location` (a folder, created if missing, or `s3://BUCKET/PREFIX`)
/// and opens it into `*out`: encrypted with the passphrase (`passphrase_len` bytes) unless
/// `opts->encrypted` is false. `opts` NULL means the defaults; `s3` NULL too.
///
/// # Safety
/// `location` is a NUL-terminated string; `passphrase` is NULL or readable for
/// `passphrase_len` bytes; `opts` and `s3` NULL or initialised; `out` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_store_create(
    location: *const c_char,
    passphrase: *const u8,
    passphrase_len: usize,
    opts: *const bf_create_options,
    s3: *const bf_s3_options,
    out: *mut *mut bf_store,
) -> bf_result {
    boundary(|| {
        let location = ffi_arg!(str_arg(location, "location"))?;
        let pass = ffi_arg!(bytes_arg(passphrase, passphrase_len, "passphrase"))?;
        let o = ffi_arg!(abi::read(opts, "opts"))?;
        let s3 = ffi_arg!(s3_options(s3))?;
        if out.is_null() {
            return Err(error::null("out"));
        }
        match (o.encrypted, pass) {
            (true, None) => {
                return Err(Fail::Engine(blockferry::Error::config(
                    "an encrypted store needs a passphrase",
                )));
            }
            (false, Some(_)) => {
                return Err(invalid("an unencrypted store takes no passphrase"));
            }
            _ => {}
        }
        let init = InitOptions {
            chunk_size: if o.chunk_size == 0 {
                blockferry::DEFAULT_CHUNK_SIZE
            } else {
                o.chunk_size
            },
            passphrase: pass.map(<[u8]>::to_vec),
        };
        init.check()?;
        let backend = blockferry::open_backend(location, true, &s3)?;
        blockferry::Store::init_client(backend.as_ref(), &init, None)?;
        let store = blockferry::Store::open_client(backend, pass, None)?;
        ffi_arg!(box_out(out, bf_store { store }, "out"))
    })
}

/// Opens the store at `location` into `*out`, unlocking it with the passphrase (NULL for
/// an unencrypted store; `BF_RESULT_CREDENTIALS` if it does not unlock, or if a passphrase is
/// given for an unencrypted store). The store is checked against this client's record of it
/// in the default state folder (`BLOCKFERRY_STATE_DIR`, else under `$HOME`): a store whose id
/// or encryption changed under the client is refused (`BF_RESULT_CORRUPT`).
///
/// # Safety
/// As `bf_store_create`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_store_open(
    location: *const c_char,
    passphrase: *const u8,
    passphrase_len: usize,
    s3: *const bf_s3_options,
    out: *mut *mut bf_store,
) -> bf_result {
    boundary(|| {
        let location = ffi_arg!(str_arg(location, "location"))?;
        let pass = ffi_arg!(bytes_arg(passphrase, passphrase_len, "passphrase"))?;
        let s3 = ffi_arg!(s3_options(s3))?;
        if out.is_null() {
            return Err(error::null("out"));
        }
        let backend = blockferry::open_backend(location, false, &s3)?;
        let store = blockferry::Store::open_client(backend, pass, None)?;
        ffi_arg!(box_out(out, bf_store { store }, "out"))
    })
}

/// Frees a store (NULL is ignored). No call on it may be running.
///
/// # Safety
/// `store` is NULL or from `bf_store_open`/`bf_store_create`, freed once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_store_free(store: *mut bf_store) {
    // SAFETY: forwarded contract.
    unsafe { free_box(store) };
}

/// Aborts an unfinished job's uploads in its store and forgets it (a finished job is just
/// forgotten); `job` is its id or a unique prefix.
///
/// # Safety
/// `job` NUL-terminated; `state_dir` NULL or NUL-terminated; `s3` NULL or initialised.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bf_abandon_job(
    job: *const c_char,
    state_dir: *const c_char,
    s3: *const bf_s3_options,
) -> bf_result {
    boundary(|| {
        let job = ffi_arg!(str_arg(job, "job"))?;
        let dir = ffi_arg!(opt_str_arg(state_dir, "state_dir"))?;
        let s3 = ffi_arg!(s3_options(s3))?;
        let dir = match dir {
            Some(d) => d.into(),
            None => default_state_dir()?,
        };
        JobDb::open(&dir)?.abandon_job(job, &s3)?;
        Ok(())
    })
}
