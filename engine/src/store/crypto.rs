//! Keys and sealing for store format v1 (docs/FORMAT.md, "Keys" and "Sealed records").
//!
//! One random 32-byte master key per store. Everything else is derived from it with
//! HKDF-SHA256 (salt = the store id): the chunk-id key (keyed blake3), the page-id key,
//! the metadata key, and a data root from which each pack gets its own key (salt = pack id).
//! Every encryption uses a fresh random 96-bit nonce under a key that seals at most one
//! pack's worth of records, far below AES-GCM's random-nonce limit.
//!
//! In an unencrypted store the same record layout is kept, with a zero nonce and, in place of
//! the tag, the first 16 bytes of a blake3 checksum over AAD and payload, so corruption is
//! still detected.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

use crate::error::{Error, ErrorKind, Result};
use crate::store::format::RecordBuf;

/// Length of every key in the store.
pub const KEY_LEN: usize = 32;
/// Length of the nonce field of a sealed record.
pub const NONCE_BYTES: usize = NONCE_LEN;
/// Length of the tag (or checksum) field of a sealed record.
pub const TAG_BYTES: usize = 16;

/// Fills a fixed-size array from the operating system's secure random source.
pub fn random<const N: usize>() -> Result<[u8; N]> {
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| Error::internal("the system random number generator failed"))?;
    Ok(out)
}

struct OkmLen(usize);

impl hkdf::KeyType for OkmLen {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-SHA256(salt, ikm) expanded with `info` to 32 bytes.
pub fn derive(ikm: &[u8; KEY_LEN], salt: &[u8], info: &str) -> [u8; KEY_LEN] {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(ikm);
    let info = [info.as_bytes()];
    let mut out = [0u8; KEY_LEN];
    prk.expand(&info, OkmLen(KEY_LEN))
        .and_then(|okm| okm.fill(&mut out))
        .expect("HKDF-SHA256 can always expand 32 bytes");
    out
}

/// Argon2id parameters for the passphrase key, stored in the store config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KdfParams {
    /// Memory cost in KiB.
    pub m_kib: u32,
    /// Iterations.
    pub t: u32,
    /// Parallelism.
    pub p: u32,
}

impl KdfParams {
    /// The defaults for new stores: OWASP's recommended Argon2id setting (19 MiB, 2 passes).
    pub const DEFAULT: KdfParams = KdfParams {
        m_kib: 19 * 1024,
        t: 2,
        p: 1,
    };
    /// Refuse configs asking for more than this much KDF memory (a hostile config file must
    /// not make us allocate gigabytes).
    const MAX_M_KIB: u32 = 4 * 1024 * 1024;
    const MAX_T: u32 = 64;
}

/// Derives the key-encryption key from a passphrase.
pub fn passphrase_key(passphrase: &[u8], salt: &[u8], params: KdfParams) -> Result<[u8; KEY_LEN]> {
    if params.m_kib > KdfParams::MAX_M_KIB || params.t > KdfParams::MAX_T || params.p != 1 {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "store config asks for unsupported key derivation parameters (m={} KiB, t={}, p={})",
                params.m_kib, params.t, params.p
            ),
        )
        .with_object("config"));
    }
    let argon_params = argon2::Params::new(params.m_kib, params.t, params.p, Some(KEY_LEN))
        .map_err(|e| Error::corrupt("config", format!("invalid argon2 parameters: {e}")))?;
    let argon = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon_params,
    );
    let mut out = [0u8; KEY_LEN];
    argon
        .hash_password_into(passphrase, salt, &mut out)
        .map_err(|e| Error::corrupt("config", format!("deriving the passphrase key: {e}")))?;
    Ok(out)
}

fn aes_key(key: &[u8; KEY_LEN]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("32 bytes is an AES-256 key"))
}

/// Seals records in the v1 layout `header | nonce | payload | tag`, encrypted (AES-256-GCM)
/// or checksummed (unencrypted stores).
pub struct Sealer {
    key: Option<LessSafeKey>,
    /// Whether opening an unencrypted record checks its checksum (see
    /// [`Sealer::plaintext_proven`]).
    check_sum: bool,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("encrypted", &self.key.is_some())
            .field("check_sum", &self.check_sum)
            .finish()
    }
}

