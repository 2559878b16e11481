//! Node identity without hand-made secrets: the agent presents the
//! kubelet's own client certificate — one PEM file holding certificate and
//! key, CN `system:node:<node>`, replaced by the kubelet when it rotates
//! (a new file, the `kubelet-client-current.pem` symlink moved to it) — and
//! the hub checks it against the cluster's CA (`--client-ca`). An agent with
//! an open stream moves to the rotated certificate make before break: a new
//! stream first (a resume: nothing resent, the dataplane untouched), then
//! the old one closed, the agent never counted as gone. Real `raven-hub`
//! and `raven-edge` processes, real mTLS over sockets, in a network
//! namespace made for the test. Needs root and openssl; skipped otherwise
//! unless `RAVEN_REQUIRE_TOOLS=1`.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{Proc, agent_args, hub_args, must, sibling, spawn_in};

const NODE: &str = "izbp15inok0kbfkg3in52sz";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A cluster CA `name` (`name.crt`, `name.key`) in `dir`.
fn cluster_ca(dir: &Path, name: &str) -> PathBuf {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
        ],
    );
    dir.join(format!("{name}.crt"))
}

/// What the kubelet writes when its client certificate is issued or
/// rotated: `kubelet-client-<stamp>.pem` (certificate, then its EC key),
/// mode 0600, and the `kubelet-client-current.pem` symlink moved onto it
/// with a rename. Signed by CA `ca`; returns the symlink.
fn kubelet_rotates(dir: &Path, ca: &str, stamp: &str) -> PathBuf {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/O=system:nodes/CN=system:node:{NODE}"),
            "-keyout",
            "node.key",
            "-out",
            "node.csr",
        ],
    );
    std::fs::write(
        dir.join("node.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
    )
    .expect("ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "node.csr",
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "node.ext",
            "-out",
            "node.crt",
        ],
    );
    openssl(dir, &["ec", "-in", "node.key", "-out", "node-ec.key"]);
    let mut pem = std::fs::read(dir.join("node.crt")).expect("crt");
    pem.extend(std::fs::read(dir.join("node-ec.key")).expect("key"));
    let file = dir.join(format!("kubelet-client-{stamp}.pem"));
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&file)
            .expect("pem");
        f.write_all(&pem).expect("write");
    }
    let current = dir.join("kubelet-client-current.pem");
    let tmp = dir.join(".kubelet-client-current.pem.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&file, &tmp).expect("symlink");
    std::fs::rename(&tmp, &current).expect("rename");
    current
}

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A namespace `<prefix><pid>` with loopback up; a directory holding
/// raven's own CA and the hub's serving certificate (`certs/`, no node
/// bundle) and an empty kubelet PKI directory (returned).
fn setup(prefix: &str) -> (Netns, tempfile::TempDir, PathBuf) {
    let ns = Netns(format!("{prefix}{}", std::process::id() % 100_000));
    must(&["netns", "add", &ns.0]);
    must(&["-n", &ns.0, "link", "set", "lo", "up"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let st = Command::new(sibling("raven-hub"))
        .args(["certs", "--out"])
        .arg(dir.path().join("certs"))
        .stdout(Stdio::null())
        .status()
        .expect("certs");
    assert!(st.success());
    let pki = dir.path().join("kubelet-pki");
    std::fs::create_dir_all(&pki).expect("pki");
    (ns, dir, pki)
}

/// The agent of `NODE` in `ns`, presenting the kubelet's certificate
/// `current` to the hub on 127.0.0.1:10270 (raven's CA in `d/certs`),
/// logging to `d/edge.log` (returned); `extra` flags appended.
fn kubelet_agent(ns: &Netns, d: &Path, current: &Path, extra: &[&str]) -> (Proc, PathBuf) {
    let log = d.join("edge.log");
    let hub_ca = d.join("certs/ca.pem").display().to_string();
    let mut flags = vec![
        "--client-cert",
        current.to_str().unwrap_or_default(),
        "--hub-ca",
        &hub_ca,
    ];
    flags.extend_from_slice(extra);
    let args = agent_args(
        NODE,
        &d.join("edge-data"),
        d,
        "https://127.0.0.1:10270",
        "localhost",
        &flags,
    );
    let agent = spawn_in(
        &ns.0,
        Path::new(env!("CARGO_BIN_EXE_raven-edge")),
        &args,
        &log,
    );
    (agent, log)
}

/// How many hub sessions the agent has opened so far (its log says
/// "connected to hub" once the TLS handshake and the stream succeeded).
fn sessions(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches("connected to hub")
        .count()
}

fn wait_sessions(log: &Path, at_least: usize, timeout: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if sessions(log) >= at_least {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn the_agent_presents_the_kubelets_rotated_client_certificate_from_its_next_connection() {
    if !support::root_with(&["openssl"]) {
        return;
    }
    let (ns, dir, pki) = setup("rvk");
    let d = dir.path();
    let old_ca = cluster_ca(&pki, "cluster-a");
    let new_ca = cluster_ca(&pki, "cluster-b");
    let current = kubelet_rotates(&pki, "cluster-a", "2026-12-01-00-00-00");

    let manifests = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/examples/user-manual"
    );
    let hub_trusting = |ca: &Path, log: &str| -> Proc {
        let mut args = hub_args(manifests, d, "127.0.0.1:10270");
        args.extend(["--client-ca".to_owned(), ca.display().to_string()]);
        spawn_in(&ns.0, &sibling("raven-hub"), &args, &d.join(log))
    };
    let hub = hub_trusting(&old_ca, "hub-1.log");
    let (_agent, agent_log) = kubelet_agent(&ns, d, &current, &["--dry-run"]);
    let log = || std::fs::read_to_string(&agent_log).unwrap_or_default();
    assert!(
        wait_sessions(&agent_log, 1, Duration::from_secs(20)),
        "the hub did not take the kubelet's certificate (cluster CA via --client-ca):\n{}",
        log()
    );

    // The cluster's CA changes under the hub (restarted trusting only the
    // new one): the old certificate is refused...
    hub.stop(nix::sys::signal::Signal::SIGKILL);
    let _hub = hub_trusting(&new_ca, "hub-2.log");
    let before = sessions(&agent_log);
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        sessions(&agent_log),
        before,
        "a certificate of the old CA was accepted:\n{}",
        log()
    );
    // ...and once the kubelet has rotated its certificate (same path, new
    // file behind it), the running agent's next connection presents it.
    let t = Instant::now();
    kubelet_rotates(&pki, "cluster-b", "2026-12-01-06-00-00");
    assert!(
        wait_sessions(&agent_log, before + 1, Duration::from_secs(20)),
        "the agent kept presenting the old certificate after the rotation:\n{}",
        log()
    );
    eprintln!(
        "rotated kubelet certificate in use {:?} after the rotation (the agent redials every ≤ 2 s)",
        t.elapsed()
    );
}

/// The serial of the certificate in `pem` as `openssl x509 -serial` prints
/// it (upper-case hex).
fn serial(pem: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(pem)
        .output()
        .expect("openssl");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("serial=")
        .trim_start_matches("00")
        .to_owned()
}

fn count(log: &Path, text: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(text))
        .count()
}

fn wait_line(log: &Path, parts: &[&str], timeout: Duration) -> Option<String> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if let Some(l) = std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .find(|l| parts.iter().all(|p| l.contains(p)))
        {
            return Some(l.to_owned());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn a_connected_agent_moves_to_the_kubelets_rotated_certificate_on_a_new_stream_before_closing_the_old()
 {
    if !support::root_with(&["openssl"]) {
        return;
    }
    let (ns, dir, pki) = setup("rvr");
    let d = dir.path();
    let ca = cluster_ca(&pki, "cluster");
    let current = kubelet_rotates(&pki, "cluster", "2026-12-01-00-00-00");
    let first_serial = serial(&current);

    let manifests = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/examples/user-manual"
    );
    let hub_log = d.join("hub.log");
    let mut args = hub_args(manifests, d, "127.0.0.1:10270");
    args.extend(["--client-ca".to_owned(), ca.display().to_string()]);
    let _hub = spawn_in(&ns.0, &sibling("raven-hub"), &args, &hub_log);
    let (_agent, agent_log) = kubelet_agent(&ns, d, &current, &[]);
    let logs = || {
        format!(
            "agent:\n{}\nhub:\n{}",
            std::fs::read_to_string(&agent_log).unwrap_or_default(),
            std::fs::read_to_string(&hub_log).unwrap_or_default()
        )
    };
    assert!(
        wait_line(
            &hub_log,
            &["agent connected", &format!("cert_serial={first_serial}")],
            Duration::from_secs(20)
        )
        .is_some(),
        "the hub did not see the kubelet's first certificate:\n{}",
        logs()
    );
    // Settled: the snapshot persisted and applied.
    assert!(
        wait_line(&agent_log, &["update persisted"], Duration::from_secs(20)).is_some(),
        "{}",
        logs()
    );
    std::thread::sleep(Duration::from_secs(2));
    let persisted = count(&agent_log, "update persisted");
    // The agent programs this namespace (no --dry-run): its first
    // reconcile changed the kernel, so a second one would show.
    let reconciled = count(&agent_log, "dataplane reconciled");
    assert!(reconciled >= 1, "{}", logs());
    // (Dials before the hub was up failed.)
    let ended = count(&agent_log, "hub session ended");

    // The kubelet rotates while the stream is open.
    let t = Instant::now();
    kubelet_rotates(&pki, "cluster", "2026-12-01-06-00-00");
    let second_serial = serial(&current);
    assert_ne!(first_serial, second_serial);
    let moved = wait_line(
        &agent_log,
        &["moved to the renewed client certificate"],
        Duration::from_secs(15),
    );
    assert!(
        moved.is_some(),
        "the agent did not move its open stream to the rotated certificate:\n{}",
        logs()
    );
    eprintln!(
        "open stream moved to the rotated certificate {:?} after the rotation",
        t.elapsed()
    );
    let connected = wait_line(
        &hub_log,
        &["agent connected", &format!("cert_serial={second_serial}")],
        Duration::from_secs(5),
    )
    .unwrap_or_else(|| panic!("the hub did not see the new certificate:\n{}", logs()));
    // A resume from what the agent holds, not a new snapshot.
    assert!(connected.contains("delta=true"), "{connected}");
    // The old stream was replaced by the new one — never seen as gone (no
    // "agent disconnected", which would start the failure detector).
    assert!(
        wait_line(
            &hub_log,
            &["replaced by a newer stream"],
            Duration::from_secs(5)
        )
        .is_some(),
        "{}",
        logs()
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(count(&hub_log, "agent disconnected"), 0, "{}", logs());
    assert_eq!(count(&agent_log, "hub session ended"), ended, "{}", logs());
    // Nothing resent beyond the resume, and the dataplane left alone.
    let text = std::fs::read_to_string(&agent_log).unwrap_or_default();
    let after: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("update persisted"))
        .skip(persisted)
        .collect();
    assert!(
        after
            .iter()
            .all(|l| l.contains("put=0") && l.contains("removed=0")),
        "the new stream resent topology: {after:?}"
    );
    assert_eq!(
        count(&agent_log, "dataplane reconciled"),
        reconciled,
        "the dataplane changed:\n{}",
        logs()
    );
}
