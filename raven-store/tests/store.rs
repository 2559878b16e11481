//! raven-store against real sled files in temporary directories: atomic,
//! durable commits; crash safety under SIGKILL; damaged, rolled-back,
//! foreign and newer stores; the size bound; read-only inspection.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use proptest::prelude::*;
use raven_store::{Commit, Meta, Snapshot, Store, StoreError, StoreOptions, StoredResource};

const PURPOSE: &str = "raven-edge/node-a";

fn opts(purpose: &str) -> StoreOptions {
    StoreOptions {
        purpose: purpose.into(),
        ..Default::default()
    }
}

/// Opens a store that must not need recovery.
fn open(dir: &Path) -> Store {
    let o = Store::open(dir, opts(PURPOSE)).expect("open");
    assert!(
        o.recovery.is_none(),
        "unexpected recovery: {:?}",
        o.recovery
    );
    o.store
}

/// The resources of revision `n`: a subset of six names that changes with
/// `n`, each with a payload naming `n` (so a mixed state cannot pass).
fn resources_at(n: u64) -> BTreeMap<String, StoredResource> {
    (0..6u64)
        .filter(|i| !(n + i).is_multiple_of(3))
        .map(|i| {
            (
                format!("gateway/gw-{i}"),
                StoredResource {
                    version: format!("v{n}"),
                    payload: Bytes::from(format!(
                        "rev {n} res {i} {}",
                        "x".repeat(100 + (n % 50) as usize)
                    )),
                },
            )
        })
        .collect()
}

fn meta_at(n: u64) -> Meta {
    Meta {
        epoch: "e1".into(),
        revision: n,
        complete: true,
        written_at_unix_ms: n,
    }
}

/// The commit that turns revision `n - 1` into revision `n`.
fn commit_for(n: u64) -> Commit {
    let put = resources_at(n);
    let remove = (0..6)
        .map(|i| format!("gateway/gw-{i}"))
        .filter(|k| !put.contains_key(k))
        .collect();
    Commit {
        meta: meta_at(n),
        put,
        remove,
    }
}

fn snapshot_at(n: u64) -> Snapshot {
    Snapshot {
        meta: Some(meta_at(n)),
        resources: resources_at(n),
    }
}

/// A value framed as the store frames it, at any schema.
fn framed(schema: u16, body: &[u8]) -> Vec<u8> {
    let mut v = b"RVS1".to_vec();
    v.extend_from_slice(&schema.to_le_bytes());
    v.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    v.extend_from_slice(&u32::try_from(body.len()).expect("len").to_le_bytes());
    v.extend_from_slice(body);
    v
}

/// sled itself on `dir`. A handle just dropped releases sled's file lock
/// only once its flusher thread has ended, so a lock held is waited for
/// (as `Store::open` does), up to a few seconds.
fn sled_open(dir: &Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match sled::open(dir) {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r.expect("sled open"),
        }
    }
}

/// Writes behind the store's back, through sled itself.
fn with_sled(dir: &Path, f: impl FnOnce(&sled::Db)) {
    let db = sled_open(dir);
    f(&db);
    db.flush().expect("sled flush");
}

/// Every key and value of every tree, read through sled.
fn dump(dir: &Path) -> BTreeMap<(Vec<u8>, Vec<u8>), Vec<u8>> {
    let db = sled_open(dir);
    let mut out = BTreeMap::new();
    for name in db.tree_names() {
        let tree = db.open_tree(&name).expect("tree");
        for kv in tree.iter() {
            let (k, v) = kv.expect("entry");
            out.insert((name.to_vec(), k.to_vec()), v.to_vec());
        }
    }
    out
}

/// Every file under `dir` and its bytes.
fn fingerprint(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).expect("read_dir") {
            let e = e.expect("entry");
            if e.file_type().expect("type").is_dir() {
                walk(root, &e.path(), out);
            } else {
                let rel = e.path().strip_prefix(root).expect("prefix").to_owned();
                out.insert(rel, std::fs::read(e.path()).expect("read"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let target = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).expect("copy");
        }
    }
}