/// A record failed authentication (wrong key, or a flipped bit).
#[derive(Debug)]
pub struct Unauthentic;

impl Sealer {
    /// An AES-256-GCM sealer under `key`.
    pub fn encrypting(key: &[u8; KEY_LEN]) -> Sealer {
        Sealer {
            key: Some(aes_key(key)),
            check_sum: true,
        }
    }

    /// A checksum-only sealer for unencrypted stores.
    pub fn checksumming() -> Sealer {
        Sealer {
            key: None,
            check_sum: true,
        }
    }

    /// This sealer for a caller that proves an unencrypted record's plaintext itself (by the
    /// keyed hash it is named by): opening skips the record's checksum, which would prove the
    /// same bytes a second time (and, unkeyed, proves nothing against a writer of the store).
    /// An encrypted record is authenticated all the same.
    #[must_use]
    pub fn plaintext_proven(self) -> Sealer {
        Sealer {
            check_sum: false,
            ..self
        }
    }

    /// Whether records are encrypted.
    pub fn encrypts(&self) -> bool {
        self.key.is_some()
    }

    /// Seals `buf[nonce_at + NONCE_BYTES..]` in place and appends the tag.
    ///
    /// `buf[..nonce_at]` is the record header (the caller includes it in `aad` as it needs),
    /// `buf[nonce_at..nonce_at + NONCE_BYTES]` is overwritten with the nonce.
    pub fn seal<B: RecordBuf + ?Sized>(
        &self,
        aad: &[u8],
        buf: &mut B,
        nonce_at: usize,
    ) -> Result<()> {
        let payload_at = nonce_at + NONCE_BYTES;
        let end = buf.len();
        assert!(end >= payload_at, "record buffer holds header and nonce");
        let rec = buf.grow(TAG_BYTES);
        let tag: [u8; TAG_BYTES] = if let Some(key) = &self.key {
            let nonce_bytes: [u8; NONCE_BYTES] = random()?;
            rec[nonce_at..payload_at].copy_from_slice(&nonce_bytes);
            let tag = key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce_bytes),
                    Aad::from(aad),
                    &mut rec[payload_at..end],
                )
                .map_err(|_| Error::internal("AES-GCM sealing failed"))?;
            tag.as_ref()
                .try_into()
                .map_err(|_| Error::internal("AES-GCM tag of an unexpected length"))?
        } else {
            rec[nonce_at..payload_at].fill(0);
            checksum(aad, &rec[payload_at..end])
        };
        rec[end..].copy_from_slice(&tag);
        Ok(())
    }

    /// Authenticates and opens a sealed record in place; returns the plaintext payload.
    pub fn open<'a>(
        &self,
        aad: &[u8],
        record: &'a mut [u8],
        nonce_at: usize,
    ) -> Result<&'a mut [u8], Unauthentic> {
        let payload_at = nonce_at + NONCE_BYTES;
        if record.len() < payload_at + TAG_BYTES {
            return Err(Unauthentic);
        }
        if let Some(key) = &self.key {
            let nonce: [u8; NONCE_BYTES] = record[nonce_at..payload_at]
                .try_into()
                .map_err(|_| Unauthentic)?;
            key.open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut record[payload_at..],
            )
            .map(|plain| &mut *plain)
            .map_err(|_| Unauthentic)
        } else {
            let tag_at = record.len() - TAG_BYTES;
            if record[nonce_at..payload_at] != [0; NONCE_BYTES]
                || (self.check_sum
                    && checksum(aad, &record[payload_at..tag_at])[..] != record[tag_at..])
            {
                return Err(Unauthentic);
            }
            Ok(&mut record[payload_at..tag_at])
        }
    }
}

fn checksum(aad: &[u8], payload: &[u8]) -> [u8; TAG_BYTES] {
    let mut h = blake3::Hasher::new_derive_key("blockferry v1 unencrypted record checksum");
    h.update(&(aad.len() as u64).to_le_bytes());
    h.update(aad);
    h.update(payload);
    let mut out = [0u8; TAG_BYTES];
    out.copy_from_slice(&h.finalize().as_bytes()[..TAG_BYTES]);
    out
}

