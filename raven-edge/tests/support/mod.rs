//! Helpers shared by the process-level tests: `ip` commands, sibling
//! binaries, and processes ended by PID.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

/// Runs `ip ARGS`; returns success and the combined output.
pub fn ip(args: &[&str]) -> (bool, String) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Runs `ip ARGS` and fails the test if it fails.
pub fn must(args: &[&str]) {
    let (ok, out) = ip(args);
    assert!(ok, "ip {args:?}: {out}");
}

/// The sibling binary `name` in the target directory of this test.
pub fn sibling(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let p = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace` (cargo test --workspace does)",
        p.display()
    );
    p
}

/// A process this test started; ended (SIGTERM) and reaped on drop, by PID.
pub struct Proc(pub Child);

impl Proc {
    /// Sends `signal` and reaps the process.
    pub fn stop(mut self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).unwrap_or(0));
        let _ = nix::sys::signal::kill(pid, signal);
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).unwrap_or(0));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        let _ = self.0.wait();
    }
}

/// Starts `exe ARGS` inside network namespace `ns`, logging (info) to
/// `log`.
pub fn spawn_in(ns: &str, exe: &Path, args: &[String], log: &Path) -> Proc {
    let log = std::fs::File::create(log).expect("log");
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(exe)
        .args(args)
        .env("RUST_LOG", "info")
        // Plain `key=value` fields in the log, for the tests to match.
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn");
    Proc(child)
}

/// Arguments of `raven-hub serve` from `manifests` with its certificates and
/// state under `dir`, gRPC on `grpc_addr`, the rest on loopback.
pub fn hub_args(manifests: &str, dir: &Path, grpc_addr: &str) -> Vec<String> {
    let p = |s: &str| dir.join(s).to_string_lossy().into_owned();
    [
        "serve",
        "--manifests",
        manifests,
        "--certs",
        &p("certs"),
        "--data-dir",
        &p("hub-data"),
        "--grpc-addr",
        grpc_addr,
        "--plaintext-addr",
        "127.0.0.1:10271",
        "--http-addr",
        "127.0.0.1:10272",
        "--heartbeat",
        "1s",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Arguments of `raven-edge run` for `node` with its state in `data` and its
/// certificate bundle under `dir` (`certs/nodes/<node>`), following `hub` (whose certificate names
/// `server_name`), with fast resync and heartbeats; `extra` is appended.
pub fn agent_args(
    node: &str,
    data: &Path,
    dir: &Path,
    hub: &str,
    server_name: &str,
    extra: &[&str],
) -> Vec<String> {
    // The node's bundle only, as on a real node: the CA key stays behind.
    let certs = dir
        .join("certs")
        .join("nodes")
        .join(node)
        .to_string_lossy()
        .into_owned();
    let data = data.to_string_lossy().into_owned();
    let mut args: Vec<String> = [
        "run",
        "--node",
        node,
        "--data-dir",
        &data,
        "--hub",
        hub,
        "--hub-server-name",
        server_name,
        "--certs",
        &certs,
        "--http-addr",
        "127.0.0.1:10273",
        "--resync",
        "1s",
        "--heartbeat",
        "1s",
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

/// Whether this test can run: root, and every tool of `tools` runs. Without
/// them the test is skipped — unless `RAVEN_REQUIRE_TOOLS` is set (CI), where
/// that is a failure.
pub fn root_with(tools: &[&str]) -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| Command::new(t).arg("--version").output().is_err())
        .collect();
    let ok = root && missing.is_empty();
    if !ok {
        let why = format!(
            "needs root{}{} (root: {root})",
            if missing.is_empty() { "" } else { " and " },
            missing.join(", ")
        );
        assert!(
            std::env::var_os("RAVEN_REQUIRE_TOOLS").is_none(),
            "{why}; RAVEN_REQUIRE_TOOLS is set"
        );
        eprintln!("skipped: {why}");
    }
    ok
}

/// Runs `f` on a thread that entered network namespace `ns` (sockets,
/// netlink connections and child processes it makes live there).
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let fd = std::fs::File::open(&path).expect("open netns");
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("namespace thread")
    })
}

/// Runs the future `make` builds to completion on a current-thread runtime,
/// in a thread that entered network namespace `ns`. The future is built in
/// that thread, so it need not be `Send`.
pub fn block_on_in<T: Send, F: std::future::Future<Output = T>>(
    ns: &str,
    make: impl FnOnce() -> F + Send,
) -> T {
    in_netns(ns, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(make())
    })
}