/// Siblings of `dir` whose names start with `<dir name>.corrupt-`.
fn moved_aside_copies(dir: &Path) -> Vec<PathBuf> {
    let prefix = format!(
        "{}.corrupt-",
        dir.file_name().expect("name").to_string_lossy()
    );
    let parent = dir.parent().expect("parent");
    std::fs::read_dir(parent)
        .expect("read_dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
        })
        .collect()
}

/// Opens a damaged store: it must be moved aside intact, reported, and
/// replaced by an empty, usable store. Returns the reason.
fn open_expecting_recovery(path: &Path) -> StoreError {
    let opened = Store::open(path, opts(PURPOSE)).expect("open recovers");
    let rec = opened.recovery.expect("recovery reported");
    assert!(rec.moved_to.is_dir(), "the damaged store is kept");
    assert!(
        fingerprint(&rec.moved_to).contains_key(Path::new("db")),
        "the moved store holds sled's files"
    );
    assert_eq!(
        opened.store.snapshot().expect("snapshot"),
        Snapshot::default()
    );
    opened
        .store
        .commit(commit_for(1))
        .expect("the fresh store works");
    rec.reason
}

#[test]
fn commit_then_reopen_returns_the_same_snapshot_and_removes_remove() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    {
        let s = open(&path);
        assert_eq!(s.snapshot().expect("snapshot"), Snapshot::default());
        s.commit(commit_for(1)).expect("commit 1");
        s.commit(commit_for(2)).expect("commit 2");
        assert_eq!(s.snapshot().expect("snapshot"), snapshot_at(2));
    }
    let snap = open(&path).snapshot().expect("snapshot");
    assert_eq!(snap, snapshot_at(2));
    // gw-1 is in revision 1 and removed by revision 2.
    assert!(resources_at(1).contains_key("gateway/gw-1"));
    assert!(!snap.resources.contains_key("gateway/gw-1"));
}

#[test]
fn records_round_trip_and_are_replaced_atomically() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    {
        let s = open(&path);
        s.put_records(&[
            ("hub/revision", b"{\"revision\":1}"),
            ("edge/last-hub", b"a:1"),
        ])
        .expect("put");
        s.put_records(&[("hub/revision", b"{\"revision\":2}")])
            .expect("put");
    }
    let s = open(&path);
    assert_eq!(
        s.get_record("hub/revision").expect("get").as_deref(),
        Some(&b"{\"revision\":2}"[..])
    );
    assert_eq!(
        s.get_record("edge/last-hub").expect("get").as_deref(),
        Some(&b"a:1"[..])
    );
    assert_eq!(s.get_record("never/written").expect("get"), None);
    // Records are not resources and leave the snapshot alone.
    assert_eq!(s.snapshot().expect("snapshot"), Snapshot::default());
}

#[test]
fn clones_share_one_store_and_concurrent_writes_stay_consistent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    let s = open(&path);
    let threads: Vec<_> = (0..2u8)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                for i in 0..10u64 {
                    let mut c = Commit {
                        meta: meta_at(u64::from(t) * 100 + i),
                        ..Default::default()
                    };
                    c.put.insert(
                        format!("t{t}/r{i}"),
                        StoredResource {
                            version: "v".into(),
                            payload: Bytes::from(vec![t; 10]),
                        },
                    );
                    s.commit(c).expect("commit");
                    s.put_records(&[(&format!("t{t}"), &i.to_le_bytes())])
                        .expect("record");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    drop(s);
    let s = open(&path);
    assert_eq!(s.snapshot().expect("snapshot").resources.len(), 20);
    assert_eq!(
        s.get_record("t1").expect("get").as_deref(),
        Some(&9u64.to_le_bytes()[..])
    );
}

/// Child side of the SIGKILL test: commits revisions N+1, N+2, … forever
/// and prints "committed N" after each commit has returned.
#[test]
fn kill_test_child_writer() {
    let Ok(dir) = std::env::var("RAVEN_STORE_KILL_CHILD") else {
        return; // run as an ordinary test: nothing to do
    };
    let opened = Store::open(Path::new(&dir), opts(PURPOSE)).expect("child open");
    if let Some(r) = opened.recovery {
        println!("recovered {}", r.reason);
        return;
    }
    let s = opened.store;
    let start = s
        .snapshot()
        .expect("child snapshot")
        .meta
        .map_or(0, |m| m.revision);
    for n in start + 1.. {
        s.commit(commit_for(n)).expect("child commit");
        println!("committed {n}");
    }
}

