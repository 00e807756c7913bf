//! The NBD protocol's numbers (the NBD project's `doc/proto.md`, fixed newstyle) and the
//! encoding of what the server sends. Everything is big-endian.

pub(super) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub(super) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub(super) const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub(super) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(super) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub(super) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub(super) const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub(super) const FLAG_NO_ZEROES: u16 = 1 << 1;
pub(super) const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
pub(super) const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub(super) const OPT_EXPORT_NAME: u32 = 1;
pub(super) const OPT_ABORT: u32 = 2;
pub(super) const OPT_LIST: u32 = 3;
pub(super) const OPT_STARTTLS: u32 = 5;
pub(super) const OPT_INFO: u32 = 6;
pub(super) const OPT_GO: u32 = 7;
pub(super) const OPT_STRUCTURED_REPLY: u32 = 8;
pub(super) const OPT_LIST_META_CONTEXT: u32 = 9;
pub(super) const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub(super) const REP_ACK: u32 = 1;
pub(super) const REP_SERVER: u32 = 2;
pub(super) const REP_INFO: u32 = 3;
pub(super) const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub(super) const REP_ERR_UNSUP: u32 = REP_ERR + 1;
pub(super) const REP_ERR_POLICY: u32 = REP_ERR + 2;
pub(super) const REP_ERR_INVALID: u32 = REP_ERR + 3;
pub(super) const REP_ERR_TLS_REQD: u32 = REP_ERR + 5;
pub(super) const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;

// Information types of NBD_OPT_INFO and NBD_OPT_GO.
pub(super) const INFO_EXPORT: u16 = 0;
pub(super) const INFO_NAME: u16 = 1;
pub(super) const INFO_DESCRIPTION: u16 = 2;
pub(super) const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub(super) const FLAG_HAS_FLAGS: u16 = 1;
pub(super) const FLAG_READ_ONLY: u16 = 1 << 1;
pub(super) const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub(super) const FLAG_SEND_DF: u16 = 1 << 7;
pub(super) const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub(super) const FLAG_SEND_CACHE: u16 = 1 << 10;

// Commands and their flags.
pub(super) const CMD_READ: u16 = 0;
pub(super) const CMD_WRITE: u16 = 1;
pub(super) const CMD_DISC: u16 = 2;
pub(super) const CMD_FLUSH: u16 = 3;
pub(super) const CMD_TRIM: u16 = 4;
pub(super) const CMD_CACHE: u16 = 5;
pub(super) const CMD_WRITE_ZEROES: u16 = 6;
pub(super) const CMD_BLOCK_STATUS: u16 = 7;
pub(super) const CMD_FLAG_DF: u16 = 1 << 2;
pub(super) const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub(super) const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Structured replies.
pub(super) const REPLY_FLAG_DONE: u16 = 1;
pub(super) const REPLY_TYPE_NONE: u16 = 0;
pub(super) const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub(super) const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub(super) const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub(super) const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// Block status of the base:allocation context.
pub(super) const STATE_HOLE: u32 = 1;
pub(super) const STATE_ZERO: u32 = 1 << 1;
/// The one metadata context served, and its id.
pub(super) const BASE_ALLOCATION: &str = "base:allocation";
pub(super) const BASE_ALLOCATION_ID: u32 = 1;

// Errors (the protocol's values, which are Linux's errno values).
pub(super) const EPERM: u32 = 1;
pub(super) const EIO: u32 = 5;
pub(super) const EINVAL: u32 = 22;
pub(super) const EOVERFLOW: u32 = 75;

/// The largest request served; `NBD_INFO_BLOCK_SIZE` says so.
pub(super) const MAX_REQUEST: u32 = 32 << 20;
/// The largest option a client may send (names and queries are at most 4096 bytes each).
pub(super) const MAX_OPTION: u32 = 64 << 10;

/// An option reply: header and data.
pub(super) fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(20 + data.len());
    m.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    m.extend_from_slice(data);
    m
}

/// A simple reply's header.
pub(super) fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    m[4..8].copy_from_slice(&error.to_be_bytes());
    m[8..16].copy_from_slice(&cookie.to_be_bytes());
    m
}

/// A structured reply chunk's header, for `len` bytes of payload.
pub(super) fn chunk_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut m = [0u8; 20];
    m[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    m[4..6].copy_from_slice(&flags.to_be_bytes());
    m[6..8].copy_from_slice(&kind.to_be_bytes());
    m[8..16].copy_from_slice(&cookie.to_be_bytes());
    m[16..20].copy_from_slice(&len.to_be_bytes());
    m
}

/// A request's header, as read.
#[derive(Debug, Clone, Copy)]
pub(super) struct Request {
    pub(super) flags: u16,
    pub(super) kind: u16,
    pub(super) cookie: u64,
    pub(super) offset: u64,
    pub(super) length: u32,
}

impl Request {
    /// Parses the 28 bytes of a request header; `None` for a wrong magic.
    pub(super) fn parse(b: &[u8; 28]) -> Option<Request> {
        let u16_at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| (u64::from(u32_at(i)) << 32) | u64::from(u32_at(i + 4));
        (u32_at(0) == REQUEST_MAGIC).then(|| Request {
            flags: u16_at(4),
            kind: u16_at(6),
            cookie: u64_at(8),
            offset: u64_at(16),
            length: u32_at(24),
        })
    }
}
