//! The OpenYurt Raven user-manual cluster, built from network namespaces on
//! this machine, with the real `raven-hub` and one real `raven-edge` per node.
//!
//! ```text
//!                        inet (203.0.113.0/24, bridge "wanbr")
//!            ┌──────────────────┼─────────────────────┐
//!   cloud-1 203.0.113.10   hz-rt 203.0.113.20      qd-rt 203.0.113.30   (routers masquerade)
//!   │ LAN 192.168.0.0/24    │ LAN 172.16.2.0/24     │ LAN 172.16.1.0/24
//!   cloud-1  cloud-2        hz-1     hz-2            qd-1     qd-2
//! ```
//! Node names, addresses and pod CIDRs are those of
//! `deploy/examples/user-manual`; the hub runs on the cloud gateway and the
//! edges reach it through their NAT. Each node has a pod stand-in (a veth
//! holding `10.244.X.1`), and the harness plays the CNI inside each domain.
//! Everything is created and deleted by name under a per-lab prefix; traffic
//! only flows between addresses inside these namespaces.
//!
//! While it runs, a node ([`Lab::add_node`]) or a whole NAT-ed domain
//! ([`Lab::add_domain`]) can be added, and a node can lose its power
//! ([`Lab::power_off`], [`Lab::power_on`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One node of the lab.
#[derive(Debug, Clone)]
pub struct LabNode {
    /// Short name used for the namespace.
    pub short: &'static str,
    /// Kubernetes node name (the manual's).
    pub name: &'static str,
    pub domain: &'static str,
    pub ip: &'static str,
    pub pod: &'static str,
}

/// The six nodes of the user manual.
pub const NODES: [LabNode; 6] = [
    LabNode {
        short: "c1",
        name: "izwz9dohcv74iegqecp4axz",
        domain: "cloud",
        ip: "192.168.0.195",
        pod: "10.244.0.1",
    },
    LabNode {
        short: "c2",
        name: "izwz9ey0js5z7mornclpd6z",
        domain: "cloud",
        ip: "192.168.0.196",
        pod: "10.244.5.1",
    },
    LabNode {
        short: "h1",
        name: "izbp15inok0kbfkg3in52rz",
        domain: "hangzhou",
        ip: "172.16.2.103",
        pod: "10.244.1.1",
    },
    LabNode {
        short: "h2",
        name: "izbp15inok0kbfkg3in52sz",
        domain: "hangzhou",
        ip: "172.16.2.104",
        pod: "10.244.2.1",
    },
    LabNode {
        short: "q1",
        name: "izm5eb24dmjfimuaybpnqzz",
        domain: "qingdao",
        ip: "172.16.1.89",
        pod: "10.244.3.1",
    },
    LabNode {
        short: "q2",
        name: "izm5eb24dmjfimuaybpnr0z",
        domain: "qingdao",
        ip: "172.16.1.90",
        pod: "10.244.4.1",
    },
];

/// A NAT router between a domain's LAN and the internet (masquerading on
/// its WAN side).
#[derive(Debug, Clone)]
pub struct LabRouter {
    /// Short name used for the namespace.
    pub short: &'static str,
    /// LAN address (the nodes' default gateway), in a /24.
    pub lan: &'static str,
    /// WAN address on the internet segment 203.0.113.0/24.
    pub wan: &'static str,
}

/// A network domain of the lab: a LAN segment (a bridge in its own
/// namespace) behind a NAT router, or the cloud's (no router; its gateway
/// has a public address).
#[derive(Debug, Clone)]
pub struct LabDomain {
    /// The name `LabNode::domain` refers to.
    pub name: &'static str,
    /// Its `Gateway` object (the nodes' `raven.openyurt.io/gateway` label).
    pub gateway: &'static str,
    /// Short name of the LAN switch's namespace.
    pub switch: &'static str,
    pub router: Option<LabRouter>,
}

/// The three domains of the user manual.
pub const DOMAINS: [LabDomain; 3] = [
    LabDomain {
        name: "cloud",
        gateway: "gw-cloud",
        switch: "cloudsw",
        router: None,
    },
    LabDomain {
        name: "hangzhou",
        gateway: "gw-hangzhou",
        switch: "hzsw",
        router: Some(LabRouter {
            short: "hzrt",
            lan: "172.16.2.1",
            wan: "203.0.113.20",
        }),
    },
    LabDomain {
        name: "qingdao",
        gateway: "gw-qingdao",
        switch: "qdsw",
        router: Some(LabRouter {
            short: "qdrt",
            lan: "172.16.1.1",
            wan: "203.0.113.30",
        }),
    },
];

const CLOUD_PUBLIC: &str = "203.0.113.10";
const CLOUD_LAN: &str = "192.168.0.195";

