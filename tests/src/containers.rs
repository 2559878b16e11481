//! A lab node's agent run the way the Kubernetes manifests run it: the
//! `raven-edge` image in the node's network namespace (as `hostNetwork`),
//! with exactly the capabilities and devices the DaemonSets grant, and —
//! for userspace WireGuard — wireguard-go in containers of its own (the
//! `raven-wireguard` DaemonSet), which outlive the agent's.
//!
//! Images come from `deploy/images/build.sh`, built from the binaries this
//! lab runs (so they hold the code under test), tagged per run and removed
//! by name afterwards; the cached Debian bases stay. podman is driven with
//! runc, explicit rlimits and never its default network (it would create a
//! bridge and NAT rules on the host): every container joins a namespace the
//! lab made.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::lab::{Lab, LabError, output_of, ping_summary};

/// The images of one run, all tagged `tag`.
#[derive(Debug)]
pub struct Images {
    conf: PathBuf,
    tags: Vec<String>,
}

impl Images {
    /// Builds the hub, edge and wireguard-go images from the binaries in
    /// `binaries`, tagged `tag` (a `label` makes an otherwise identical
    /// image a distinct one: an "upgrade").
    pub fn build(binaries: &Path, tags: &[(&str, Option<&str>)]) -> Result<Self, LabError> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/images/build.sh");
        let conf = PathBuf::from(output_of(Command::new(&script).arg("--print-conf"))?.trim());
        let mut images = Self {
            conf,
            tags: Vec::new(),
        };
        for (tag, label) in tags {
            let mut args = vec![
                "--binaries".to_owned(),
                binaries.display().to_string(),
                "--tag".to_owned(),
                (*tag).to_owned(),
            ];
            if let Some(l) = label {
                args.extend(["--label".to_owned(), (*l).to_owned()]);
            }
            // Recorded first: a half-built set is removed too.
            images.tags.push((*tag).to_owned());
            output_of(
                Command::new(&script)
                    .args(&args)
                    .env("CONTAINERS_CONF", &images.conf),
            )?;
        }
        Ok(images)
    }

    /// `localhost/NAME:TAG`.
    pub fn reference(name: &str, tag: &str) -> String {
        format!("localhost/{name}:{tag}")
    }

    /// The size podman reports for an image.
    pub fn size(&self, name: &str, tag: &str) -> String {
        self.podman(&[
            "image",
            "inspect",
            "--format",
            "{{.Size}}",
            &Self::reference(name, tag),
        ])
        .map(|s| {
            let bytes: u64 = s.trim().parse().unwrap_or(0);
            format!("{:.1} MB", bytes as f64 / 1e6)
        })
        .unwrap_or_default()
    }

    /// The containers.conf podman runs with.
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// Runs podman with this run's configuration.
    pub fn podman(&self, args: &[&str]) -> Result<String, LabError> {
        podman(&self.conf, args)
    }
}

impl Drop for Images {
    fn drop(&mut self) {
        for tag in &self.tags {
            for name in ["raven-hub", "raven-edge", "raven-wireguard-go"] {
                let _ = self.podman(&["rmi", "-f", &Self::reference(name, tag)]);
            }
        }
    }
}

fn podman(conf: &Path, args: &[&str]) -> Result<String, LabError> {
    output_of(
        Command::new("podman")
            .args(args)
            .env("CONTAINERS_CONF", conf),
    )
}

/// Which WireGuard the containerised agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wireguard {
    /// wireguard-go, one container per device (tunnel and direct-path
    /// device), as the `raven-wireguard` DaemonSet runs it.
    Userspace,
    /// The kernel's (no wireguard-go, no /dev/net/tun).
    Kernel,
}

/// One lab node run as a pod: its agent container and, for userspace
/// WireGuard, its wireguard-go containers. Every container is removed by
/// name on drop.
#[derive(Debug)]
pub struct EdgePod {
    conf: PathBuf,
    /// The node's network namespace.
    netns: String,
    /// Names of the containers this pod made (agent last).
    pub wireguard: Vec<String>,
    pub agent: String,
    args: Vec<String>,
    mounts: Vec<String>,
    mode: Wireguard,
}

