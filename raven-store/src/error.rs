//! What can go wrong, named for what failed and carrying the path or key.

use std::path::PathBuf;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed for a reason that says nothing about the files' content.
    #[error("store {path}: {source}")]
    Sled { path: PathBuf, source: sled::Error },

    /// Another process (or another handle in this one) has the store open.
    #[error("store {path} is in use by another process (is an agent already running?)")]
    Locked { path: PathBuf },

    /// A value, a sled file or the relation between values is damaged.
    #[error("store {path}: {what} is corrupt: {reason}")]
    Corrupt {
        path: PathBuf,
        /// What is damaged: `resource gateway/gw-1`, `meta record`, `sled files`, …
        what: String,
        reason: String,
    },

    /// The store was created for another purpose (another node, or the hub).
    #[error("store {path} was created for {found:?}, not {expected:?}")]
    Foreign {
        path: PathBuf,
        found: String,
        expected: String,
    },

    /// The store holds fewer writes than were acknowledged: sled dropped
    /// durable data (it truncates its log at the first damaged entry).
    #[error(
        "store {path} lost acknowledged writes: it holds write #{holds}, but write #{acknowledged} had been made durable"
    )]
    RolledBack {
        path: PathBuf,
        holds: u64,
        acknowledged: u64,
    },

    /// The store was written by a newer raven-store. It is left untouched so
    /// that a downgrade does not destroy a newer agent's cache.
    #[error(
        "store {path} was written by raven-store schema version {found}, newer than the version {supported} this build supports; refusing to use or move it — run a newer raven, or move the directory away by hand to start empty"
    )]
    UnsupportedSchema {
        path: PathBuf,
        found: u16,
        supported: u16,
    },

    /// sled's own files are of another sled version or configuration
    /// (checksummed, so not damage). Left untouched, like a newer schema.
    #[error(
        "store {path} was written by an incompatible sled engine: {reason}; refusing to use or move it"
    )]
    IncompatibleEngine { path: PathBuf, reason: String },

    /// The write would make the payload bytes exceed `max_bytes`.
    #[error(
        "store {path}: the write would hold {would_hold} payload bytes, more than the limit of {limit}; nothing was written"
    )]
    TooLarge {
        path: PathBuf,
        would_hold: u64,
        limit: u64,
    },

    /// A value cannot be framed (a version string longer than 65535 bytes,
    /// a body longer than 4 GiB).
    #[error("store {path}: {key}: cannot be stored: {reason}")]
    Unencodable {
        path: PathBuf,
        key: String,
        reason: String,
    },

    /// Renaming an unusable store aside failed; nothing was opened.
    #[error("moving the unusable store {from} aside to {to}: {source}")]
    MoveAside {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },

    /// A file operation outside sled (the head file, copying for a
    /// read-only snapshot, a file where the directory should be) failed.
    #[error("store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl StoreError {
    /// Whether `open` answers this error by moving the store aside and
    /// starting empty. Errors that say nothing about the store's content
    /// (locks, I/O) and stores of a newer version are never moved.
    pub fn moves_store_aside(&self) -> bool {
        matches!(
            self,
            Self::Corrupt { .. } | Self::Foreign { .. } | Self::RolledBack { .. }
        )
    }
}
