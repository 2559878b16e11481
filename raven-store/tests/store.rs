//! raven-store against real sled files: atomic commits, crash safety under
//! SIGKILL, corruption and foreign-store detection, schema refusal, size bound.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use raven_store::{Commit, Meta, Store, StoreError, StoreOptions, StoredResource};

fn opts(purpose: &str) -> StoreOptions {
    StoreOptions {
        purpose: purpose.into(),
        ..Default::default()
    }
}

fn open(dir: &Path) -> Store {
    let o = Store::open(dir, opts("raven-edge/test")).expect("open");
    assert!(
        o.recovery.is_none(),
        "unexpected recovery: {:?}",
        o.recovery
    );
    o.store
}

/// The content written at revision `n`: 3 resources whose payload names `n`.
fn commit_for(n: u64) -> Commit {
    let put = (0..3)
        .map(|i| {
            (
                format!("gateway/gw-{i}"),
                StoredResource {
                    version: format!("v{n}"),
                    payload: Bytes::from(format!("rev {n} res {i} {}", "x".repeat(200))),
                },
            )
        })
        .collect();
    Commit {
        meta: Meta {
            epoch: "e1".into(),
            revision: n,
            complete: true,
            written_at_unix_ms: n,
        },
        put,
        remove: BTreeSet::new(),
    }
}

#[test]
fn committed_state_survives_reopen_and_removes_remove() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    {
        let s = open(&path);
        s.commit(commit_for(1)).expect("commit");
        let mut c = commit_for(2);
        c.put.remove("gateway/gw-2");
        c.remove.insert("gateway/gw-2".into());
        s.commit(c).expect("commit");
        s.put_records(&[("hub/addresses", b"a,b")])
            .expect("records");
    }
    let s = open(&path);
    let snap = s.snapshot().expect("snapshot");
    assert_eq!(snap.meta.as_ref().map(|m| m.revision), Some(2));
    assert_eq!(
        snap.resources.keys().cloned().collect::<Vec<_>>(),
        vec!["gateway/gw-0", "gateway/gw-1"]
    );
    assert_eq!(snap.resources["gateway/gw-0"].version, "v2");
    assert_eq!(
        s.get_record("hub/addresses").expect("get").as_deref(),
        Some(&b"a,b"[..])
    );
    assert_eq!(s.get_record("nope").expect("get"), None);
}

/// Child side of the SIGKILL test: commits revisions 1, 2, 3, … forever and
/// prints "committed N" after each commit returned.
#[test]
fn child_writer_for_kill_test() {
    let Ok(dir) = std::env::var("RAVEN_STORE_KILL_CHILD") else {
        return;
    };
    let s = open(Path::new(&dir));
    let start = s
        .snapshot()
        .ok()
        .and_then(|x| x.meta)
        .map_or(0, |m| m.revision);
    for n in start + 1.. {
        s.commit(commit_for(n)).expect("commit");
        println!("committed {n}");
    }
}

#[test]
fn kill_9_during_writes_leaves_exactly_the_last_complete_revision() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    let exe = std::env::current_exe().expect("test binary");
    for round in 0..4u64 {
        let mut child = Command::new(&exe)
            .args([
                "child_writer_for_kill_test",
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
        let mut lines = BufReader::new(stdout).lines();
        let mut last_committed = 0;
        let run_for = Duration::from_millis(150 + 97 * round);
        let started = Instant::now();
        while started.elapsed() < run_for {
            match lines.next() {
                Some(Ok(l)) => {
                    if let Some(n) = l.strip_prefix("committed ") {
                        last_committed = n.trim().parse().expect("number");
                    }
                }
                _ => break,
            }
        }
        child.kill().expect("SIGKILL the child we started");
        child.wait().expect("reap");
        assert!(
            last_committed > 0,
            "child committed nothing in round {round}"
        );

        let s = open(&path);
        let snap = s.snapshot().expect("snapshot");
        let meta = snap.meta.expect("meta");
        assert!(
            meta.revision >= last_committed,
            "revision {} < acknowledged {last_committed}",
            meta.revision
        );
        let want = commit_for(meta.revision);
        assert_eq!(
            snap.resources, want.put,
            "resources are not exactly revision {}",
            meta.revision
        );
    }
}

#[test]
fn flipped_bytes_are_detected_and_the_store_is_moved_aside() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    {
        let s = open(&path);
        s.commit(commit_for(7)).expect("commit");
        let mut raw = Vec::new();
        // A framed value with one payload byte flipped.
        raw.extend_from_slice(b"RVS1");
        raw.extend_from_slice(&1u16.to_le_bytes());
        raw.extend_from_slice(&crc32fast::hash(b"\x02\x00v7hello").to_le_bytes());
        raw.extend_from_slice(&9u32.to_le_bytes());
        raw.extend_from_slice(b"\x02\x00v7hellp");
        s.corrupt_resource_for_tests("gateway/gw-1", &raw)
            .expect("corrupt");
    }
    let opened = Store::open(&path, opts("raven-edge/test")).expect("open recovers");
    let rec = opened.recovery.expect("recovery reported");
    let reason = rec.reason.to_string();
    assert!(
        reason.contains("resource gateway/gw-1") && reason.contains("checksum"),
        "{reason}"
    );
    assert!(
        rec.moved_to.exists(),
        "the bad store is kept for inspection"
    );
    assert_eq!(
        opened.store.snapshot().expect("snapshot"),
        raven_store::Snapshot::default()
    );
}

