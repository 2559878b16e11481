//! The head file: `<dir>/raven-head`, one framed u64 LE — the number of the
//! last write (commit or `put_records`) that was made durable.
//!
//! sled truncates its log at the first damaged entry and opens what came
//! before without an error, so a flipped byte on disk silently rolls the
//! store back. The head file is replaced (temp file, fsync, rename, fsync of
//! the directory) after every sled flush; at open, sled must hold at least
//! that many writes, or the store is reported as rolled back.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

use crate::StoreError;
use crate::frame::{self, SCHEMA_VERSION};

pub(crate) const HEAD_FILE: &str = "raven-head";
pub(crate) const HEAD_TMP: &str = "raven-head.tmp";

/// The acknowledged write count, or `None` if there is no head file.
/// `files` is where the store's files are, `shown` the directory errors name.
pub(crate) fn read(files: &Path, shown: &Path) -> Result<Option<u64>, StoreError> {
    let raw = match fs::read(files.join(HEAD_FILE)) {
        Ok(raw) => raw,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StoreError::Io {
                path: shown.join(HEAD_FILE),
                source,
            });
        }
    };
    let corrupt = |reason: String| StoreError::Corrupt {
        path: shown.to_owned(),
        what: format!("head file {HEAD_FILE}"),
        reason,
    };
    let framed = frame::unframe(&raw).map_err(|e| corrupt(e.to_string()))?;
    if framed.schema != SCHEMA_VERSION {
        return Err(corrupt(format!(
            "schema version {} in a schema {SCHEMA_VERSION} store",
            framed.schema
        )));
    }
    frame::decode_seq(framed.body).map(Some).map_err(corrupt)
}

/// Durably records that write `seq` has been made durable.
pub(crate) fn write(files: &Path, shown: &Path, seq: u64) -> Result<(), StoreError> {
    let io_err = |source| StoreError::Io {
        path: shown.join(HEAD_FILE),
        source,
    };
    let framed = frame::frame(&seq.to_le_bytes())
        .ok_or_else(|| io_err(io::ErrorKind::InvalidData.into()))?;
    let tmp = files.join(HEAD_TMP);
    let mut f = File::create(&tmp).map_err(io_err)?;
    f.write_all(&framed).map_err(io_err)?;
    f.sync_all().map_err(io_err)?;
    drop(f);
    fs::rename(&tmp, files.join(HEAD_FILE)).map_err(io_err)?;
    File::open(files).and_then(|d| d.sync_all()).map_err(io_err)
}