/// Errors building or driving the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("`{cmd}` failed: {out}")]
    Command { cmd: String, out: String },
    #[error("running `{cmd}`: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("{0} is not built: run `cargo build --workspace --bins` first")]
    MissingBinary(PathBuf),
    #[error("lab: {0}")]
    Setup(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn run(cmd: &str, args: &[&str]) -> Result<String, LabError> {
    output_of(Command::new(cmd).args(args))
}

/// Runs `cmd`: its standard output, or an error with its standard error.
pub(crate) fn output_of(cmd: &mut Command) -> Result<String, LabError> {
    let line = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let out = cmd.output().map_err(|source| LabError::Spawn {
        cmd: line.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd: line,
            out: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Sends `signal` to `pid` (with kill(1), so no unsafe code).
fn signal(pid: u32, signal: i32) {
    let _ = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// (transmitted, received) from ping's summary line; (0, 0) without one.
pub fn ping_summary(stdout: &[u8]) -> (u64, u64) {
    let text = String::from_utf8_lossy(stdout);
    let summary = text
        .lines()
        .find(|l| l.contains("transmitted"))
        .unwrap_or_default();
    let num = |key: &str| {
        summary
            .split(',')
            .find(|p| p.contains(key))
            .and_then(|p| p.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (num("transmitted"), num("received"))
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"))
}

/// The lab node (of the manual's six) whose short name is `short`.
pub fn manual_node(short: &str) -> Option<&'static LabNode> {
    NODES.iter().find(|n| n.short == short)
}

/// A process the lab started; stopped by PID.
#[derive(Debug)]
pub struct Proc(Child);

impl Proc {
    /// Sends `signal` and reaps the process.
    pub fn stop(mut self, sig: i32) {
        signal(self.0.id(), sig);
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            signal(self.0.id(), 15);
        }
        let _ = self.0.wait();
    }
}

/// What the lab's PID files may name: the hub, the agents, and the
/// wireguard-go each agent starts (it records it in its data dir).
/// And the charon of each node when the lab runs IPsec.
const RECORDED: [&str; 5] = [
    "raven-hub",
    "raven-edge",
    "wireguard-go",
    "fake-kubelet",
    "charon",
];

/// strongSwan's IKE daemon (Debian `strongswan-charon`).
pub const CHARON: &str = "/usr/lib/ipsec/charon";

/// The VPN between the lab's gateways.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Vpn {
    /// Userspace WireGuard (wireguard-go), raven's default.
    #[default]
    Wireguard,
    /// IKEv2/ESP-in-UDP: `raven-cfg` says `vpn-driver: ipsec`, and every
    /// node runs a charon of its own (kernel-libipsec: these kernels have
    /// no ESP) next to its agent, as the charon container of the agent's
    /// pod does in Kubernetes.
    Ipsec,
}

/// The PID a PID file holds.
fn recorded_pid(pid_file: &Path) -> Option<u32> {
    std::fs::read_to_string(pid_file).ok()?.trim().parse().ok()
}

/// The command name of a running process (a zombie has exited: only its
/// parent can reap it, so it counts as gone).
fn running_as(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = stat.rsplit_once(") ")?;
    if rest.starts_with('Z') {
        return None;
    }
    head.split_once(" (").map(|(_, comm)| comm.to_owned())
}

/// Sends `sig` to the process a PID file names, if that PID still runs one
/// of `names` (a PID can be reused once its process has gone); returns it.
fn kill_recorded(pid_file: &Path, sig: i32, names: &[&str]) -> Option<u32> {
    let pid = recorded_pid(pid_file)?;
    let comm = running_as(pid)?;
    names.contains(&comm.as_str()).then(|| {
        signal(pid, sig);
        pid
    })
}

/// Waits (at most `timeout`) until `pid` has gone.
fn wait_gone(pid: u32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while running_as(pid).is_some() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `pid` lives in the named network namespace.
fn in_netns(pid: u32, ns: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    let id = |p: String| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    id(format!("/proc/{pid}/ns/net")).is_some_and(|a| id(format!("/run/netns/{ns}")) == Some(a))
}

/// Where userspace WireGuard devices keep their UAPI sockets (one
/// directory for the whole machine).
const UAPI_DIR: &str = "/var/run/wireguard";

/// The UAPI socket of a userspace WireGuard device.
fn uapi_socket(dev: &str) -> PathBuf {
    Path::new(UAPI_DIR).join(format!("{dev}.sock"))
}

/// The /24 a pod stand-in address lies in (its node's pod CIDR).
fn pod_net(pod: &str) -> String {
    format!("{}.0/24", pod.rsplit_once('.').map_or("", |x| x.0))
}

/// The `Node` document of a node labelled into `gateway`, Ready.
fn node_manifest(node: &LabNode, gateway: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {}\n  labels:\n    raven.openyurt.io/gateway: {gateway}\nspec:\n  podCIDR: {}\nstatus:\n  conditions:\n    - type: Ready\n      status: \"True\"\n  addresses:\n    - type: InternalIP\n      address: {}\n",
        node.name,
        pod_net(node.pod),
        node.ip
    )
}

/// The `Gateway` document of a domain behind NAT whose gateway is `node`,
/// shaped like the manual's gw-hangzhou and gw-qingdao.
fn gateway_manifest(gateway: &str, node: &str) -> String {
    format!(
        "---\napiVersion: raven.openyurt.io/v1beta1\nkind: Gateway\nmetadata:\n  name: {gateway}\nspec:\n  proxyConfig:\n    Replicas: 1\n  tunnelConfig:\n    Replicas: 1\n  endpoints:\n    - nodeName: {node}\n      underNAT: true\n      port: 10262\n      type: proxy\n    - nodeName: {node}\n      underNAT: true\n      port: 4500\n      type: tunnel\n"
    )
}

/// Finds a sibling binary of the running executable.
pub fn binary(name: &str) -> Result<PathBuf, LabError> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().map(Path::to_path_buf);
    while let Some(d) = dir {
        let p = d.join(name);
        if p.exists() {
            return Ok(p);
        }
        dir = d
            .parent()
            .filter(|p| {
                p.ends_with("debug")
                    || p.ends_with("release")
                    || p.file_name().is_some_and(|f| f == "deps")
            })
            .map(Path::to_path_buf);
        if dir.as_ref().is_some_and(|d| d.ends_with("target")) {
            break;
        }
    }
    Err(LabError::MissingBinary(
        exe.parent().map(|d| d.join(name)).unwrap_or_default(),
    ))
}

/// A running lab.
#[derive(Debug)]
pub struct Lab {
    pub prefix: String,
    /// State of this lab (certificates, hub and agent data, logs, PID files).
    pub dir: PathBuf,
    hub_exe: PathBuf,
    edge_exe: PathBuf,
    pub hub: Option<Proc>,
    pub agents: BTreeMap<&'static str, Proc>,
    /// The nodes of this lab: the manual's six, plus any added while running.
    pub nodes: Vec<LabNode>,
    /// Its domains: the manual's three, plus any added while running.
    pub domains: Vec<LabDomain>,
    /// The links [`Lab::power_off`] set down, by node.
    powered_off: BTreeMap<String, Vec<String>>,
    /// Run the hub and agents with their default `--heartbeat` and
    /// `--resync` instead of the lab's fast 1 s (set before starting them).
    pub default_timers: bool,
    /// Other processes a test started in the lab's namespaces
    /// ([`Lab::spawn_helper`]), by name.
    pub helpers: BTreeMap<String, Proc>,
    /// The VPN between gateways ([`Lab::use_ipsec`]).
    pub vpn: Vpn,
}

impl Lab {
    /// Namespace of a node or box.
    pub fn ns(&self, short: &str) -> String {
        format!("{}{short}", self.prefix)
    }

    fn ip(&self, ns: &str, args: &[&str]) -> Result<String, LabError> {
        let ns = self.ns(ns);
        let mut full = vec!["-n", ns.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    fn exec(&self, ns: &str, cmd: &[&str]) -> Result<String, LabError> {
        let ns = self.ns(ns);
        let mut full = vec!["netns", "exec", ns.as_str()];
        full.extend_from_slice(cmd);
        run("ip", &full)
    }

    /// Removes a lab with `prefix` whose state is in `dir`, also after an
    /// interrupted run: ends the processes it started (by the PIDs it
    /// recorded, while they still run the program recorded), then deletes
    /// its namespaces, and the UAPI sockets of its tunnel devices, by name.
    pub fn clean(prefix: &str, dir: &Path) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.filter_map(Result::ok) {
                let path = e.path();
                let is_pid = path.extension().is_some_and(|x| x == "pid");
                let sub_pids: Vec<PathBuf> = std::fs::read_dir(&path)
                    .into_iter()
                    .flatten()
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "pid"))
                    .collect();
                for pid_file in sub_pids.into_iter().chain(is_pid.then_some(path)) {
                    kill_recorded(&pid_file, 15, &RECORDED);
                }
            }
        }
        // Give the processes a moment to go, so nothing outlives the lab.
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && Self::leftover_pids(dir) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Ok(list) = run("ip", &["netns", "list"]) {
            for line in list.lines() {
                let name = line.split_whitespace().next().unwrap_or_default();
                if name.starts_with(prefix) {
                    let _ = run("ip", &["netns", "del", name]);
                }
            }
        }
        // A wireguard-go that died without closing its socket (power_off,
        // or a crash) leaves the socket file behind.
        if !Self::leftover_pids(dir) {
            for e in std::fs::read_dir(UAPI_DIR)
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
            {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(prefix) && name.ends_with(".sock") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    /// Whether a process this lab recorded is still running.
    fn leftover_pids(dir: &Path) -> bool {
        let mut pid_files = Vec::new();
        let mut stack = vec![dir.to_owned()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d)
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
            {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "pid") {
                    pid_files.push(p);
                }
            }
        }
        pid_files.iter().any(|f| {
            recorded_pid(f)
                .and_then(running_as)
                .is_some_and(|comm| RECORDED.contains(&comm.as_str()))
        })
    }

    /// Builds the networks (no raven yet).
    pub fn build(prefix: &str, dir: &Path) -> Result<Self, LabError> {
        Self::clean(prefix, dir);
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let mut lab = Self {
            prefix: prefix.to_owned(),
            dir: dir.to_owned(),
            hub_exe: binary("raven-hub")?,
            edge_exe: binary("raven-edge")?,
            hub: None,
            agents: BTreeMap::new(),
            nodes: Vec::new(),
            domains: Vec::new(),
            powered_off: BTreeMap::new(),
            default_timers: false,
            helpers: BTreeMap::new(),
            vpn: Vpn::Wireguard,
        };
        lab.add_switch("inet", "wanbr")?;
        for d in DOMAINS {
            lab.build_domain(d)?;
        }
        for n in NODES {
            lab.build_node(n)?;
        }
        // The cloud gateway's public address.
        lab.plug("c1", "wan0", "inet", "wanbr", &format!("{CLOUD_PUBLIC}/24"))?;
        lab.certs(&NODES.map(|n| n.name))?;
        let manifests = lab.dir.join("manifests");
        std::fs::create_dir_all(&manifests)?;
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/user-manual");
        for f in ["gateways.yaml", "nodes.yaml", "raven-cfg.yaml"] {
            std::fs::copy(example.join(f), manifests.join(f))?;
        }
        Ok(lab)
    }

    /// A namespace with its loopback up.
    fn add_ns(&self, short: &str) -> Result<(), LabError> {
        run("ip", &["netns", "add", &self.ns(short)])?;
        self.ip(short, &["link", "set", "lo", "up"]).map(drop)
    }

    /// A switch: a namespace holding bridge `br`.
    fn add_switch(&self, sw: &str, br: &str) -> Result<(), LabError> {
        self.add_ns(sw)?;
        self.ip(sw, &["link", "add", br, "type", "bridge"])?;
        self.ip(sw, &["link", "set", br, "up"]).map(drop)
    }

    /// A domain's LAN switch and, unless it is the cloud, its NAT router:
    /// LAN side on the switch, WAN side on the internet, masquerading.
    fn build_domain(&mut self, d: LabDomain) -> Result<(), LabError> {
        self.add_switch(d.switch, "lanbr")?;
        if let Some(r) = &d.router {
            self.add_ns(r.short)?;
            self.plug(r.short, "lan", d.switch, "lanbr", &format!("{}/24", r.lan))?;
            self.plug(r.short, "wan", "inet", "wanbr", &format!("{}/24", r.wan))?;
            self.exec(r.short, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            // A home router: masquerade out, and a stateful firewall that
            // drops what nobody inside asked for. Dropped before conntrack
            // confirms it, an unsolicited packet leaves no entry behind that
            // would make the NAT pick another port for the inside's own flow
            // to that sender (which would break hole punching for good).
            self.exec(r.short, &["nft", "add table ip nat; add chain ip nat post { type nat hook postrouting priority 100; }; add rule ip nat post oifname \"wan\" masquerade"])?;
            self.exec(r.short, &["nft", "add table inet fw; add chain inet fw input { type filter hook input priority 0; }; add rule inet fw input iifname \"wan\" ct state new drop"])?;
        }
        self.domains.push(d);
        Ok(())
    }

    /// The domain called `name`.
    fn domain(&self, name: &str) -> Result<&LabDomain, LabError> {
        self.domains
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| LabError::Setup(format!("no domain {name:?} in this lab")))
    }

    /// The node whose short name is `short`.
    fn node(&self, short: &str) -> Result<&LabNode, LabError> {
        self.nodes
            .iter()
            .find(|n| n.short == short)
            .ok_or_else(|| LabError::Setup(format!("no node {short:?} in this lab")))
    }

    /// A node on its domain's LAN: namespace, `eth0`, the pod stand-in (a
    /// veth holding the pod address), its boot-time routes, and the CNI's
    /// routes to its pod subnet on the other nodes of the domain.
    fn build_node(&mut self, n: LabNode) -> Result<(), LabError> {
        let sw = self.domain(n.domain)?.switch;
        self.add_ns(n.short)?;
        self.plug(n.short, "eth0", sw, "lanbr", &format!("{}/24", n.ip))?;
        self.ip(
            n.short,
            &[
                "link", "add", "pod0", "type", "veth", "peer", "name", "pod1",
            ],
        )?;
        self.ip(
            n.short,
            &["addr", "add", &format!("{}/24", n.pod), "dev", "pod0"],
        )?;
        self.ip(n.short, &["link", "set", "pod0", "up"])?;
        self.ip(n.short, &["link", "set", "pod1", "up"])?;
        self.boot_routes(&n)?;
        for other in self.neighbours(&n) {
            self.ip(
                other.short,
                &["route", "replace", &pod_net(n.pod), "via", n.ip],
            )?;
        }
        self.nodes.push(n);
        Ok(())
    }

    /// The other nodes of `n`'s domain.
    fn neighbours<'a>(&'a self, n: &'a LabNode) -> impl Iterator<Item = &'a LabNode> {
        self.nodes
            .iter()
            .filter(|o| o.domain == n.domain && o.short != n.short)
    }

    /// What a node's own network configuration sets up at boot: the default
    /// route to its NAT router and, as the CNI does, the pod subnets of the
    /// other nodes of its domain via their node address.
    fn boot_routes(&self, n: &LabNode) -> Result<(), LabError> {
        if let Some(r) = &self.domain(n.domain)?.router {
            self.ip(n.short, &["route", "replace", "default", "via", r.lan])?;
        }
        for other in self.neighbours(n) {
            self.ip(
                n.short,
                &["route", "replace", &pod_net(other.pod), "via", other.ip],
            )?;
        }
        Ok(())
    }

    /// A veth from `ns` (named `ifname`, holding `addr`) to bridge `br` in `sw`.
    fn plug(&self, ns: &str, ifname: &str, sw: &str, br: &str, addr: &str) -> Result<(), LabError> {
        let peer = format!("{ns}-{ifname}");
        self.ip(
            sw,
            &[
                "link",
                "add",
                &peer,
                "type",
                "veth",
                "peer",
                "name",
                ifname,
                "netns",
                &self.ns(ns),
            ],
        )?;
        self.ip(sw, &["link", "set", &peer, "master", br, "up"])?;
        self.ip(ns, &["addr", "add", addr, "dev", ifname])?;
        self.ip(ns, &["link", "set", ifname, "up"])?;
        Ok(())
    }

    /// Client certificates for `nodes` (and the hub's, the first time),
    /// from the lab's CA.
    fn certs(&self, nodes: &[&str]) -> Result<(), LabError> {
        run(
            self.hub_exe.to_str().unwrap_or_default(),
            &[
                "certs",
                "--out",
                &self.path("certs"),
                "--hub-name",
                CLOUD_PUBLIC,
                "--hub-name",
                CLOUD_LAN,
                "--node",
                &nodes.join(","),
            ],
        )
        .map(drop)
    }

    pub fn path(&self, p: &str) -> String {
        self.dir.join(p).to_string_lossy().into_owned()
    }

    fn spawn(&self, ns: &str, exe: &Path, args: &[String], log: &str) -> Result<Proc, LabError> {
        let pid_file = self.path(&log.replace(".log", ".pid"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(log))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(ns)])
            .arg(exe)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|source| LabError::Spawn {
                cmd: exe.display().to_string(),
                source,
            })?;
        std::fs::write(pid_file, child.id().to_string())?;
        Ok(Proc(child))
    }

    /// Starts the hub on the cloud gateway with the user-manual manifests.
    pub fn start_hub(&mut self) -> Result<(), LabError> {
        let manifests = self.path("manifests");
        let args: Vec<String> = [
            "serve",
            "--manifests",
            &manifests,
            "--certs",
            &self.path("certs"),
            "--data-dir",
            &self.path("hub-data"),
            "--grpc-addr",
            "0.0.0.0:10270",
            "--plaintext-addr",
            "127.0.0.1:10271",
            "--http-addr",
            "127.0.0.1:10272",
            "--heartbeat",
            "1s",
        ]
        .map(str::to_owned)
        .to_vec();
        let args = self.with_timers(args);
        self.hub = Some(self.spawn("c1", &self.hub_exe.clone(), &args, "hub.log")?);
        Ok(())
    }

    /// `args` without `--heartbeat`/`--resync` and their values when the
    /// lab runs with [`Lab::default_timers`].
    fn with_timers(&self, args: Vec<String>) -> Vec<String> {
        if !self.default_timers {
            return args;
        }
        let mut out = Vec::new();
        let mut skip = false;
        for a in args {
            if std::mem::take(&mut skip) {
                continue;
            }
            if a == "--heartbeat" || a == "--resync" {
                skip = true;
                continue;
            }
            out.push(a);
        }
        out
    }

    /// Tunnel device name of a node: unique per lab (the UAPI socket
    /// directory is shared by the whole machine).
    pub fn tunnel_dev(&self, short: &str) -> String {
        format!("{}{short}wg", self.prefix)
    }

    /// Where a node's agent records the PID of the wireguard-go it started.
    pub fn wireguard_pid_file(&self, short: &str) -> PathBuf {
        self.dir.join(format!(
            "edge-{short}/wireguard-go-{}.pid",
            self.tunnel_dev(short)
        ))
    }

    /// Starts (or restarts) the agent of a node. Cloud nodes dial the hub
    /// on the cloud LAN, the others its public address through their NAT.
    pub fn start_agent(&mut self, short: &'static str) -> Result<(), LabError> {
        if self.vpn == Vpn::Ipsec && !self.charon_running(short) {
            self.start_charon(short)?;
        }
        let args = self.agent_args(short)?;
        let proc = self.spawn(
            short,
            &self.edge_exe.clone(),
            &args,
            &format!("edge-{short}.log"),
        )?;
        self.agents.insert(short, proc);
        Ok(())
    }

    /// The directory holding the `raven-hub` and `raven-edge` this lab runs.
    pub fn binaries_dir(&self) -> Option<&Path> {
        self.edge_exe.parent()
    }

    /// The `raven-edge` arguments (from `run` on) of a node's agent.
    pub fn agent_args(&self, short: &str) -> Result<Vec<String>, LabError> {
        let n = self.node(short)?;
        let hub = if self.domain(n.domain)?.router.is_none() {
            format!("https://{CLOUD_LAN}:10270")
        } else {
            format!("https://{CLOUD_PUBLIC}:10270")
        };
        let args: Vec<String> = [
            "run",
            "--node",
            n.name,
            "--data-dir",
            &self.path(&format!("edge-{short}")),
            "--hub",
            &hub,
            // The node's bundle only: the CA key stays with the hub.
            "--certs",
            &self.path(&format!("certs/nodes/{}", n.name)),
            "--http-addr",
            "127.0.0.1:10273",
            "--resync",
            "1s",
            "--heartbeat",
            "1s",
            "--tunnel-dev",
            &self.tunnel_dev(short),
            // Bound only where the topology makes the node a cloud proxy
            // server.
            "--proxy-connect-socket",
            &self.proxy_socket(short).to_string_lossy(),
        ]
        .map(str::to_owned)
        .to_vec();
        let mut args = self.with_timers(args);
        if self.vpn == Vpn::Ipsec {
            // `--vpn` stays `auto`: the agents follow raven-cfg.
            args.push("--ipsec-vici".into());
            args.push(self.charon_vici(short).to_string_lossy().into_owned());
        }
        Ok(args)
    }

    /// The HTTP CONNECT socket of the layer-7 proxy server on a node (a
    /// file: reachable from outside the node's namespace).
    pub fn proxy_socket(&self, short: &str) -> PathBuf {
        self.dir.join(format!("proxy-{short}.sock"))
    }

    /// Starts `exe` with `args` in the namespace of `short` as the helper
    /// `name` (log `helper-<name>.log`, PID recorded so it is cleaned up
    /// with the lab; its program name must be one the lab records).
    pub fn spawn_helper(
        &mut self,
        short: &str,
        name: &str,
        exe: &Path,
        args: &[String],
    ) -> Result<(), LabError> {
        let proc = self.spawn(short, exe, args, &format!("helper-{name}.log"))?;
        self.helpers.insert(name.to_owned(), proc);
        Ok(())
    }

    /// Starts every agent.
    pub fn start_agents(&mut self) -> Result<(), LabError> {
        for n in self.nodes.clone() {
            self.start_agent(n.short)?;
        }
        Ok(())
    }

    /// Whether `from` reaches `to` (one ping, one second).
    pub fn ping(&self, from_ns: &str, src: &str, to: &str) -> bool {
        self.exec(from_ns, &["ping", "-c1", "-W1", "-I", src, to])
            .is_ok()
    }

    /// Every node and pod address pinged from every other: (from, to, ok).
    pub fn matrix(&self) -> Vec<(String, String, bool)> {
        let all: Vec<&str> = self.nodes.iter().map(|n| n.short).collect();
        self.matrix_of(&all)
    }

    /// The matrix among the nodes named in `shorts` only. The pings run
    /// side by side (a round costs about one ping timeout however many
    /// fail), so a round is also a timestamp for when each pair recovered.
    pub fn matrix_of(&self, shorts: &[&str]) -> Vec<(String, String, bool)> {
        let nodes: Vec<&LabNode> = self
            .nodes
            .iter()
            .filter(|n| shorts.contains(&n.short))
            .collect();
        let mut pairs = Vec::new();
        for a in &nodes {
            for b in nodes.iter().filter(|b| b.short != a.short) {
                for (src, slabel) in [(a.ip, "node"), (a.pod, "pod")] {
                    for (dst, dlabel) in [(b.ip, "node"), (b.pod, "pod")] {
                        pairs.push((a.short, src, dst, slabel, b.short, dlabel));
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(pairs.len());
        for chunk in pairs.chunks(24) {
            std::thread::scope(|scope| {
                let running: Vec<_> = chunk
                    .iter()
                    .map(|&(a, src, dst, slabel, b, dlabel)| {
                        let h = scope.spawn(move || self.ping(a, src, dst));
                        (format!("{a} {slabel}"), format!("{b} {dlabel}"), h)
                    })
                    .collect();
                for (from, to, h) in running {
                    out.push((from, to, h.join().unwrap_or(false)));
                }
            });
        }
        out
    }

    /// Waits until every pair reaches every other (or `timeout`); returns
    /// the time it took.
    pub fn converge(&self, timeout: Duration) -> Result<Duration, Vec<(String, String, bool)>> {
        // A cheap probe first (an unreachable address costs a second): the
        // longest paths, pod to pod between the last nodes of every two
        // domains.
        let last: Vec<&LabNode> = self
            .domains
            .iter()
            .filter_map(|d| self.nodes.iter().rfind(|n| n.domain == d.name))
            .collect();
        let probe = || {
            last.iter().all(|a| {
                last.iter()
                    .filter(|b| b.short != a.short)
                    .all(|b| self.ping(a.short, a.pod, b.pod))
            })
        };
        let t = Instant::now();
        loop {
            if probe() {
                let m = self.matrix();
                if m.iter().all(|x| x.2) {
                    return Ok(t.elapsed());
                }
                if t.elapsed() > timeout {
                    return Err(m);
                }
            } else if t.elapsed() > timeout {
                return Err(self.matrix());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Renders the matrix: rows are sources, columns destinations.
    pub fn render(matrix: &[(String, String, bool)]) -> String {
        let mut cols: Vec<String> = matrix.iter().map(|m| m.1.clone()).collect();
        cols.sort();
        cols.dedup();
        let mut rows: BTreeMap<&str, BTreeMap<&str, bool>> = BTreeMap::new();
        for (f, t, ok) in matrix {
            rows.entry(f).or_default().insert(t, *ok);
        }
        let mut s = format!("{:<9}", "from\\to");
        for c in &cols {
            s.push_str(&format!(
                " {:>7}",
                c.replace(" node", "").replace(" pod", "/p")
            ));
        }
        s.push('\n');
        for (f, cells) in rows {
            s.push_str(&format!(
                "{:<9}",
                f.replace(" node", "").replace(" pod", "/p")
            ));
            for c in &cols {
                let mark = match cells.get(c.as_str()) {
                    Some(true) => "ok",
                    Some(false) => "FAIL",
                    None => "-",
                };
                s.push_str(&format!(" {mark:>7}"));
            }
            s.push('\n');
        }
        s
    }

    /// Stops every raven process this lab started, and the wireguard-go
    /// processes its agents started (by the PIDs they recorded).
    pub fn stop_all(&mut self) {
        for (_, h) in std::mem::take(&mut self.helpers) {
            h.stop(15);
        }
        for (_, a) in std::mem::take(&mut self.agents) {
            a.stop(15);
        }
        if let Some(h) = self.hub.take() {
            h.stop(15);
        }
        for n in &self.nodes {
            kill_recorded(&self.wireguard_pid_file(n.short), 15, &["wireguard-go"]);
        }
    }

    /// The last lines of every log, for failure reports.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        let charons: Vec<String> = match self.vpn {
            Vpn::Wireguard => Vec::new(),
            Vpn::Ipsec => self
                .nodes
                .iter()
                .map(|n| format!("charon-{}.ike.log", n.short))
                .collect(),
        };
        for l in std::iter::once("hub.log".to_owned())
            .chain(self.nodes.iter().map(|n| format!("edge-{}.log", n.short)))
            .chain(charons)
        {
            let text = std::fs::read_to_string(self.path(&l)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            s.push_str(&format!(
                "--- {l}\n{}\n",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        s
    }
}

impl Drop for Lab {
    /// Stops and removes everything, the state directory too (failure
    /// reports carry the logs' last lines; `RAVEN_LAB_KEEP_STATE=1` keeps
    /// the directory for a closer look).
    fn drop(&mut self) {
        self.stop_all();
        Self::clean(&self.prefix, &self.dir);
        if std::env::var_os("RAVEN_LAB_KEEP_STATE").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Lab {
    /// Replaces `from` by `to` in the lab's copy of a manifest file.
    pub fn edit_manifest(&self, file: &str, from: &str, to: &str) -> Result<(), LabError> {
        let text = std::fs::read_to_string(self.dir.join("manifests").join(file))?;
        if !text.contains(from) {
            return Err(LabError::Command {
                cmd: format!("edit {file}"),
                out: format!("{from:?} not found"),
            });
        }
        self.write_manifest(file, &text.replacen(from, to, 1))
    }

    /// Appends documents to the lab's copy of a manifest file.
    pub fn append_manifest(&self, file: &str, docs: &str) -> Result<(), LabError> {
        let text = std::fs::read_to_string(self.dir.join("manifests").join(file))?;
        self.write_manifest(file, &(text + docs))
    }

    /// Replaces a manifest file at once (write aside, rename), so the hub,
    /// which polls the directory, never reads half a file.
    fn write_manifest(&self, file: &str, text: &str) -> Result<(), LabError> {
        let dir = self.dir.join("manifests");
        // Not `.yaml`: the hub reads only those.
        let aside = dir.join(format!(".{file}.new"));
        std::fs::write(&aside, text)?;
        std::fs::rename(&aside, dir.join(file))?;
        Ok(())
    }

    /// Runs grpcurl on the hub's loopback plaintext listener.
    pub fn grpcurl(&self, method: &str) -> Result<String, LabError> {
        self.exec("c1", &["grpcurl", "-plaintext", "127.0.0.1:10271", method])
    }

    /// The gateways' tunnel paths as their agents last reported them to the
    /// hub: `(from, to, relayed, endpoint)` by lab short names.
    pub fn tunnel_paths(&self) -> Vec<(String, String, bool, String)> {
        let text = self
            .grpcurl("raven.v1.InspectService/ListAgents")
            .unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let short = |name: &serde_json::Value| {
            self.nodes
                .iter()
                .find(|n| *name == n.name)
                .map_or_else(|| name.to_string(), |n| n.short.to_owned())
        };
        let mut out = Vec::new();
        for agent in v["agents"].as_array().into_iter().flatten() {
            // A relay's rows for NATed gateways' direct-path devices are
            // observations (their NAT mappings), not paths.
            for p in agent["peers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["directDevice"] != true)
            {
                out.push((
                    short(&agent["nodeName"]),
                    short(&p["peerNode"]),
                    p["relayed"] == true,
                    p["endpoint"].as_str().unwrap_or_default().to_owned(),
                ));
            }
        }
        out.sort();
        out
    }

    /// Runs a command in a node's namespace.
    pub fn sh(&self, short: &str, cmd: &[&str]) -> Result<String, LabError> {
        self.exec(short, cmd)
    }

    /// Stops one agent (SIGTERM), leaving its dataplane in place.
    pub fn stop_agent(&mut self, short: &str) {
        if let Some(a) = self.agents.remove(short) {
            a.stop(15);
        }
    }

    /// Turns a domain's router into a symmetric NAT: every destination gets
    /// its own random source port (`masquerade fully-random`), so a peer
    /// never learns a mapping it can use — hole punching cannot work.
    pub fn make_nat_symmetric(&self, domain: &str) -> Result<(), LabError> {
        let router = self
            .domain(domain)?
            .router
            .as_ref()
            .ok_or_else(|| LabError::Setup(format!("domain {domain} has no NAT router")))?
            .short;
        self.exec(router, &["nft", "flush chain ip nat post; add rule ip nat post oifname \"wan\" masquerade fully-random"])?;
        self.exec(router, &["conntrack", "-F"]).map(drop)
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) a node's agent: a frozen agent
    /// decides nothing, while its kernel state and wireguard-go keep working,
    /// as a slow or busy agent would.
    pub fn freeze_agent(&self, short: &str, frozen: bool) {
        if let Some(a) = self.agents.get(short) {
            signal(a.0.id(), if frozen { 19 } else { 18 });
        }
    }

    /// Cuts (or restores) every packet between two NAT routers' public
    /// addresses, in the first router's forward path: the direct path
    /// between their domains, nothing else.
    pub fn cut_between_routers(
        &self,
        domain: &str,
        other: &str,
        cut: bool,
    ) -> Result<(), LabError> {
        let router = |d: &str| {
            self.domain(d)?
                .router
                .clone()
                .ok_or_else(|| LabError::Setup(format!("domain {d} has no NAT router")))
        };
        let (r, o) = (router(domain)?, router(other)?);
        if cut {
            self.exec(r.short, &["nft", &format!("add table inet rcut; add chain inet rcut cut {{ type filter hook forward priority -10; }}; add rule inet rcut cut ip daddr {0} drop; add rule inet rcut cut ip saddr {0} drop", o.wan)])?;
        } else {
            self.exec(r.short, &["nft", "delete table inet rcut"])?;
        }
        Ok(())
    }

    /// Kills the hub (SIGKILL).
    pub fn kill_hub(&mut self) {
        if let Some(h) = self.hub.take() {
            h.stop(9);
        }
    }
}

impl Lab {
    /// Adds a node to a domain while everything runs: its namespace, LAN
    /// port, pod stand-in, the CNI's routes, a client certificate, a `Node`
    /// manifest labelled into the domain's gateway, and its agent.
    pub fn add_node(&mut self, node: LabNode) -> Result<(), LabError> {
        let gateway = self.domain(node.domain)?.gateway;
        let (short, name) = (node.short, node.name);
        let doc = node_manifest(&node, gateway);
        self.build_node(node)?;
        self.certs(&[name])?;
        self.append_manifest("nodes.yaml", &doc)?;
        self.start_agent(short)
    }

    /// Adds a whole edge domain while everything runs: its LAN switch, a
    /// NAT router on the internet, its `nodes` (as [`Lab::add_node`] does),
    /// a `Gateway` with the first node as its tunnel and proxy endpoint
    /// under NAT, the nodes' `Node` manifests labelled into it, and their
    /// agents. The domain needs a router, addresses of its own and pod
    /// subnets no other node uses.
    pub fn add_domain(&mut self, domain: LabDomain, nodes: Vec<LabNode>) -> Result<(), LabError> {
        let bad = |why: String| Err(LabError::Setup(format!("domain {}: {why}", domain.name)));
        let Some(first) = nodes.first() else {
            return bad("needs a node".into());
        };
        if domain.router.is_none() {
            return bad("needs a NAT router (only the cloud has a public gateway)".into());
        }
        if self.domain(domain.name).is_ok() {
            return bad("exists already".into());
        }
        if let Some(n) = nodes.iter().find(|n| n.domain != domain.name) {
            return bad(format!("node {} is in domain {}", n.short, n.domain));
        }
        if let Some(n) = nodes.iter().find(|n| {
            self.nodes
                .iter()
                .any(|o| o.short == n.short || pod_net(o.pod) == pod_net(n.pod))
        }) {
            return bad(format!("node {} or its pod subnet is taken", n.short));
        }
        let gateway_doc = gateway_manifest(domain.gateway, first.name);
        let node_docs: String = nodes
            .iter()
            .map(|n| node_manifest(n, domain.gateway))
            .collect();
        let names: Vec<&str> = nodes.iter().map(|n| n.name).collect();
        let shorts: Vec<&'static str> = nodes.iter().map(|n| n.short).collect();
        self.build_domain(domain)?;
        for n in nodes {
            self.build_node(n)?;
        }
        self.certs(&names)?;
        // As `kubectl apply` of the Gateway, then labelling the nodes.
        self.append_manifest("gateways.yaml", &gateway_doc)?;
        self.append_manifest("nodes.yaml", &node_docs)?;
        for short in shorts {
            self.start_agent(short)?;
        }
        Ok(())
    }
}

impl Lab {
    /// The links of a namespace (only those administratively up, if `up`).
    fn links(&self, short: &str, up: bool) -> Result<Vec<String>, LabError> {
        let args: &[&str] = if up {
            &["-o", "link", "show", "up"]
        } else {
            &["-o", "link", "show"]
        };
        Ok(self
            .ip(short, args)?
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|name| name.split('@').next().unwrap_or(name).to_owned())
            .collect())
    }

    /// Cuts a node's power: first every interface of its namespace goes
    /// down (so it neither answers nor forwards, and nothing the dying
    /// processes send gets out), then its agent and the wireguard-go its
    /// agent recorded die without a word (SIGKILL; the latter only if that
    /// PID still runs wireguard-go in this node's namespace). Its namespace,
    /// addresses and agent store stay, as a disk would.
    pub fn power_off(&mut self, short: &str) -> Result<(), LabError> {
        self.node(short)?;
        let links = self.links(short, true)?;
        for link in &links {
            self.ip(short, &["link", "set", "dev", link, "down"])?;
        }
        self.powered_off.insert(short.to_owned(), links);
        if let Some(agent) = self.agents.remove(short) {
            agent.stop(9);
        }
        if let Some(charon) = self.helpers.remove(&format!("charon-{short}")) {
            charon.stop(9);
        }
        let pid_file = self.wireguard_pid_file(short);
        if recorded_pid(&pid_file).is_some_and(|pid| in_netns(pid, &self.ns(short)))
            && let Some(pid) = kill_recorded(&pid_file, 9, &["wireguard-go"])
        {
            wait_gone(pid, Duration::from_secs(3));
            // Killed, it could not remove its UAPI socket.
            let _ = std::fs::remove_file(uapi_socket(&self.tunnel_dev(short)));
        }
        Ok(())
    }

    /// Powers a node on again: the links [`Lab::power_off`] set down (and
    /// that still exist) come up, and its boot-time routes (default route,
    /// the CNI's) are set again, as a booting machine's network
    /// configuration does. Its agent is not started: [`Lab::start_agent`].
    pub fn power_on(&mut self, short: &str) -> Result<(), LabError> {
        let n = self.node(short)?.clone();
        let links = self
            .powered_off
            .remove(short)
            .ok_or_else(|| LabError::Setup(format!("node {short} is not powered off")))?;
        let present = self.links(short, false)?;
        for link in links.iter().filter(|l| present.contains(l)) {
            self.ip(short, &["link", "set", "dev", link, "up"])?;
        }
        self.boot_routes(&n)
    }

    /// The programs still running of those a node's PID files name (its
    /// agent, its wireguard-go).
    pub fn node_processes(&self, short: &str) -> Vec<String> {
        [
            self.dir.join(format!("edge-{short}.pid")),
            self.wireguard_pid_file(short),
            self.dir.join(format!("helper-charon-{short}.pid")),
        ]
        .iter()
        .filter_map(|f| recorded_pid(f).and_then(running_as))
        .filter(|comm| RECORDED.contains(&comm.as_str()))
        .collect()
    }
}

/// One line of the tunnel paths the demo prints: `(from, to, relayed,
/// endpoint)` by lab short names.
pub type TunnelPath = (String, String, bool, String);

/// What `raven-lab` prints after its cluster came up — the matrix and the
/// tunnel paths — and its verdict, which is computed from exactly what is
/// printed: a FAIL anywhere in it is a failed run.
#[derive(Debug, Clone)]
pub struct Report {
    /// How long the first full matrix took (`None`: none within the timeout).
    pub converged: Option<Duration>,
    /// The matrix printed (measured again after the first full one).
    pub matrix: Vec<(String, String, bool)>,
    /// The tunnel paths the gateways report.
    pub paths: Vec<TunnelPath>,
    /// Gateways that report no path to another gateway that is reported.
    pub missing_paths: Vec<(String, String)>,
}

impl Report {
    /// A report of `matrix` and `paths`, finding the missing paths.
    pub fn new(
        converged: Option<Duration>,
        matrix: Vec<(String, String, bool)>,
        paths: Vec<TunnelPath>,
    ) -> Self {
        let gateways: std::collections::BTreeSet<&String> =
            paths.iter().flat_map(|p| [&p.0, &p.1]).collect();
        let missing_paths = gateways
            .iter()
            .flat_map(|a| gateways.iter().map(move |b| (*a, *b)))
            .filter(|(a, b)| a != b && !paths.iter().any(|p| &p.0 == *a && &p.1 == *b))
            .map(|(a, b)| (a.clone(), b.clone()))
            .collect();
        Self {
            converged,
            matrix,
            paths,
            missing_paths,
        }
    }

    /// Failed pairs of the matrix.
    pub fn matrix_fails(&self) -> usize {
        self.matrix.iter().filter(|m| !m.2).count()
    }

    /// Everything printed is ok: a non-empty matrix without a FAIL, and a
    /// path between every two gateways.
    pub fn ok(&self) -> bool {
        !self.matrix.is_empty()
            && self.matrix_fails() == 0
            && !self.paths.is_empty()
            && self.missing_paths.is_empty()
    }

    /// The matrix and the paths (stdout).
    pub fn render(&self) -> String {
        let mut s = Lab::render(&self.matrix);
        s.push_str("\ntunnel paths (as the gateways report them to the hub):\n");
        if self.paths.is_empty() {
            s.push_str("  FAIL: no gateway reports a tunnel path\n");
        }
        for (from, to, relayed, endpoint) in &self.paths {
            let how = if *relayed { "relayed via" } else { "direct to" };
            s.push_str(&format!("  {from:>3} -> {to:<3} {how} {endpoint}\n"));
        }
        for (from, to) in &self.missing_paths {
            s.push_str(&format!("  {from:>3} -> {to:<3} FAIL: no path reported\n"));
        }
        s
    }

    /// The verdict (stderr), true to what [`Report::render`] shows.
    pub fn verdict(&self) -> String {
        if self.ok() {
            let t = self
                .converged
                .map_or_else(String::new, |t| format!(" (first full matrix after {t:?})"));
            return format!(
                "every node and pod reaches every other{t}, and every gateway reports a tunnel path to every other"
            );
        }
        let mut why = Vec::new();
        if self.converged.is_none() {
            why.push("no full matrix within the timeout".to_owned());
        }
        let fails = self.matrix_fails();
        if fails > 0 || self.matrix.is_empty() {
            why.push(format!(
                "{fails} of {} pairs of the matrix above FAIL",
                self.matrix.len()
            ));
        }
        if self.paths.is_empty() {
            why.push("no tunnel path reported".to_owned());
        } else if !self.missing_paths.is_empty() {
            why.push(format!(
                "{} tunnel path(s) missing",
                self.missing_paths.len()
            ));
        }
        format!("FAIL: {}", why.join("; "))
    }
}

impl Lab {
    /// What the demo prints once the cluster is up (or `timeout` passed):
    /// the matrix measured again, and the tunnel paths once no NATed
    /// gateway is relayed any more (at most `settle`).
    pub fn report(&self, timeout: Duration, settle: Duration) -> Report {
        let (converged, matrix) = match self.converge(timeout) {
            Ok(t) => (Some(t), self.matrix()),
            Err(m) => (None, m),
        };
        // NATed gateways start out relayed through the cloud gateway and
        // move to a hole-punched direct path once it handshakes.
        let deadline = Instant::now() + settle;
        let mut paths = self.tunnel_paths();
        while converged.is_some() && paths.iter().any(|p| p.2) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
            paths = self.tunnel_paths();
        }
        Report::new(converged, matrix, paths)
    }
}

/// Copies the files of `from` into `to`, recursively, leaving out `skip`.
fn copy_files(from: &Path, to: &Path, skip: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        if e.file_name() == skip {
            continue;
        }
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_files(&e.path(), &target, skip)?;
        } else {
            std::fs::copy(e.path(), &target)?;
        }
    }
    Ok(())
}

/// The store's head file (it records the last write made durable).
const STORE_HEAD: &str = "raven-head";

impl Lab {
    /// Rolls a node's cache back as a torn write would (sled truncates its
    /// log at the first damaged entry and so loses acknowledged writes):
    /// stops its agent, keeps a copy of sled's files, restarts the agent so
    /// that it makes more durable writes (it records the hub it reached),
    /// stops it again and puts the old sled files back under the newer
    /// head file. The agent is left stopped; its dataplane stays. Needs the
    /// hub up.
    pub fn tear_cache(&mut self, short: &'static str) -> Result<(), LabError> {
        let cache = self.dir.join(format!("edge-{short}/cache"));
        let old = self.dir.join(format!("edge-{short}-old-sled-files"));
        self.stop_agent(short);
        let _ = std::fs::remove_dir_all(&old);
        copy_files(&cache, &old, STORE_HEAD)?;
        let log = self.dir.join(format!("edge-{short}.log"));
        let connected = || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .matches("connected to hub")
                .count()
        };
        let before = connected();
        self.start_agent(short)?;
        let t = Instant::now();
        while connected() == before {
            if t.elapsed() > Duration::from_secs(30) {
                return Err(LabError::Setup(format!(
                    "{short}: the agent did not reach the hub to write to its cache"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The hub address is recorded right after connecting.
        std::thread::sleep(Duration::from_millis(500));
        self.stop_agent(short);
        for e in std::fs::read_dir(&cache)? {
            let e = e?;
            if e.file_name() == STORE_HEAD {
                continue;
            }
            if e.file_type()?.is_dir() {
                std::fs::remove_dir_all(e.path())?;
            } else {
                std::fs::remove_file(e.path())?;
            }
        }
        copy_files(&old, &cache, STORE_HEAD)?;
        std::fs::remove_dir_all(&old)?;
        Ok(())
    }

    /// `GET /readyz` of a node's agent: the HTTP status (0: no answer) and
    /// the body.
    pub fn readyz(&self, short: &str) -> (u16, String) {
        let out = self
            .exec(
                short,
                &[
                    "curl",
                    "-s",
                    "-m",
                    "1",
                    "-w",
                    "\n%{http_code}",
                    "http://127.0.0.1:10273/readyz",
                ],
            )
            .unwrap_or_default();
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    /// The MTU of the route a node has in table 9027 for `dst` (`None`:
    /// no such route, or no MTU on it).
    pub fn route_mtu(&self, short: &str, dst: &str) -> Option<u32> {
        let out = self
            .ip(short, &["-j", "-d", "route", "show", "table", "9027", dst])
            .ok()?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        v.as_array()?.iter().find_map(|r| {
            r["metrics"]
                .as_array()?
                .iter()
                .find_map(|m| m["mtu"].as_u64())
                .and_then(|m| u32::try_from(m).ok())
        })
    }

    /// Whether one ICMP echo with `payload` bytes and Don't Fragment set
    /// goes from `src` (an address of `from_ns`) to `to` and back.
    pub fn ping_df(&self, from_ns: &str, src: &str, to: &str, payload: u32) -> bool {
        self.exec(
            from_ns,
            &[
                "ping",
                "-c1",
                "-W1",
                "-M",
                "do",
                "-s",
                &payload.to_string(),
                "-I",
                src,
                to,
            ],
        )
        .is_ok()
    }
}

impl Lab {
    /// Switches the lab to IPsec before anything runs: `vpn-driver: ipsec`
    /// in its `raven-cfg`, and a charon on every node started with its
    /// agent.
    pub fn use_ipsec(&mut self) -> Result<(), LabError> {
        if !Path::new(CHARON).exists() {
            return Err(LabError::MissingBinary(CHARON.into()));
        }
        self.edit_manifest(
            "raven-cfg.yaml",
            "enable-l3-tunnel: \"true\"",
            "enable-l3-tunnel: \"true\"\n  vpn-driver: ipsec",
        )?;
        self.vpn = Vpn::Ipsec;
        Ok(())
    }

    /// The VICI socket of a node's charon.
    pub fn charon_vici(&self, short: &str) -> PathBuf {
        self.dir.join(format!("charon-{short}.vici"))
    }

    /// Whether the charon this lab started on a node still runs.
    pub fn charon_running(&self, short: &str) -> bool {
        recorded_pid(&self.dir.join(format!("helper-charon-{short}.pid")))
            .and_then(running_as)
            .is_some_and(|comm| comm == "charon")
    }

    /// Starts a node's charon: the `strongswan.conf` `raven-edge
    /// charon-conf` prints (libipsec, UDP 4500, its own VICI socket and
    /// log), a `/run` of its own (a tmpfs in a mount namespace of its own:
    /// charon keeps its PID file there), and waits for its VICI socket.
    pub fn start_charon(&mut self, short: &str) -> Result<(), LabError> {
        let vici = self.charon_vici(short);
        let conf = self.dir.join(format!("charon-{short}.conf"));
        let text = run(
            self.edge_exe.to_str().unwrap_or_default(),
            &[
                "charon-conf",
                "--vici",
                &vici.to_string_lossy(),
                "--log",
                &self.path(&format!("charon-{short}.ike.log")),
            ],
        )?;
        std::fs::write(&conf, text)?;
        // A socket left by a charon that was killed.
        let _ = std::fs::remove_file(&vici);
        let script = format!(
            "mount -t tmpfs raven-charon /run && STRONGSWAN_CONF={} exec {CHARON}",
            conf.display()
        );
        let args = ["-m", "sh", "-c", &script].map(str::to_owned);
        self.spawn_helper(
            short,
            &format!("charon-{short}"),
            Path::new("unshare"),
            &args,
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !vici.exists() {
            if Instant::now() > deadline {
                return Err(LabError::Setup(format!(
                    "the charon of {short} opened no VICI socket at {} within 10 s",
                    vici.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

#[cfg(test)]
mod report_tests {
    use super::*;

    fn paths() -> Vec<TunnelPath> {
        let p = |a: &str, b: &str| (a.to_owned(), b.to_owned(), false, "x:4500".to_owned());
        vec![
            p("c1", "h1"),
            p("c1", "q1"),
            p("h1", "c1"),
            p("h1", "q1"),
            p("q1", "c1"),
            p("q1", "h1"),
        ]
    }

    fn matrix(fail: bool) -> Vec<(String, String, bool)> {
        vec![
            ("c1 node".into(), "h1 pod".into(), true),
            ("h1 pod".into(), "q1 pod".into(), !fail),
        ]
    }

    #[test]
    fn a_fail_in_the_printed_matrix_fails_the_run_even_after_a_full_matrix_was_seen() {
        // The first full matrix came after 2 s; the one printed has a FAIL.
        let r = Report::new(Some(Duration::from_secs(2)), matrix(true), paths());
        assert!(!r.ok());
        assert!(r.render().contains("FAIL"), "{}", r.render());
        let v = r.verdict();
        assert!(v.starts_with("FAIL") && v.contains("1 of 2 pairs"), "{v}");
        assert!(!v.contains("every node and pod reaches every other"), "{v}");
    }

    #[test]
    fn a_missing_tunnel_path_fails_the_run_and_is_printed() {
        let mut p = paths();
        p.retain(|x| !(x.0 == "h1" && x.1 == "q1"));
        let r = Report::new(Some(Duration::from_secs(2)), matrix(false), p);
        assert!(!r.ok());
        assert!(
            r.render().contains(" h1 -> q1  FAIL: no path reported"),
            "{}",
            r.render()
        );
        assert!(r.verdict().contains("1 tunnel path(s) missing"));
        let none = Report::new(Some(Duration::from_secs(2)), matrix(false), vec![]);
        assert!(!none.ok() && none.render().contains("FAIL"));
    }

    #[test]
    fn only_an_all_ok_report_says_everything_reaches_everything() {
        let r = Report::new(Some(Duration::from_secs(2)), matrix(false), paths());
        assert!(r.ok());
        assert!(!r.render().contains("FAIL"));
        assert!(
            r.verdict()
                .starts_with("every node and pod reaches every other")
        );
    }
}