#[test]
fn torn_value_is_detected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    {
        let s = open(&path);
        s.commit(commit_for(1)).expect("commit");
        s.corrupt_resource_for_tests("gateway/gw-0", b"RVS1\x01\x00\x00\x00")
            .expect("corrupt");
    }
    let opened = Store::open(&path, opts("raven-edge/test")).expect("open");
    assert!(
        opened
            .recovery
            .expect("recovered")
            .reason
            .to_string()
            .contains("shorter than the frame header")
    );
}

#[test]
fn foreign_store_is_moved_aside() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    Store::open(&path, opts("raven-hub")).expect("hub store");
    let opened = Store::open(&path, opts("raven-edge/test")).expect("open");
    let rec = opened.recovery.expect("foreign store detected");
    assert!(
        matches!(rec.reason, StoreError::Foreign { .. }),
        "{}",
        rec.reason
    );
}

#[test]
fn newer_schema_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    {
        let s = open(&path);
        let mut raw = Vec::new();
        raw.extend_from_slice(b"RVS1");
        raw.extend_from_slice(&9u16.to_le_bytes());
        raw.extend_from_slice(&crc32fast::hash(b"\x00\x00").to_le_bytes());
        raw.extend_from_slice(&2u32.to_le_bytes());
        raw.extend_from_slice(b"\x00\x00");
        s.commit(commit_for(1)).expect("commit");
        s.corrupt_resource_for_tests("gateway/gw-0", &raw)
            .expect("write newer value");
    }
    let err = Store::open(&path, opts("raven-edge/test")).expect_err("refused");
    assert!(
        matches!(
            err,
            StoreError::UnsupportedSchema {
                found: 9,
                supported: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("newer"));
    assert!(path.exists(), "a newer store is never moved aside");
}

#[test]
fn commit_over_the_size_bound_fails_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Store::open(
        &dir.path().join("store"),
        StoreOptions {
            max_bytes: 1000,
            ..opts("raven-edge/test")
        },
    )
    .expect("open")
    .store;
    s.commit(commit_for(1)).expect("fits");
    let mut big = commit_for(2);
    big.put.insert(
        "gateway/huge".into(),
        StoredResource {
            version: "v".into(),
            payload: Bytes::from(vec![0u8; 2000]),
        },
    );
    assert!(matches!(s.commit(big), Err(StoreError::TooLarge { .. })));
    assert_eq!(
        s.snapshot().expect("snap").meta.map(|m| m.revision),
        Some(1)
    );
}

#[test]
fn read_only_snapshot_reads_without_changing_anything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    open(&path).commit(commit_for(3)).expect("commit");
    let snap = Store::open_read_only_snapshot(&path, "raven-edge/test").expect("read");
    assert_eq!(snap.meta.map(|m| m.revision), Some(3));
    assert!(matches!(
        Store::open_read_only_snapshot(&path, "other"),
        Err(StoreError::Foreign { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn any_sequence_of_commits_reopens_to_the_model(ops in proptest::collection::vec(
        (proptest::collection::btree_map("[a-d]", "[a-z]{0,8}", 0..4), proptest::collection::btree_set("[a-d]", 0..3)),
        1..8,
    )) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        let mut model: BTreeMap<String, StoredResource> = BTreeMap::new();
        {
            let s = open(&path);
            for (rev, (puts, removes)) in ops.iter().enumerate() {
                let removes: BTreeSet<String> = removes.iter().filter(|r| !puts.contains_key(*r)).cloned().collect();
                let put: BTreeMap<String, StoredResource> = puts
                    .iter()
                    .map(|(k, v)| (k.clone(), StoredResource { version: v.clone(), payload: Bytes::from(v.clone().into_bytes()) }))
                    .collect();
                for r in &removes { model.remove(r); }
                model.extend(put.clone());
                let meta = Meta { epoch: "e".into(), revision: rev as u64 + 1, complete: true, written_at_unix_ms: 0 };
                s.commit(Commit { meta, put, remove: removes }).expect("commit");
            }
        }
        let snap = open(&path).snapshot().expect("snapshot");
        prop_assert_eq!(snap.resources, model);
        prop_assert_eq!(snap.meta.map(|m| m.revision), Some(ops.len() as u64));
    }
}
