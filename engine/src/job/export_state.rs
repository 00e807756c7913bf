//! The job database's record of exports to object storage: each export job's target, plan
//! and multipart upload with the parts the store acknowledged (so that a killed export
//! continues), and, once done, the object's ETag (so that a later delta export can trust it
//! as its base).

use rusqlite::{OptionalExtension, params};

use super::state::{
    JobDb, JobKey, JobKind, JobRecord, JobSource, db_err, i64_of, insert_job, u64_of,
};
use crate::error::Result;
use crate::store::{Part, now_unix_ms};

/// An export job's own record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExportJob {
    /// `s3://bucket/key`.
    pub(crate) target: String,
    /// The format's name.
    pub(crate) format: String,
    /// The snapshot exported (its full id).
    pub(crate) snapshot: String,
    /// What the parts are (sizes, copies, the base): a run with another plan starts anew.
    pub(crate) plan: String,
    /// The multipart upload, once started.
    pub(crate) upload_id: Option<String>,
    /// The finished object's ETag.
    pub(crate) etag: Option<String>,
    /// The finished object's size.
    pub(crate) size: u64,
}

impl JobDb {
    /// Records a new export job of `key` (its `source` is the target's URL).
    pub(crate) fn create_export(&self, key: &JobKey, export: &ExportJob) -> Result<JobRecord> {
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(|e| db_err("recording the export", e))?;
        let id = insert_job(&tx, key, &JobSource::default(), JobKind::Export, None)?;
        tx.execute(
            "INSERT INTO exports (job, target, format, snapshot, plan) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                id,
                export.target,
                export.format,
                export.snapshot,
                export.plan
            ],
        )
        .map_err(|e| db_err("recording the export", e))?;
        tx.commit().map_err(|e| db_err("recording the export", e))?;
        self.get(&id)
    }

    /// The unfinished export of this store's snapshot to `target` in `format`, if any.
    pub(crate) fn find_export(
        &self,
        store_id: &str,
        target: &str,
        format: &str,
        snapshot: &str,
    ) -> Result<Option<(JobRecord, ExportJob)>> {
        let id: Option<String> = self
            .conn
            .query_row(
                "SELECT jobs.id FROM jobs JOIN exports ON exports.job = jobs.id \
                 WHERE jobs.store_id = ?1 AND exports.target = ?2 AND exports.format = ?3 \
                 AND exports.snapshot = ?4 AND jobs.state = 'active' \
                 ORDER BY jobs.created_ms DESC LIMIT 1",
                params![store_id, target, format, snapshot],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| db_err("finding the export", e))?;
        match id {
            Some(id) => Ok(Some((self.get(&id)?, self.export(&id)?))),
            None => Ok(None),
        }
    }

    /// The newest finished export of this store to `target` in `format`.
    pub(crate) fn last_export(
        &self,
        store_id: &str,
        target: &str,
        format: &str,
    ) -> Result<Option<ExportJob>> {
        let id: Option<String> = self
            .conn
            .query_row(
                "SELECT jobs.id FROM jobs JOIN exports ON exports.job = jobs.id \
                 WHERE jobs.store_id = ?1 AND exports.target = ?2 AND exports.format = ?3 \
                 AND jobs.state = 'done' ORDER BY jobs.updated_ms DESC LIMIT 1",
                params![store_id, target, format],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| db_err("finding the last export", e))?;
        id.map(|id| self.export(&id)).transpose()
    }

    /// An export job's own record.
    pub(crate) fn export(&self, job: &str) -> Result<ExportJob> {
        self.conn
            .query_row(
                "SELECT target, format, snapshot, plan, upload_id, etag, size FROM exports \
                 WHERE job = ?1",
                params![job],
                |r| {
                    Ok(ExportJob {
                        target: r.get(0)?,
                        format: r.get(1)?,
                        snapshot: r.get(2)?,
                        plan: r.get(3)?,
                        upload_id: r.get(4)?,
                        etag: r.get(5)?,
                        size: u64_of(r.get(6)?),
                    })
                },
            )
            .map_err(|e| db_err("reading the export", e))
    }

    /// Records the upload an export job started, under its plan (forgetting the parts of
    /// any earlier upload).
    pub(crate) fn set_export_upload(&self, job: &str, plan: &str, upload_id: &str) -> Result<()> {
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(|e| db_err("recording the upload", e))?;
        tx.execute("DELETE FROM export_parts WHERE job = ?1", params![job])
            .map_err(|e| db_err("recording the upload", e))?;
        tx.execute(
            "UPDATE exports SET plan = ?2, upload_id = ?3 WHERE job = ?1",
            params![job, plan, upload_id],
        )
        .map_err(|e| db_err("recording the upload", e))?;
        tx.commit().map_err(|e| db_err("recording the upload", e))
    }

    /// Records a part the store acknowledged, and the bytes sent for it (0 for a copy).
    pub(crate) fn record_export_part(&self, job: &str, part: &Part, sent: u64) -> Result<()> {
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(|e| db_err("recording a part", e))?;
        tx.execute(
            "INSERT OR REPLACE INTO export_parts (job, number, size, etag, crc32c) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![job, part.number, i64_of(part.size), part.etag, part.crc32c],
        )
        .map_err(|e| db_err("recording a part", e))?;
        tx.execute(
            "UPDATE jobs SET bytes_sent = bytes_sent + ?2, updated_ms = ?3 WHERE id = ?1",
            params![job, i64_of(sent), i64_of(now_unix_ms())],
        )
        .map_err(|e| db_err("recording a part", e))?;
        tx.commit().map_err(|e| db_err("recording a part", e))
    }

    /// The parts recorded for an export job's upload, by number.
    pub(crate) fn export_parts(&self, job: &str) -> Result<Vec<Part>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT number, size, etag, crc32c FROM export_parts WHERE job = ?1 \
                 ORDER BY number",
            )
            .map_err(|e| db_err("reading parts", e))?;
        let rows = stmt
            .query_map(params![job], |r| {
                Ok(Part {
                    number: r.get(0)?,
                    size: u64_of(r.get(1)?),
                    etag: r.get(2)?,
                    crc32c: r.get(3)?,
                })
            })
            .map_err(|e| db_err("reading parts", e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| db_err("reading parts", e))
    }

    /// Abandons an unfinished export: aborts its upload of the target object (reached with
    /// `s3`) and forgets it. Fails if a process is running it.
    pub(crate) fn abandon_export(&self, job: &str, s3: &crate::store::S3Options) -> Result<()> {
        let lock = self.lock(job)?;
        let export = self.export(job)?;
        let (target, key) = crate::store::s3::S3Store::open_object(&export.target, s3)?;
        if let Some(upload) = export.upload_id.as_deref().filter(|u| !u.is_empty()) {
            crate::store::ObjectStore::abort_upload(&target, &key, upload)?;
        }
        // Staging objects of a delta export's parts, and their uploads (a minute's slack for
        // clocks that differ).
        let since = self.get(job)?.created_unix_ms.saturating_sub(60_000);
        crate::pipeline::export::sweep_staging(&target, &key, since)?;
        self.delete(job)?;
        drop(lock);
        Ok(())
    }

    /// Marks an export done: its object now has `etag` and `size` bytes.
    pub(crate) fn finish_export(&self, job: &str, etag: &str, size: u64) -> Result<()> {
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(|e| db_err("finishing the export", e))?;
        tx.execute(
            "UPDATE exports SET etag = ?2, size = ?3, upload_id = NULL WHERE job = ?1",
            params![job, etag, i64_of(size)],
        )
        .map_err(|e| db_err("finishing the export", e))?;
        tx.execute(
            "UPDATE jobs SET state = 'done', snapshot = (SELECT snapshot FROM exports \
             WHERE job = ?1), last_error = NULL, updated_ms = ?2 WHERE id = ?1",
            params![job, i64_of(now_unix_ms())],
        )
        .map_err(|e| db_err("finishing the export", e))?;
        tx.execute("DELETE FROM export_parts WHERE job = ?1", params![job])
            .map_err(|e| db_err("finishing the export", e))?;
        tx.commit().map_err(|e| db_err("finishing the export", e))
    }
}