impl EdgePod {
    /// Starts the node's pod: wireguard-go first (userspace), then the
    /// agent from image `tag`.
    pub fn start(
        lab: &Lab,
        images: &Images,
        short: &str,
        mode: Wireguard,
        tag: &str,
    ) -> Result<Self, LabError> {
        let mut args = lab.agent_args(short)?;
        args.extend([
            "--wireguard".to_owned(),
            match mode {
                Wireguard::Userspace => "userspace",
                Wireguard::Kernel => "kernel",
            }
            .to_owned(),
        ]);
        let data = lab.path(&format!("edge-{short}"));
        std::fs::create_dir_all(&data)?;
        let certs = lab.path("certs/nodes");
        // What the DaemonSet mounts from the host: the store and keys, the
        // certificates (read-only), the UAPI socket directory, the xtables
        // lock (shared with the CNI and kube-proxy on a real node).
        let mounts = vec![
            format!("{data}:{data}"),
            format!("{certs}:{certs}:ro"),
            "/var/run/wireguard:/var/run/wireguard".to_owned(),
            "/run/xtables.lock:/run/xtables.lock".to_owned(),
        ];
        // What deploy/README.md asks of every node, since /proc/sys is
        // read-only in a container (the agent sets these on a host install):
        // forwarding on, loose reverse-path filtering.
        for kv in [
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv4.conf.all.rp_filter=2",
        ] {
            lab.sh(short, &["sysctl", "-qw", kv])?;
        }
        if !Path::new("/run/xtables.lock").exists() {
            std::fs::write("/run/xtables.lock", b"")?;
        }
        let mut pod = Self {
            conf: images.conf.clone(),
            netns: lab.ns(short),
            wireguard: Vec::new(),
            agent: format!("{}{short}-edge", lab.prefix),
            args,
            mounts,
            mode,
        };
        if mode == Wireguard::Userspace {
            std::fs::create_dir_all("/var/run/wireguard")?;
            let dev = lab.tunnel_dev(short);
            for (name, dev) in [("wg", dev.clone()), ("wgd", format!("{dev}d"))] {
                let container = format!("{}{short}-{name}", lab.prefix);
                pod.wireguard.push(container.clone());
                pod.podman(&[
                    "run",
                    "-d",
                    "--name",
                    &container,
                    "--network",
                    &format!("ns:/run/netns/{}", pod.netns),
                    // As the raven-wireguard DaemonSet: NET_ADMIN, the tun
                    // device, the socket directory; nothing else.
                    "--cap-drop",
                    "all",
                    "--cap-add",
                    "NET_ADMIN",
                    "--read-only",
                    "--read-only-tmpfs=false",
                    "--device",
                    "/dev/net/tun",
                    "-v",
                    "/var/run/wireguard:/var/run/wireguard",
                    &Images::reference("raven-wireguard-go", tag),
                    &dev,
                ])?;
                let t = Instant::now();
                let sock = Path::new("/var/run/wireguard").join(format!("{dev}.sock"));
                while !sock.exists() {
                    if t.elapsed() > Duration::from_secs(10) {
                        return Err(LabError::Setup(format!(
                            "wireguard-go container {container} opened no {}: {}",
                            sock.display(),
                            pod.logs(&container)
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        pod.run_agent(tag)?;
        Ok(pod)
    }

    /// Starts the agent container from image `tag` (as the DaemonSet:
    /// exactly NET_ADMIN and NET_RAW, host network, read-only root, no
    /// devices).
    pub fn run_agent(&self, tag: &str) -> Result<(), LabError> {
        let network = format!("ns:/run/netns/{}", self.netns);
        let mut args: Vec<&str> = vec![
            "run",
            "-d",
            "--name",
            &self.agent,
            "--network",
            &network,
            "--cap-drop",
            "all",
            "--cap-add",
            "NET_ADMIN,NET_RAW",
            "--read-only",
            "--read-only-tmpfs=false",
            "-e",
            "RUST_LOG=info",
        ];
        for m in &self.mounts {
            args.extend(["-v", m.as_str()]);
        }
        let image = Images::reference("raven-edge", tag);
        args.push(&image);
        args.extend(self.args.iter().map(String::as_str));
        self.podman(&args).map(drop)
    }

    /// Stops the agent container (SIGTERM, as the kubelet does) and removes
    /// it; its network namespace, and the wireguard-go containers, stay.
    pub fn stop_agent(&self) -> Result<(), LabError> {
        self.podman(&["stop", "-t", "10", &self.agent])?;
        self.podman(&["rm", "-f", &self.agent]).map(drop)
    }

    /// Restarts a wireguard-go container (its device goes and comes back
    /// empty; the agent configures it again).
    pub fn restart_wireguard(&self, i: usize) -> Result<(), LabError> {
        let name = self
            .wireguard
            .get(i)
            .ok_or_else(|| LabError::Setup("no such wireguard-go container".into()))?;
        self.podman(&["restart", "-t", "10", name]).map(drop)
    }

    /// The host PID of a container's first process (changes when it is
    /// restarted).
    pub fn pid(&self, container: &str) -> Option<u32> {
        self.podman(&["inspect", "--format", "{{.State.Pid}}", container])
            .ok()?
            .trim()
            .parse()
            .ok()
            .filter(|p| *p > 0)
    }

    /// A container's last log lines.
    pub fn logs(&self, container: &str) -> String {
        let out = Command::new("podman")
            .args(["logs", "--tail", "25", container])
            .env("CONTAINERS_CONF", &self.conf)
            .output();
        out.map(|o| {
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
        })
        .unwrap_or_default()
    }

    /// Every container's last log lines, for failure reports.
    pub fn all_logs(&self) -> String {
        std::iter::once(&self.agent)
            .chain(&self.wireguard)
            .map(|c| format!("--- container {c}\n{}", self.logs(c)))
            .collect()
    }

    /// Which WireGuard this pod runs.
    pub fn mode(&self) -> Wireguard {
        self.mode
    }

    fn podman(&self, args: &[&str]) -> Result<String, LabError> {
        podman(&self.conf, args)
    }
}

impl Drop for EdgePod {
    fn drop(&mut self) {
        for c in std::iter::once(&self.agent).chain(&self.wireguard) {
            let _ = self.podman(&["rm", "-f", "-t", "2", c]);
        }
    }
}

/// Whether this kernel can make WireGuard links: tried in a scratch
/// namespace (`ns`), removed by name.
pub fn kernel_wireguard(ns: &str) -> bool {
    let ip = |args: &[&str]| output_of(Command::new("ip").args(args));
    if ip(&["netns", "add", ns]).is_err() {
        return false;
    }
    let ok = ip(&["-n", ns, "link", "add", "rvkwgprobe", "type", "wireguard"]).is_ok();
    let _ = ip(&["netns", "del", ns]);
    ok
}

/// `count` pings at 20 per second between two addresses of the lab,
/// running in the background; [`Pinger::wait`] waits for the last.
#[derive(Debug)]
pub struct Pinger(Child);

impl Pinger {
    /// Pings `to` from `src` in `from`'s namespace.
    pub fn start(lab: &Lab, from: &str, src: &str, to: &str, count: u32) -> Result<Self, LabError> {
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.ns(from), "ping", "-n", "-q"])
            .args(["-i", "0.05", "-W", "1", "-c", &count.to_string()])
            .args(["-I", src, to])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| LabError::Spawn {
                cmd: "ping".into(),
                source,
            })?;
        Ok(Self(child))
    }

    /// Waits for the last ping: packets sent and lost.
    pub fn wait(self) -> (u64, u64) {
        let Ok(out) = self.0.wait_with_output() else {
            return (0, 0);
        };
        let (sent, received) = ping_summary(&out.stdout);
        (sent, sent.saturating_sub(received))
    }

    /// As [`Pinger::wait`], and a ping that sent nothing (or printed no
    /// summary) fails the test rather than counting as nothing lost.
    pub fn lost(self) -> (u64, u64) {
        let (sent, lost) = self.wait();
        assert!(sent > 0, "ping sent nothing (or printed no summary)");
        (sent, lost)
    }
}