#[test]
fn kill_9_during_a_stream_of_commits_leaves_exactly_one_complete_revision() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    let exe = std::env::current_exe().expect("test binary");
    let mut seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .subsec_nanos()
        | 1;
    let note = |line: String, reported: &mut u64| {
        assert!(!line.starts_with("recovered"), "child: {line}");
        if let Some(n) = line.strip_prefix("committed ") {
            *reported = n.trim().parse().expect("revision number");
        }
    };
    let mut previous = 0;
    for round in 0..5 {
        // xorshift: a kill point that differs from run to run.
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        let run_for = Duration::from_millis(u64::from(seed % 250));

        let mut child = Command::new(&exe)
            .args([
                "kill_test_child_writer",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("RAVEN_STORE_KILL_CHILD", &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Wait for the first commit, then kill at a random point.
        let mut reported = 0u64;
        let deadline = Instant::now() + Duration::from_secs(10);
        while reported == 0 {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => note(line, &mut reported),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("round {round}: the child committed nothing ({e})");
                }
            }
        }
        std::thread::sleep(run_for);
        child.kill().expect("SIGKILL the child");
        let status = child.wait().expect("reap the child");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "round {round}: the child ended before the kill: {status}"
        );
        reader.join().expect("reader");
        // Lines printed before the kill count too: each was acknowledged.
        for line in rx.try_iter() {
            note(line, &mut reported);
        }

        let snap = open(&path).snapshot().expect("snapshot after kill -9");
        let revision = snap.meta.as_ref().expect("meta").revision;
        assert!(
            revision >= reported,
            "round {round}: the store holds revision {revision}, but {reported} was acknowledged"
        );
        assert!(revision > previous, "round {round}: no progress");
        assert_eq!(
            snap,
            snapshot_at(revision),
            "round {round}: not exactly revision {revision} (killed after {run_for:?})"
        );
        previous = revision;
    }
}

#[test]
fn a_value_with_flipped_bytes_is_detected_by_key_and_the_store_moved_aside() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    open(&path).commit(commit_for(7)).expect("commit");
    with_sled(&path, |db| {
        let tree = db.open_tree("resources").expect("tree");
        let mut v = tree
            .get("gateway/gw-0")
            .expect("get")
            .expect("present")
            .to_vec();
        let last = v.len() - 1;
        v[last] ^= 0x01;
        tree.insert("gateway/gw-0", v).expect("insert");
    });
    let reason = open_expecting_recovery(&path).to_string();
    assert!(
        reason.contains("resource gateway/gw-0") && reason.contains("checksum mismatch"),
        "{reason}"
    );
    assert_eq!(moved_aside_copies(&path).len(), 1);
}

#[test]
fn a_torn_value_is_detected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    open(&path).commit(commit_for(1)).expect("commit");
    with_sled(&path, |db| {
        let tree = db.open_tree("resources").expect("tree");
        let v = tree.get("gateway/gw-1").expect("get").expect("present");
        tree.insert("gateway/gw-1", &v[..v.len() - 3])
            .expect("insert");
    });
    let reason = open_expecting_recovery(&path).to_string();
    assert!(
        reason.contains("resource gateway/gw-1") && reason.contains("torn"),
        "{reason}"
    );
}

#[test]
fn a_well_framed_resource_from_another_commit_is_detected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    open(&path).commit(commit_for(1)).expect("commit");
    with_sled(&path, |db| {
        let tree = db.open_tree("resources").expect("tree");
        tree.insert("gateway/gw-1", framed(1, b"\x02\x00v9stale payload"))
            .expect("insert");
    });
    let reason = open_expecting_recovery(&path).to_string();
    assert!(
        reason.contains("resource gateway/gw-1")
            && reason.contains("not what the last commit wrote"),
        "{reason}"
    );
}

