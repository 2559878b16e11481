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