/// The keys of an unlocked store, all derived from the master key.
pub struct Keys {
    chunk_id: [u8; KEY_LEN],
    page_id: [u8; KEY_LEN],
    data_root: [u8; KEY_LEN],
    meta: [u8; KEY_LEN],
    config_mac: [u8; KEY_LEN],
    disk_name: [u8; KEY_LEN],
    encrypted: bool,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("encrypted", &self.encrypted)
            .finish_non_exhaustive()
    }
}

impl Keys {
    /// Derives every key of a store from its master key and id.
    pub fn derive(master: &[u8; KEY_LEN], store_id: &[u8], encrypted: bool) -> Keys {
        Keys {
            chunk_id: derive(master, store_id, "blockferry v1 chunk id"),
            page_id: derive(master, store_id, "blockferry v1 page id"),
            data_root: derive(master, store_id, "blockferry v1 data"),
            meta: derive(master, store_id, "blockferry v1 metadata"),
            config_mac: derive(master, store_id, "blockferry v2 config"),
            disk_name: derive(master, store_id, "blockferry v2 disk name"),
            encrypted,
        }
    }

    /// HMAC-SHA256 of a store config's canonical bytes (format 2): what authenticates it.
    pub fn config_mac(&self, canonical: &[u8]) -> [u8; 32] {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.config_mac);
        let tag = ring::hmac::sign(&key, canonical);
        tag.as_ref().try_into().expect("HMAC-SHA256 is 32 bytes")
    }

    /// Whether `mac` authenticates `canonical` (compared in constant time).
    pub fn config_mac_ok(&self, canonical: &[u8], mac: &[u8]) -> bool {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.config_mac);
        ring::hmac::verify(&key, canonical, mac).is_ok()
    }

    /// The 8-byte keyed hash a disk's name goes by in object keys (format 2), so that keys
    /// do not show disk names.
    pub fn disk_key(&self, name: &str) -> [u8; 8] {
        let h = blake3::keyed_hash(&self.disk_name, name.as_bytes());
        h.as_bytes()[..8].try_into().expect("8 bytes")
    }

    /// The keyed-blake3 id of a chunk's plaintext.
    pub fn chunk_id(&self, data: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.chunk_id, data).as_bytes()
    }

    /// The keyed-blake3 id of a manifest page's plaintext.
    pub fn page_id(&self, data: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.page_id, data).as_bytes()
    }

    /// The sealer for the records of one pack.
    pub fn pack_sealer(&self, pack_id: &[u8]) -> Sealer {
        if self.encrypted {
            Sealer::encrypting(&derive(&self.data_root, pack_id, "blockferry v1 pack"))
        } else {
            Sealer::checksumming()
        }
    }

    /// A fingerprint of the master key, for reports: the first 16 bytes (hex) of a key
    /// derived from it for this purpose only, so it tells keys apart and reveals nothing.
    pub fn fingerprint(&self) -> String {
        crate::store::format::hex(
            &blake3::keyed_hash(&self.meta, b"blockferry v2 key fingerprint").as_bytes()[..16],
        )
    }

    /// The sealer for metadata objects (index, pages, snapshots, audit records).
    pub fn meta_sealer(&self) -> Sealer {
        if self.encrypted {
            Sealer::encrypting(&self.meta)
        } else {
            Sealer::checksumming()
        }
    }
}

/// Wraps the master key under a key-encryption key: `nonce | ciphertext | tag`.
pub fn wrap_key(kek: &[u8; KEY_LEN], master: &[u8; KEY_LEN], aad: &[u8]) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; NONCE_BYTES];
    buf.extend_from_slice(master);
    Sealer::encrypting(kek).seal(aad, &mut buf, 0)?;
    Ok(buf)
}

/// Unwraps the master key; fails with [`ErrorKind::Credentials`] on a wrong passphrase.
pub fn unwrap_key(kek: &[u8; KEY_LEN], wrapped: &[u8], aad: &[u8]) -> Result<[u8; KEY_LEN]> {
    let mut buf = wrapped.to_vec();
    let plain = Sealer::encrypting(kek)
        .open(aad, &mut buf, 0)
        .map_err(|_| {
            Error::new(
                ErrorKind::Credentials,
                "wrong passphrase: it does not unlock this store's key",
            )
        })?;
    plain
        .try_into()
        .map_err(|_| Error::corrupt("config", "wrapped master key has the wrong length"))
}

#[cfg(test)]
mod tests;