#[test]
fn a_resource_no_commit_listed_is_detected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    open(&path).commit(commit_for(1)).expect("commit");
    with_sled(&path, |db| {
        let tree = db.open_tree("resources").expect("tree");
        tree.insert("gateway/stray", framed(1, b"\x01\x00vx"))
            .expect("insert");
    });
    let reason = open_expecting_recovery(&path).to_string();
    assert!(
        reason.contains("resource gateway/stray") && reason.contains("not listed"),
        "{reason}"
    );
}

#[test]
fn flipped_bytes_in_sled_files_never_panic_and_are_never_silently_used() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base");
    {
        let s = open(&base);
        for n in 1..=20 {
            s.commit(commit_for(n)).expect("commit");
        }
        s.put_records(&[("hub/revision", b"20")]).expect("record");
    }
    let files: Vec<PathBuf> = fingerprint(&base).into_keys().collect();
    let mut detected = 0;
    let mut cases = 0;
    for file in &files {
        let len = std::fs::metadata(base.join(file)).expect("stat").len() as usize;
        let offsets: BTreeSet<usize> = (0..24)
            .map(|i| i * len / 24 + i % 7)
            .filter(|o| *o < len)
            .collect();
        for offset in offsets {
            cases += 1;
            let path = dir.path().join(format!("case-{cases}"));
            copy_dir(&base, &path);
            let mut bytes = std::fs::read(path.join(file)).expect("read");
            bytes[offset] ^= 0x5a;
            std::fs::write(path.join(file), bytes).expect("write");

            let opened = Store::open(&path, opts(PURPOSE))
                .unwrap_or_else(|e| panic!("{file:?}@{offset}: open failed: {e}"));
            match opened.recovery {
                Some(rec) => {
                    detected += 1;
                    assert!(rec.moved_to.is_dir(), "{file:?}@{offset}");
                    assert_eq!(
                        opened.store.snapshot().expect("snapshot"),
                        Snapshot::default()
                    );
                }
                // Unused bytes: the store must be exactly what was written.
                None => {
                    assert_eq!(
                        opened.store.snapshot().expect("snapshot"),
                        snapshot_at(20),
                        "{file:?}@{offset} was silently used"
                    );
                    assert_eq!(
                        opened
                            .store
                            .get_record("hub/revision")
                            .expect("record")
                            .as_deref(),
                        Some(&b"20"[..]),
                        "{file:?}@{offset}"
                    );
                }
            }
            drop(opened.store);
            let _ = std::fs::remove_dir_all(&path);
        }
    }
    assert!(
        detected * 2 > cases,
        "only {detected} of {cases} flips were detected"
    );
}

#[test]
fn a_store_that_lost_acknowledged_writes_is_reported_as_rolled_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    let old = dir.path().join("old-sled-files");
    {
        let s = open(&path);
        s.commit(commit_for(1)).expect("commit");
        drop(s);
        copy_dir(&path, &old);
        let s = open(&path);
        for n in 2..=5 {
            s.commit(commit_for(n)).expect("commit");
        }
    }
    // sled's files go back to revision 1 (as when sled truncates its log);
    // the head file still says what was acknowledged.
    std::fs::remove_file(old.join("raven-head")).expect("rm");
    copy_dir(&old, &path);
    let reason = open_expecting_recovery(&path);
    assert!(
        matches!(
            reason,
            StoreError::RolledBack {
                holds: 1,
                acknowledged: 5,
                ..
            }
        ),
        "{reason}"
    );
}

#[test]
fn a_used_store_without_its_head_file_is_detected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    open(&path).commit(commit_for(1)).expect("commit");
    std::fs::remove_file(path.join("raven-head")).expect("rm");
    let reason = open_expecting_recovery(&path).to_string();
    assert!(reason.contains("head file"), "{reason}");
}

#[test]
fn a_foreign_store_is_moved_aside_with_both_purposes_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    Store::open(&path, opts("raven-hub"))
        .expect("hub store")
        .store
        .put_records(&[("hub/revision", b"1")])
        .expect("record");
    let reason = open_expecting_recovery(&path);
    assert!(
        matches!(&reason, StoreError::Foreign { found, expected, .. } if found == "raven-hub" && expected == PURPOSE),
        "{reason}"
    );
    let text = reason.to_string();
    assert!(
        text.contains("raven-hub") && text.contains(PURPOSE),
        "{text}"
    );
}

