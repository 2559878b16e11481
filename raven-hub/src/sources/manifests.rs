//! The manifest-directory source: the YAML files of a directory, re-read when
//! they change. The standalone mode and the embedded default use it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use raven_core::manifest;

/// A manifest directory could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestDirError {
    #[error("reading manifest directory {path}: {source}")]
    ReadDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Reads every `*.yaml`/`*.yml` file of `dir` (not recursive), sorted by
/// name. An unreadable file becomes a problem report, not a failure.
pub fn read_dir(dir: &Path) -> Result<manifest::Loaded, ManifestDirError> {
    let (sources, unreadable) = read_files(dir)?;
    let mut loaded = manifest::load(&sources);
    loaded.problems.extend(unreadable);
    loaded.problems.sort();
    Ok(loaded)
}

type Files = (Vec<(String, String)>, Vec<raven_core::Problem>);

fn read_files(dir: &Path) -> Result<Files, ManifestDirError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ManifestDirError::ReadDir {
        path: dir.to_owned(),
        source,
    })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    paths.sort();
    let mut sources = Vec::new();
    let mut unreadable = Vec::new();
    for p in paths {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match std::fs::read_to_string(&p) {
            Ok(text) => sources.push((name, text)),
            Err(e) => unreadable.push(raven_core::Problem::error(
                name,
                "",
                "",
                format!("cannot read file: {e}"),
            )),
        }
    }
    Ok((sources, unreadable))
}

/// A watched manifest directory that remembers the last good contents of
/// every file: while a file is broken (it does not parse, or a document in
/// it cannot be read), the objects of its last good version keep being
/// served and the breakage is reported.
#[derive(Debug)]
pub struct DirSource {
    dir: PathBuf,
    last_good: std::collections::BTreeMap<String, String>,
}

impl DirSource {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            last_good: Default::default(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads the directory now.
    pub fn load(&mut self) -> Result<manifest::Loaded, ManifestDirError> {
        let (files, mut problems) = read_files(&self.dir)?;
        let mut used = Vec::new();
        let mut good = std::collections::BTreeMap::new();
        for (name, text) in files {
            let alone = manifest::load(&[(name.clone(), text.clone())]);
            let broken = alone
                .problems
                .iter()
                .any(|p| p.severity == raven_core::Severity::Error);
            match (broken, self.last_good.get(&name)) {
                (true, Some(previous)) => {
                    problems.push(raven_core::Problem::error(
                        name.clone(),
                        "",
                        "",
                        "this file has errors (see the problems that name it); serving its last good version",
                    ));
                    problems.extend(alone.problems);
                    good.insert(name.clone(), previous.clone());
                    used.push((name, previous.clone()));
                }
                _ => {
                    if !broken {
                        good.insert(name.clone(), text.clone());
                    }
                    used.push((name, text));
                }
            }
        }
        self.last_good = good;
        let mut loaded = manifest::load(&used);
        loaded.problems.extend(problems);
        loaded.problems.sort();
        loaded.problems.dedup();
        Ok(loaded)
    }
}

/// A fingerprint of the directory: names, sizes, modification times and a
/// hash of the contents, so that any write is noticed — also one that keeps
/// the size and lands within the file system's timestamp granularity.
pub fn fingerprint(dir: &Path) -> Vec<(String, u64, Option<std::time::SystemTime>, u64)> {
    use std::hash::{Hash, Hasher};
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let md = e.metadata().ok()?;
            let mut h = std::collections::hash_map::DefaultHasher::new();
            std::fs::read(e.path()).ok()?.hash(&mut h);
            Some((
                e.file_name().to_string_lossy().into_owned(),
                md.len(),
                md.modified().ok(),
                h.finish(),
            ))
        })
        .collect();
    out.sort();
    out
}

/// How often the directory is polled for changes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
