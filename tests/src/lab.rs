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

const CLOUD_PUBLIC: &str = "203.0.113.10";

/// Errors building or driving the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("`{cmd}` failed: {out}")]
    Command { cmd: String, out: String },
    #[error("running `{cmd}`: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("{0} is not built: run `cargo build --workspace --bins` first")]
    MissingBinary(PathBuf),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn run(cmd: &str, args: &[&str]) -> Result<String, LabError> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|source| LabError::Spawn {
            cmd: cmd.into(),
            source,
        })?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd: format!("{cmd} {}", args.join(" ")),
            out: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A process the lab started; stopped by PID.
#[derive(Debug)]
pub struct Proc(Child);

impl Proc {
    /// Sends `signal` and reaps the process.
    pub fn stop(mut self, signal: i32) {
        let _ = Command::new("kill")
            .args([format!("-{signal}"), self.0.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.0.id().to_string()])
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.0.wait();
    }
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
    /// recorded), then deletes its namespaces by name.
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
                    if let Some(pid) = std::fs::read_to_string(&pid_file)
                        .ok()
                        .map(|p| p.trim().to_owned())
                    {
                        let _ = Command::new("kill")
                            .args(["-TERM", &pid])
                            .stderr(Stdio::null())
                            .status();
                    }
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
    }

    /// Whether a process this lab recorded is still running.
    fn leftover_pids(dir: &Path) -> bool {
        let mut pids = Vec::new();
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
                    pids.extend(
                        std::fs::read_to_string(&p)
                            .ok()
                            .map(|s| s.trim().to_owned()),
                    );
                }
            }
        }
        // A zombie (state Z) has exited; only its parent can reap it.
        pids.iter().any(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|st| st.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
                .unwrap_or(false)
        })
    }

    /// Builds the networks (no raven yet).
    pub fn build(prefix: &str, dir: &Path) -> Result<Self, LabError> {
        Self::clean(prefix, dir);
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let lab = Self {
            prefix: prefix.to_owned(),
            dir: dir.to_owned(),
            hub_exe: binary("raven-hub")?,
            edge_exe: binary("raven-edge")?,
            hub: None,
            agents: BTreeMap::new(),
            nodes: NODES.to_vec(),
        };
        for ns in ["inet", "hzrt", "qdrt", "cloudsw", "hzsw", "qdsw"]
            .iter()
            .chain(NODES.iter().map(|n| &n.short))
        {
            run("ip", &["netns", "add", &lab.ns(ns)])?;
            lab.ip(ns, &["link", "set", "lo", "up"])?;
        }
        // Switches: a bridge per segment.
        for (sw, br) in [
            ("inet", "wanbr"),
            ("cloudsw", "lanbr"),
            ("hzsw", "lanbr"),
            ("qdsw", "lanbr"),
        ] {
            lab.ip(sw, &["link", "add", br, "type", "bridge"])?;
            lab.ip(sw, &["link", "set", br, "up"])?;
        }
        // Routers: LAN side on the site switch, WAN side on the internet.
        for (rt, sw, lan, wan) in [
            ("hzrt", "hzsw", "172.16.2.1/24", "203.0.113.20/24"),
            ("qdrt", "qdsw", "172.16.1.1/24", "203.0.113.30/24"),
        ] {
            lab.plug(rt, "lan", sw, "lanbr", lan)?;
            lab.plug(rt, "wan", "inet", "wanbr", wan)?;
            lab.exec(rt, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            lab.exec(rt, &["nft", "add table ip nat; add chain ip nat post { type nat hook postrouting priority 100; }; add rule ip nat post oifname \"wan\" masquerade"])?;
        }
        for n in &NODES {
            let sw = match n.domain {
                "cloud" => "cloudsw",
                "hangzhou" => "hzsw",
                _ => "qdsw",
            };
            lab.plug(n.short, "eth0", sw, "lanbr", &format!("{}/24", n.ip))?;
            // The pod stand-in.
            lab.ip(
                n.short,
                &[
                    "link", "add", "pod0", "type", "veth", "peer", "name", "pod1",
                ],
            )?;
            lab.ip(
                n.short,
                &["addr", "add", &format!("{}/24", n.pod), "dev", "pod0"],
            )?;
            lab.ip(n.short, &["link", "set", "pod0", "up"])?;
            lab.ip(n.short, &["link", "set", "pod1", "up"])?;
            match n.domain {
                "hangzhou" => lab
                    .ip(n.short, &["route", "add", "default", "via", "172.16.2.1"])
                    .map(drop)?,
                "qingdao" => lab
                    .ip(n.short, &["route", "add", "default", "via", "172.16.1.1"])
                    .map(drop)?,
                _ => {}
            }
        }
        // The cloud gateway's public address.
        lab.plug("c1", "wan0", "inet", "wanbr", &format!("{CLOUD_PUBLIC}/24"))?;
        // The CNI's job inside each domain: pod subnets of the other nodes
        // of the same domain via their node address.
        for a in &NODES {
            for b in NODES
                .iter()
                .filter(|b| b.domain == a.domain && b.short != a.short)
            {
                let net = format!("{}.0/24", b.pod.rsplit_once('.').map_or("", |x| x.0));
                lab.ip(a.short, &["route", "add", &net, "via", b.ip])?;
            }
        }
        lab.certs()?;
        let manifests = lab.dir.join("manifests");
        std::fs::create_dir_all(&manifests)?;
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/user-manual");
        for f in ["gateways.yaml", "nodes.yaml", "raven-cfg.yaml"] {
            std::fs::copy(example.join(f), manifests.join(f))?;
        }
        Ok(lab)
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

    fn certs(&self) -> Result<(), LabError> {
        let out = self.path("certs");
        let nodes: Vec<&str> = NODES.iter().map(|n| n.name).collect();
        run(
            self.hub_exe.to_str().unwrap_or_default(),
            &[
                "certs",
                "--out",
                &out,
                "--hub-name",
                CLOUD_PUBLIC,
                "--hub-name",
                "192.168.0.195",
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
        self.hub = Some(self.spawn("c1", &self.hub_exe.clone(), &args, "hub.log")?);
        Ok(())
    }

    /// Tunnel device name of a node: unique per lab (the UAPI socket
    /// directory is shared by the whole machine).
    pub fn tunnel_dev(&self, short: &str) -> String {
        format!("{}{short}wg", self.prefix)
    }

    /// Starts (or restarts) the agent of a node.
    pub fn start_agent(&mut self, short: &'static str) -> Result<(), LabError> {
        let n = self
            .nodes
            .iter()
            .find(|n| n.short == short)
            .cloned()
            .unwrap_or_else(|| NODES[0].clone());
        let hub = if n.domain == "cloud" {
            "https://192.168.0.195:10270"
        } else {
            "https://203.0.113.10:10270"
        };
        let args: Vec<String> = [
            "run",
            "--node",
            n.name,
            "--data-dir",
            &self.path(&format!("edge-{short}")),
            "--hub",
            hub,
            "--certs",
            &self.path("certs"),
            "--http-addr",
            "127.0.0.1:10273",
            "--resync",
            "1s",
            "--heartbeat",
            "1s",
            "--tunnel-dev",
            &self.tunnel_dev(short),
        ]
        .map(str::to_owned)
        .to_vec();
        let proc = self.spawn(
            short,
            &self.edge_exe.clone(),
            &args,
            &format!("edge-{short}.log"),
        )?;
        self.agents.insert(short, proc);
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
        let mut out = Vec::new();
        for a in &self.nodes {
            for b in self.nodes.iter().filter(|b| b.short != a.short) {
                for (src, slabel) in [(a.ip, "node"), (a.pod, "pod")] {
                    for (dst, dlabel) in [(b.ip, "node"), (b.pod, "pod")] {
                        let ok = self.ping(a.short, src, dst);
                        out.push((
                            format!("{} {slabel}", a.short),
                            format!("{} {dlabel}", b.short),
                            ok,
                        ));
                    }
                }
            }
        }
        out
    }

    /// Waits until every pair reaches every other (or `timeout`); returns
    /// the time it took.
    pub fn converge(&self, timeout: Duration) -> Result<Duration, Vec<(String, String, bool)>> {
        let t = Instant::now();
        loop {
            // A cheap probe first: the longest path, hangzhou pod to qingdao pod.
            if self.ping("h2", "10.244.2.1", "10.244.4.1")
                && self.ping("q2", "10.244.4.1", "10.244.2.1")
            {
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
        for (_, a) in std::mem::take(&mut self.agents) {
            a.stop(15);
        }
        if let Some(h) = self.hub.take() {
            h.stop(15);
        }
        for n in &self.nodes {
            let pid_file = self.dir.join(format!(
                "edge-{}/wireguard-go-{}.pid",
                n.short,
                self.tunnel_dev(n.short)
            ));
            if let Some(pid) = std::fs::read_to_string(&pid_file)
                .ok()
                .map(|p| p.trim().to_owned())
            {
                let _ = Command::new("kill")
                    .args(["-TERM", &pid])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }

    /// The last lines of every log, for failure reports.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for l in std::iter::once("hub.log".to_owned())
            .chain(self.nodes.iter().map(|n| format!("edge-{}.log", n.short)))
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
    fn drop(&mut self) {
        self.stop_all();
        Self::clean(&self.prefix, &self.dir);
    }
}

impl Lab {
    /// Replaces `from` by `to` in the lab's copy of a manifest file.
    pub fn edit_manifest(&self, file: &str, from: &str, to: &str) -> Result<(), LabError> {
        let path = self.dir.join("manifests").join(file);
        let text = std::fs::read_to_string(&path)?;
        if !text.contains(from) {
            return Err(LabError::Command {
                cmd: format!("edit {file}"),
                out: format!("{from:?} not found"),
            });
        }
        std::fs::write(&path, text.replacen(from, to, 1))?;
        Ok(())
    }

    /// Runs grpcurl on the hub's loopback plaintext listener.
    pub fn grpcurl(&self, method: &str) -> Result<String, LabError> {
        self.exec("c1", &["grpcurl", "-plaintext", "127.0.0.1:10271", method])
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
        let (sw, router, gateway) = match node.domain {
            "cloud" => ("cloudsw", None, "gw-cloud"),
            "hangzhou" => ("hzsw", Some("172.16.2.1"), "gw-hangzhou"),
            _ => ("qdsw", Some("172.16.1.1"), "gw-qingdao"),
        };
        run("ip", &["netns", "add", &self.ns(node.short)])?;
        self.ip(node.short, &["link", "set", "lo", "up"])?;
        self.plug(node.short, "eth0", sw, "lanbr", &format!("{}/24", node.ip))?;
        self.ip(
            node.short,
            &[
                "link", "add", "pod0", "type", "veth", "peer", "name", "pod1",
            ],
        )?;
        self.ip(
            node.short,
            &["addr", "add", &format!("{}/24", node.pod), "dev", "pod0"],
        )?;
        self.ip(node.short, &["link", "set", "pod0", "up"])?;
        self.ip(node.short, &["link", "set", "pod1", "up"])?;
        if let Some(r) = router {
            self.ip(node.short, &["route", "add", "default", "via", r])?;
        }
        let net = |pod: &str| format!("{}.0/24", pod.rsplit_once('.').map_or("", |x| x.0));
        for other in self.nodes.iter().filter(|o| o.domain == node.domain) {
            self.ip(
                node.short,
                &["route", "add", &net(other.pod), "via", other.ip],
            )?;
            self.ip(
                other.short,
                &["route", "add", &net(node.pod), "via", node.ip],
            )?;
        }
        run(
            self.hub_exe.to_str().unwrap_or_default(),
            &[
                "certs",
                "--out",
                &self.path("certs"),
                "--hub-name",
                CLOUD_PUBLIC,
                "--hub-name",
                "192.168.0.195",
                "--node",
                node.name,
            ],
        )?;
        let doc = format!(
            "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {}\n  labels:\n    raven.openyurt.io/gateway: {gateway}\nspec:\n  podCIDR: {}\nstatus:\n  conditions:\n    - type: Ready\n      status: \"True\"\n  addresses:\n    - type: InternalIP\n      address: {}\n",
            node.name,
            net(node.pod),
            node.ip
        );
        let path = self.dir.join("manifests/nodes.yaml");
        let mut text = std::fs::read_to_string(&path)?;
        text.push_str(&doc);
        std::fs::write(&path, text)?;
        let short = node.short;
        self.nodes.push(node);
        self.start_agent(short)
    }
}