#[test]
fn a_newer_schema_is_refused_and_the_directory_left_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    open(&path).commit(commit_for(3)).expect("commit");
    // What a future raven-store (schema 2) would have written.
    with_sled(&path, |db| {
        let body =
            format!(r#"{{"schema":2,"purpose":"{PURPOSE}","created_at_unix_ms":1,"new":true}}"#);
        db.insert("format", framed(2, body.as_bytes()))
            .expect("insert");
    });
    let before = dump(&path);

    let err = Store::open(&path, opts(PURPOSE)).expect_err("refused");
    assert!(
        matches!(
            err,
            StoreError::UnsupportedSchema {
                found: 2,
                supported: 1,
                ..
            }
        ),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("newer") && text.contains("refusing"),
        "{text}"
    );
    assert!(matches!(
        Store::open_read_only_snapshot(&path, PURPOSE),
        Err(StoreError::UnsupportedSchema { found: 2, .. })
    ));
    assert!(
        moved_aside_copies(&path).is_empty(),
        "a newer store is never moved"
    );
    assert_eq!(dump(&path), before, "nor changed");
}

#[test]
fn a_newer_schema_number_on_one_value_of_a_current_store_is_damage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    open(&path).commit(commit_for(3)).expect("commit");
    with_sled(&path, |db| {
        let tree = db.open_tree("resources").expect("tree");
        let mut v = tree
            .get("gateway/gw-1")
            .expect("get")
            .expect("present")
            .to_vec();
        v[5] ^= 0x80; // the high byte of the schema field
        tree.insert("gateway/gw-1", v).expect("insert");
    });
    let reason = open_expecting_recovery(&path).to_string();
    assert!(
        reason.contains("resource gateway/gw-1") && reason.contains("schema version"),
        "{reason}"
    );
}

#[test]
fn an_older_schema_without_a_migration_is_moved_aside() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    open(&path).commit(commit_for(3)).expect("commit");
    with_sled(&path, |db| {
        let body = format!(r#"{{"schema":0,"purpose":"{PURPOSE}","created_at_unix_ms":1}}"#);
        db.insert("format", framed(0, body.as_bytes()))
            .expect("insert");
    });
    let reason = open_expecting_recovery(&path).to_string();
    assert!(reason.contains("no migration"), "{reason}");
}

#[test]
fn a_store_of_another_sled_version_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    open(&path).commit(commit_for(3)).expect("commit");
    let conf = std::fs::read(path.join("conf")).expect("conf");
    let text = String::from_utf8(conf[..conf.len() - 4].to_vec()).expect("utf-8");
    assert!(text.contains("version: 0.34"), "{text}");
    // A well-formed configuration of a sled that does not exist yet.
    let mut newer = text.replace("version: 0.34", "version: 0.99").into_bytes();
    newer.extend_from_slice(&crc32fast::hash(&newer).to_le_bytes());
    std::fs::write(path.join("conf"), newer).expect("write conf");
    let before = fingerprint(&path);

    let err = Store::open(&path, opts(PURPOSE)).expect_err("refused");
    assert!(
        matches!(err, StoreError::IncompatibleEngine { .. }),
        "{err}"
    );
    assert_eq!(fingerprint(&path), before);
    assert!(moved_aside_copies(&path).is_empty());
}

#[test]
fn a_file_where_the_store_should_be_is_an_error_not_a_recovery() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    std::fs::write(&path, b"not a store").expect("write");
    let err = Store::open(&path, opts(PURPOSE)).expect_err("refused");
    assert!(matches!(err, StoreError::Io { .. }), "{err}");
    assert_eq!(std::fs::read(&path).expect("read"), b"not a store");
    assert!(moved_aside_copies(&path).is_empty());
}

#[test]
fn a_commit_over_the_size_bound_fails_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    let small = StoreOptions {
        max_bytes: 2000,
        ..opts(PURPOSE)
    };
    {
        let s = Store::open(&path, small.clone()).expect("open").store;
        s.commit(commit_for(1)).expect("fits");
        let held = s.payload_bytes();
        let mut big = commit_for(2);
        big.put.insert(
            "gateway/huge".into(),
            StoredResource {
                version: "v".into(),
                payload: Bytes::from(vec![0u8; 2000]),
            },
        );
        let err = s.commit(big).expect_err("too large");
        assert!(
            matches!(err, StoreError::TooLarge { limit: 2000, would_hold, .. } if would_hold > 2000),
            "{err}"
        );
        let err = s
            .put_records(&[("big", &[0u8; 1600])])
            .expect_err("records count too");
        assert!(matches!(err, StoreError::TooLarge { .. }), "{err}");
        assert_eq!(s.snapshot().expect("snapshot"), snapshot_at(1));
        assert_eq!(s.payload_bytes(), held);
        // The same store still takes a commit that fits.
        s.commit(commit_for(2)).expect("fits");
    }
    let s = Store::open(&path, small).expect("reopen");
    assert!(s.recovery.is_none());
    assert_eq!(s.store.snapshot().expect("snapshot"), snapshot_at(2));
    assert_eq!(s.store.get_record("big").expect("get"), None);
}

#[test]
fn an_overlong_version_is_refused_not_truncated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(&dir.path().join("store"));
    let mut c = commit_for(1);
    c.put.insert(
        "gateway/long".into(),
        StoredResource {
            version: "v".repeat(70_000),
            payload: Bytes::new(),
        },
    );
    let err = s.commit(c).expect_err("refused");
    assert!(
        matches!(&err, StoreError::Unencodable { key, .. } if key.contains("gateway/long")),
        "{err}"
    );
    assert_eq!(s.snapshot().expect("snapshot"), Snapshot::default());
}

#[test]
fn a_store_in_use_is_reported_as_locked_and_never_moved_aside() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    let first = open(&path);
    first.commit(commit_for(1)).expect("commit");
    let err = Store::open(&path, opts(PURPOSE)).expect_err("locked");
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    assert!(moved_aside_copies(&path).is_empty());
    // Dropping the handle releases the lock at once.
    drop(first);
    assert_eq!(open(&path).snapshot().expect("snapshot"), snapshot_at(1));
}

#[test]
fn read_only_snapshot_changes_nothing_and_works_while_the_store_is_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    assert_eq!(
        Store::open_read_only_snapshot(&path, PURPOSE).expect("missing store"),
        Snapshot::default()
    );
    assert!(!path.exists(), "reading creates nothing");

    let s = open(&path);
    s.commit(commit_for(3)).expect("commit");
    let before = fingerprint(&path);
    let snap = Store::open_read_only_snapshot(&path, PURPOSE).expect("read while open");
    assert_eq!(snap, snapshot_at(3));
    assert_eq!(fingerprint(&path), before);
    drop(s);

    let before = fingerprint(&path);
    assert_eq!(
        Store::open_read_only_snapshot(&path, PURPOSE).expect("read"),
        snapshot_at(3)
    );
    assert!(matches!(
        Store::open_read_only_snapshot(&path, "raven-edge/other"),
        Err(StoreError::Foreign { .. })
    ));
    assert_eq!(fingerprint(&path), before);
}

#[test]
fn read_only_snapshot_reports_damage_and_moves_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    open(&path).commit(commit_for(3)).expect("commit");
    with_sled(&path, |db| {
        let tree = db.open_tree("resources").expect("tree");
        tree.insert("gateway/gw-1", &b"RVS1 garbage"[..])
            .expect("insert");
    });
    let before = fingerprint(&path);
    let err = Store::open_read_only_snapshot(&path, PURPOSE).expect_err("damage");
    assert!(
        matches!(&err, StoreError::Corrupt { path: p, what, .. } if p == &path && what == "resource gateway/gw-1"),
        "{err}"
    );
    assert_eq!(fingerprint(&path), before);
    assert!(moved_aside_copies(&path).is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn any_sequence_of_commits_reopens_to_the_model(ops in proptest::collection::vec(
        (
            proptest::collection::btree_map("[a-e]", ("[a-z0-9]{0,6}", proptest::collection::vec(any::<u8>(), 0..64)), 0..4),
            proptest::collection::btree_set("[a-e]", 0..3),
        ),
        1..8,
    )) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        let mut model: BTreeMap<String, StoredResource> = BTreeMap::new();
        {
            let s = open(&path);
            for (rev, (puts, remove)) in ops.iter().enumerate() {
                let put: BTreeMap<String, StoredResource> = puts
                    .iter()
                    .map(|(k, (version, payload))| (k.clone(), StoredResource { version: version.clone(), payload: Bytes::from(payload.clone()) }))
                    .collect();
                // Removes apply first, then puts.
                for r in remove {
                    model.remove(r);
                }
                model.extend(put.clone());
                let meta = Meta { epoch: "e".into(), revision: rev as u64 + 1, complete: rev.is_multiple_of(2), written_at_unix_ms: 0 };
                s.commit(Commit { meta, put, remove: remove.clone() }).expect("commit");
                prop_assert_eq!(&s.snapshot().expect("snapshot").resources, &model);
            }
        }
        let snap = open(&path).snapshot().expect("snapshot");
        prop_assert_eq!(snap.resources, model);
        prop_assert_eq!(snap.meta.map(|m| m.revision), Some(ops.len() as u64));
    }
}

/// A cluster-sized store: 1,000 resources of about 1.5 KB, as an edge
/// holds for 1,000 gateways.
fn big_resource(i: u64, change: u64) -> StoredResource {
    StoredResource {
        version: format!("v{change}"),
        payload: Bytes::from(format!("gw {i} change {change} {}", "p".repeat(1500))),
    }
}

#[test]
fn a_thousand_one_resource_changes_keep_the_store_bounded_and_every_commit_intact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    let s = open(&path);
    let all: BTreeMap<String, StoredResource> = (0..1000u64)
        .map(|i| (format!("gateway/gw-{i}"), big_resource(i, 0)))
        .collect();
    s.commit(Commit {
        meta: meta_at(0),
        put: all.clone(),
        remove: BTreeSet::new(),
    })
    .expect("first commit");
    let mut expect = all;
    let (mut largest, mut shrank, mut last) = (0u64, 0u32, s.disk_bytes());
    for change in 1..=1000u64 {
        let name = format!("gateway/gw-{}", change % 1000);
        let r = big_resource(change % 1000, change);
        expect.insert(name.clone(), r.clone());
        s.commit(Commit {
            meta: meta_at(change),
            put: BTreeMap::from([(name, r)]),
            remove: BTreeSet::new(),
        })
        .expect("commit");
        let now = s.disk_bytes();
        largest = largest.max(now);
        if now < last {
            shrank += 1;
        }
        last = now;
    }
    // Live data ~1.6 MB: the bound is the compaction budget (4 x live)
    // plus what one commit adds before it is checked.
    assert!(
        largest <= 10 << 20,
        "the files grew to {largest} bytes across 1,000 commits"
    );
    assert!(shrank > 0, "the store was compacted at least once");
    assert_eq!(
        s.snapshot().expect("snapshot").resources,
        expect,
        "the last commit, exactly"
    );
    drop(s);
    let reopened = open(&path);
    let snap = reopened.snapshot().expect("snapshot");
    assert_eq!(snap.resources, expect);
    assert_eq!(snap.meta.map(|m| m.revision), Some(1000));
    assert!(
        !path.with_file_name("store.compact").exists(),
        "no compaction leftover"
    );
}

#[test]
fn a_compaction_leftover_from_a_crash_is_deleted_at_open_and_the_store_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    {
        let s = open(&path);
        s.commit(commit_for(1)).expect("commit");
    }
    // A crash after the exchange leaves the old store beside the new one;
    // one before it leaves a partial copy. Either is garbage.
    let leftover = path.with_file_name("store.compact");
    copy_dir(&path, &leftover);
    std::fs::write(leftover.join("db"), b"torn").expect("write");
    let s = open(&path);
    assert_eq!(s.snapshot().expect("snapshot"), snapshot_at(1));
    assert!(!leftover.exists());
}
