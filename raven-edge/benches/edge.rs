//! Edge benchmarks: how fast one agent programs its kernel, measured
//! against `ip -batch` of the same routes in the same run.
//!
//! Run as root (it creates the network namespace `rbench<pid>` and deletes
//! it by name when done, also on failure):
//!
//! ```text
//! cargo bench -p raven-edge --bench edge                    # 1,000 gateways × 10 nodes
//! cargo bench -p raven-edge --bench edge -- --gateways 100 --rounds 1 --changes 100
//! ```
//!
//! The node is a member (not the gateway) of `g0` in a cluster of
//! `--gateways` gateways of `--nodes` nodes each: it routes every other
//! node's address and pod subnet over `raven0` (2 × nodes × (gateways − 1)
//! routes; 19,980 at the default size) and exempts them from the CNI's
//! masquerade (`RAVEN-SKIP-NAT-DST`). Figures:
//!
//! - full install: raven's netlink writer vs `ip -batch` of the same
//!   `route add` lines into an empty table (the ratio is the goal's figure);
//!   the whole first reconcile (observe, plan, apply, skip-NAT) beside it;
//! - no-op resync: a reconcile when nothing changed;
//! - one-node change: one remote node's pod subnet moves; the reconcile's
//!   time, routes touched and skip-NAT rules touched;
//! - the same change on a compact member (its own gateway, the other
//!   domains as `prefixes/` sets): the change pass, and its planning
//!   patched vs planned in full in the same run;
//! - cold start from cache, hub down: open the sled cache, decode it, build
//!   the inputs and reconcile — with the kernel still programmed (agent
//!   restart) and with an empty kernel (node reboot);
//! - store size across `--changes` one-node changes committed to a real
//!   sled cache.
//!
//! Every install is checked exact (the kernel's routes are the planned
//! ones) before its time counts. `tests/edge_bench.rs` runs this at a small
//! size so it keeps working; timing is printed, never asserted.

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net};
use raven_edge::cache::{Accepted, Cache, CachedState};
use raven_edge::dataplane::{self, Kernel, NodeInputs, Op, model, netlink, skipnat};
use raven_model::fixtures;
use raven_model::topology::{
    ExposeType, GatewayEndpoint, GatewayView, Member, NodeView, Resource, ResourceBody,
};
use raven_model::{GatewayName, NodeName, ResourceName};

/// What to measure.
#[derive(Debug, Clone)]
pub struct Config {
    pub gateways: u32,
    pub nodes: u32,
    /// Repetitions of each timed figure (the median is reported).
    pub rounds: usize,
    /// One-node changes committed to the store.
    pub changes: u32,
    /// WireGuard peers programmed (raven vs `wg setconf`).
    pub peers: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            gateways: 1000,
            nodes: 10,
            rounds: 3,
            changes: 1000,
            peers: 1000,
        }
    }
}

impl Config {
    /// The size CI runs.
    pub fn small() -> Self {
        Self {
            gateways: 20,
            nodes: 5,
            rounds: 1,
            changes: 50,
            peers: 50,
        }
    }

    fn parse(args: impl Iterator<Item = String>) -> Self {
        let mut c = Self::default();
        let mut args = args.peekable();
        while let Some(a) = args.next() {
            let mut num = || -> u32 {
                args.next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("{a} needs a number"))
            };
            match a.as_str() {
                "--gateways" => c.gateways = num().max(2),
                "--nodes" => c.nodes = num().clamp(2, 16),
                "--rounds" => c.rounds = num().max(1) as usize,
                "--changes" => c.changes = num(),
                "--peers" => c.peers = num(),
                "--small" => c = Self::small(),
                // cargo bench passes --bench; anything else is a mistake.
                "--bench" => {}
                other => panic!("unknown argument {other}"),
            }
        }
        c
    }
}

/// One measured figure.
#[derive(Debug, Clone)]
pub struct Figure {
    pub name: String,
    pub value: String,
}

/// Everything one run measured; also printed as it goes.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub figures: Vec<Figure>,
    /// Routes raven installs on a full install.
    pub routes: usize,
    /// Skip-NAT destination rules of the node.
    pub skip_nat_destinations: usize,
    /// Routes and skip-NAT rules the one-node change touched.
    pub change_routes_touched: usize,
    pub change_skip_nat_touched: usize,
    /// Kernel changes of a reconcile when nothing changed.
    pub noop_ops: usize,
    /// What the change pass of a one-node change read and wrote, and the
    /// skip-NAT rules that differ between before and after.
    pub change_pass: dataplane::Io,
    pub change_pass_nat_differ: usize,
    /// Operations of the cold start with the kernel already programmed.
    pub warm_restart_ops: usize,
    /// Store directory sizes: after the first commit, largest, last.
    pub store_bytes: (u64, u64, u64),
    /// WireGuard peers programmed by both raven and `wg setconf`, checked.
    pub wireguard_peers: usize,
}

impl Report {
    fn add(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let f = Figure {
            name: name.into(),
            value: value.into(),
        };
        println!("{:<58} {}", f.name, f.value);
        self.figures.push(f);
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn name(s: String) -> NodeName {
    NodeName::new(s).unwrap()
}

fn gw_name(i: u32) -> GatewayName {
    GatewayName::new(format!("g{i}")).unwrap()
}

/// Node `j` of gateway `i`: `172.16.0.0 + 16 i + j`, pod subnet
/// `10.0.0.0/24 + 16 i + j` (a domain's nodes share a block, as in a real
/// cluster, so its prefixes aggregate into a few skip-NAT rules).
pub fn node_ip(i: u32, j: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + 16 * i + j)
}

fn pod_subnet(k: u32) -> IpNet {
    let base = u32::from(Ipv4Addr::new(10, 0, 0, 0)) + (k << 8);
    IpNet::V4(Ipv4Net::new(Ipv4Addr::from(base), 24).unwrap())
}

pub fn gateway(i: u32, nodes: u32) -> GatewayView {
    let endpoint = GatewayEndpoint {
        public_ip: Some(IpAddr::V4(Ipv4Addr::from(
            u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i,
        ))),
        ..fixtures::endpoint(&format!("g{i}-n0"), 4500)
    };
    GatewayView {
        expose_type: ExposeType::PublicIP,
        active_tunnel: Some(endpoint.clone()),
        members: (0..nodes)
            .map(|j| Member {
                node: name(format!("g{i}-n{j}")),
                private_ip: IpAddr::V4(node_ip(i, j)),
                subnets: vec![pod_subnet(16 * i + j)],
                ready: true,
            })
            .collect(),
        tunnel_candidates: vec![endpoint],
        ..fixtures::gateway(gw_name(i).as_str())
    }
}

fn me() -> NodeView {
    NodeView {
        private_ip: Some(IpAddr::V4(node_ip(0, 1))),
        subnets: vec![pod_subnet(1)],
        ..fixtures::node_view("g0-n1", Some(gw_name(0).as_str()))
    }
}

pub fn inputs(gateways: Vec<GatewayView>) -> NodeInputs {
    NodeInputs {
        me: Some(me()),
        gateways,
        settings: Some(fixtures::settings()),
        ..Default::default()
    }
}

/// The compact member view of the benchmark's node: its own gateway and
/// every other domain as its prefix set (what the hub sends a member that
/// is neither tunnel candidate nor active proxy).
pub fn compact_inputs(gateways: Vec<GatewayView>) -> NodeInputs {
    model::compact_view(&inputs(gateways))
}

/// The one-node change: node 3 of the middle gateway gets a new pod subnet
/// (`round` picks a different one each time).
pub fn change_one_node(gateways: &mut [GatewayView], round: u32) {
    let g = gateways.len() / 2;
    let k = 16 * u32::try_from(gateways.len()).unwrap() + round;
    gateways[g].members[3].subnets = vec![pod_subnet(k)];
}

/// A network namespace this run created; deleted by name on drop.
struct Netns(String);

impl Netns {
    fn create() -> Self {
        let ns = Self(format!("rbench{}", std::process::id()));
        sh(&["ip", "netns", "add", &ns.0]);
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs `args`, failing loudly.
fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The routes raven wants, as `ip -batch` lines.
/// `iptables-restore -w 5 --noflush` of `script`; panics when refused.
fn restore(script: &str) {
    use std::io::Write as _;
    let mut child = Command::new("iptables-restore")
        .args(["-w", "5", "--noflush"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "refused: {script}");
}

fn batch_lines(routes: &[&model::Route]) -> String {
    let mut s = String::new();
    for r in routes {
        let via = r
            .via
            .map(|v| format!(" via {v} onlink"))
            .unwrap_or_default();
        let mtu = if r.mtu > 0 {
            format!(" mtu {}", r.mtu)
        } else {
            String::new()
        };
        s.push_str(&format!(
            "route add {} dev {}{via} table {} proto {}{mtu}\n",
            r.dst,
            model::VXLAN_DEV,
            r.table,
            model::ROUTE_PROTOCOL
        ));
    }
    s
}

/// The writer raven had before pipelining, as a baseline: one rtnetlink
/// request at a time, each awaiting its ACK.
async fn one_at_a_time(h: &rtnetlink::Handle, routes: &[&model::Route]) {
    let index = netlink::vxlan_index(h).await.unwrap().unwrap();
    for r in routes {
        let mut b = rtnetlink::RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(r.dst.addr(), r.dst.prefix_len())
            .unwrap()
            .output_interface(index)
            .table_id(r.table)
            .protocol(netlink_packet_route::route::RouteProtocol::from(
                model::ROUTE_PROTOCOL,
            ));
        if let Some(via) = r.via {
            b = b.gateway(via).unwrap().onlink();
        }
        if r.mtu > 0 {
            b.get_mut()
                .attributes
                .push(netlink_packet_route::route::RouteAttribute::Metrics(vec![
                    netlink_packet_route::route::RouteMetric::Mtu(r.mtu),
                ]));
        }
        h.route().add(b.build()).execute().await.unwrap();
    }
}

/// Empties raven's tables (a table that does not exist is empty).
fn flush_routes() {
    for table in [model::TABLE_REMOTE, model::TABLE_RETURN] {
        let t = table.to_string();
        for family in ["-4", "-6"] {
            let out = Command::new("ip")
                .args([family, "route", "flush", "table", &t])
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() || err.contains("does not exist"),
                "ip {family} route flush table {t}: {err}"
            );
        }
    }
}

/// Raven's routes in the kernel now, checked against `want`.
async fn check_exact(want: &model::State, what: &str) {
    let h = netlink::connect().unwrap();
    let have = netlink::observe(&h, devs()).await.unwrap();
    assert_eq!(
        have.routes.len(),
        want.routes.len(),
        "{what}: route count in the kernel"
    );
    assert!(have.routes == want.routes, "{what}: routes differ");
}

fn devs() -> netlink::TunnelDevs<'static> {
    netlink::TunnelDevs {
        tunnel: model::DEFAULT_TUNNEL_DEV,
        direct: "",
    }
}

fn dir_size(p: &Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            n += if m.is_dir() {
                dir_size(&e.path())
            } else {
                m.len()
            };
        }
    }
    n
}

/// What the benchmark's node knows of itself (the agent's view of it).
fn local() -> dataplane::Local {
    dataplane::Local::new(model::DEFAULT_TUNNEL_DEV, 1500)
}

/// The cluster as cached resources (what the hub sends a member).
fn cached_state(gateways: &[GatewayView], revision: u64) -> CachedState {
    let mut resources = BTreeMap::new();
    let me = me();
    resources.insert(
        ResourceName::node(&me.name),
        Resource::new(ResourceBody::Node(me)),
    );
    resources.insert(
        ResourceName::settings(),
        Resource::new(ResourceBody::Settings(fixtures::settings())),
    );
    for g in gateways {
        resources.insert(
            ResourceName::gateway(&g.name),
            Resource::new(ResourceBody::Gateway(g.clone())),
        );
    }
    CachedState {
        epoch: "bench".into(),
        revision,
        complete: true,
        resources,
    }
}

/// The cache commit that turns `held` into `next`.
fn accepted(held: &CachedState, next: CachedState) -> Accepted {
    let put = next
        .resources
        .iter()
        .filter(|(n, r)| held.resources.get(*n) != Some(*r))
        .map(|(n, r)| (n.clone(), r.clone()))
        .collect();
    let remove = held
        .resources
        .keys()
        .filter(|n| !next.resources.contains_key(*n))
        .cloned()
        .collect();
    Accepted { next, put, remove }
}

/// A wireguard-go this run started for device `dev` (in the calling
/// thread's network namespace); stopped by its PID on drop.
struct WireguardGo(std::process::Child);

impl WireguardGo {
    async fn start(dev: &str) -> Self {
        let child = Command::new("wireguard-go")
            .args(["-f", dev])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let wg = Self(child);
        let t = Instant::now();
        while raven_edge::tunnel::uapi::get(dev).await.is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "wireguard-go {dev} never answered on its socket"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        wg
    }
}

impl Drop for WireguardGo {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

/// `n` gateway peers as a gateway's tunnel has them: an endpoint each (in
/// the namespace's underlay; no keepalive, so nothing is ever sent) and
/// two prefixes (the remote domain's pod block and its nodes).
fn wireguard_spec(n: u32) -> raven_edge::tunnel::TunnelSpec {
    use raven_edge::tunnel::{PeerPath, PeerSpec, keys::KeyPair};
    let peers = (1..=n)
        .map(|i| {
            let pods = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 0)) + (i << 12));
            let nodes = node_ip(i, 0);
            let spec = PeerSpec {
                node: name(format!("g{i}-n0")),
                gateway: gw_name(i),
                endpoint: Some(std::net::SocketAddr::new(IpAddr::V4(nodes), 4500)),
                allowed_ips: [
                    IpNet::V4(Ipv4Net::new(pods, 20).unwrap()),
                    IpNet::V4(Ipv4Net::new(nodes, 28).unwrap()),
                ]
                .into(),
                keepalive: 0,
                relays_for: vec![],
                path: PeerPath::Active,
            };
            (KeyPair::ephemeral().public_key(), spec)
        })
        .collect();
    raven_edge::tunnel::TunnelSpec {
        listen_port: 51820,
        peers,
        warnings: vec![],
    }
}

/// `spec` as a `wg setconf` file, with private key `private` and port `port`.
fn wg_conf(spec: &raven_edge::tunnel::TunnelSpec, private: &str, port: u16) -> String {
    let mut s = format!("[Interface]\nPrivateKey = {private}\nListenPort = {port}\n");
    for (key, p) in &spec.peers {
        let ips: Vec<String> = p.allowed_ips.iter().map(ToString::to_string).collect();
        s.push_str(&format!("\n[Peer]\nPublicKey = {}\n", key.to_base64()));
        if let Some(e) = p.endpoint {
            s.push_str(&format!("Endpoint = {e}\n"));
        }
        s.push_str(&format!("AllowedIPs = {}\n", ips.join(", ")));
    }
    s
}

/// The peers a device holds: key → (endpoint, allowed IPs), checked
/// against `spec`.
async fn check_peers(dev: &str, spec: &raven_edge::tunnel::TunnelSpec, what: &str) {
    let have = raven_edge::tunnel::uapi::get(dev).await.unwrap();
    assert_eq!(have.peers.len(), spec.peers.len(), "{what}: peer count");
    for (key, p) in &spec.peers {
        let got = have
            .peers
            .get(key)
            .unwrap_or_else(|| panic!("{what}: a peer is missing"));
        assert_eq!(got.endpoint, p.endpoint, "{what}: endpoint");
        let ips: std::collections::BTreeSet<IpNet> = got.allowed_ips.iter().copied().collect();
        assert_eq!(ips, p.allowed_ips, "{what}: allowed IPs");
    }
}

/// raven's WireGuard peer programming (UAPI, as a minimal diff) against
/// `wg setconf` of the same configuration, each on a wireguard-go device of
/// its own in this namespace, both emptied before each round.
async fn wireguard(cfg: &Config, report: &mut Report) {
    let pid = std::process::id() % 1_000_000;
    let (ours, theirs) = (format!("rbw{pid}a"), format!("rbw{pid}b"));
    let _a = WireguardGo::start(&ours).await;
    let _b = WireguardGo::start(&theirs).await;
    let dir = tempfile::tempdir().unwrap();
    let tunnel = raven_edge::tunnel::Tunnel::new(
        ours.clone(),
        dir.path(),
        raven_edge::tunnel::backend::Backend::Userspace,
    )
    .unwrap()
    .with_wireguard_go(raven_edge::tunnel::backend::WireguardGo::External);
    tunnel.ensure_device(1420, None).await.unwrap();
    sh(&["ip", "link", "set", &theirs, "up"]);
    let spec = wireguard_spec(cfg.peers);
    let private = sh(&["wg", "genkey"]).trim().to_owned();
    let conf = dir.path().join("full.conf");
    std::fs::write(&conf, wg_conf(&spec, &private, 51821)).unwrap();
    let empty = dir.path().join("empty.conf");
    std::fs::write(&empty, "[Interface]\n").unwrap();
    let (conf, empty) = (conf.to_string_lossy(), empty.to_string_lossy());
    let (mut raven, mut setconf, mut noop) = (vec![], vec![], vec![]);
    for _ in 0..cfg.rounds {
        sh(&["wg", "setconf", &ours, &empty]);
        sh(&["wg", "setconf", &theirs, &empty]);
        let t = Instant::now();
        tunnel.apply(&spec).await.unwrap();
        raven.push(t.elapsed());
        check_peers(&ours, &spec, "raven").await;
        let t = Instant::now();
        sh(&["wg", "setconf", &theirs, &conf]);
        setconf.push(t.elapsed());
        check_peers(&theirs, &spec, "wg setconf").await;
        let t = Instant::now();
        let change = tunnel.apply(&spec).await.unwrap();
        noop.push(t.elapsed());
        assert!(change.is_empty(), "a second apply changes nothing");
    }
    let (raven, setconf) = (median(raven), median(setconf));
    report.add(
        format!("wireguard-go, {} peers: wg setconf", cfg.peers),
        ms(setconf),
    );
    report.add(
        format!(
            "wireguard-go, {} peers: raven (UAPI get + diff + set)",
            cfg.peers
        ),
        ms(raven),
    );
    report.add(
        "wireguard-go: ratio raven / wg setconf",
        format!("{:.2}", raven.as_secs_f64() / setconf.as_secs_f64()),
    );
    report.add(
        "wireguard-go: raven re-apply, nothing changed (get + diff)",
        ms(median(noop)),
    );
    report.wireguard_peers = cfg.peers as usize;
}

/// Runs every figure inside a fresh network namespace.
pub fn run(cfg: &Config) -> Report {
    let ns = Netns::create();
    let path = format!("/var/run/netns/{}", ns.0);
    let cfg = cfg.clone();
    let report = std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap();
        nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(run_in_namespace(&cfg))
    })
    .join();
    drop(ns);
    report.unwrap_or_else(|p| std::panic::resume_unwind(p))
}

async fn run_in_namespace(cfg: &Config) -> Report {
    let mut report = Report::default();
    println!(
        "edge benchmark: {} gateways x {} nodes, {} round(s), node g0-n1 (a member)",
        cfg.gateways, cfg.nodes, cfg.rounds
    );
    // The underlay: a veth link holding the node's address.
    let ip = node_ip(0, 1).to_string();
    sh(&["ip", "link", "set", "lo", "up"]);
    sh(&[
        "ip",
        "link",
        "add",
        "rbench-eth",
        "type",
        "veth",
        "peer",
        "name",
        "rbench-peer",
    ]);
    sh(&["ip", "link", "set", "rbench-peer", "up"]);
    sh(&[
        "ip",
        "addr",
        "add",
        &format!("{ip}/16"),
        "dev",
        "rbench-eth",
    ]);
    sh(&["ip", "link", "set", "rbench-eth", "up"]);

    let gateways: Vec<GatewayView> = (0..cfg.gateways).map(|i| gateway(i, cfg.nodes)).collect();
    let full = inputs(gateways.clone());
    let want = dataplane::desired(&full);
    let nat = skipnat::spec(&full);
    report.routes = want.state.routes.len();
    report.skip_nat_destinations = nat.v4.destinations.len() + nat.v6.destinations.len();
    report.add("routes a full install writes", report.routes.to_string());
    report.add(
        "skip-NAT rules (sources + destinations)",
        format!(
            "{} + {}",
            nat.v4.sources.len() + nat.v6.sources.len(),
            report.skip_nat_destinations
        ),
    );

    // raven0, its addresses and rules, no routes: what both installs start from.
    let kernel = Kernel::new(true);
    let mut bare = full.clone();
    bare.gateways.truncate(1);
    kernel.reconcile(&bare).await.unwrap();

    // Full install: ip -batch vs raven's writer, alternating, into empty tables.
    let routes: Vec<&model::Route> = want.state.routes.iter().collect();
    let batch = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(batch.path(), batch_lines(&routes)).unwrap();
    let batch_path = batch.path().to_string_lossy().into_owned();
    let h = netlink::connect().unwrap();
    let (mut ip_batch, mut apply, mut whole, mut serial) = (vec![], vec![], vec![], vec![]);
    for _ in 0..cfg.rounds {
        flush_routes();
        let t = Instant::now();
        one_at_a_time(&h, &routes).await;
        serial.push(t.elapsed());
        check_exact(&want.state, "one request at a time").await;

        flush_routes();
        let t = Instant::now();
        sh(&["ip", "-batch", &batch_path]);
        ip_batch.push(t.elapsed());
        check_exact(&want.state, "ip -batch").await;

        flush_routes();
        let have = netlink::observe(&h, devs()).await.unwrap();
        let ops = dataplane::diff(&want.state, &have);
        let adds = ops.iter().filter(|o| matches!(o, Op::AddRoute(_))).count();
        assert_eq!(adds, report.routes, "an empty table plans every route");
        let t = Instant::now();
        netlink::apply(&h, &ops, devs()).await.unwrap();
        apply.push(t.elapsed());
        check_exact(&want.state, "raven's netlink writer").await;

        flush_routes();
        let t = Instant::now();
        let r = kernel.reconcile(&full).await.unwrap();
        whole.push(t.elapsed());
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        check_exact(&want.state, "raven's reconcile").await;
    }
    let (ip_batch, apply, whole) = (median(ip_batch), median(apply), median(whole));
    report.add(
        format!("full install: ip -batch, {} routes", report.routes),
        ms(ip_batch),
    );
    let serial = median(serial);
    report.add(
        "full install: one request at a time, each awaiting its ACK",
        format!(
            "{} (ratio {:.2})",
            ms(serial),
            serial.as_secs_f64() / ip_batch.as_secs_f64()
        ),
    );
    report.add("full install: raven netlink writer (apply)", ms(apply));
    report.add(
        "full install: ratio raven / ip -batch (goal <= 0.5)",
        format!("{:.2}", apply.as_secs_f64() / ip_batch.as_secs_f64()),
    );
    report.add(
        "full install: whole reconcile incl. observe, plan, skip-NAT",
        ms(whole),
    );

    // No-op resync.
    let mut noop = vec![];
    for _ in 0..cfg.rounds {
        let t = Instant::now();
        let r = kernel.reconcile(&full).await.unwrap();
        noop.push(t.elapsed());
        report.noop_ops = r.ops_applied;
    }
    report.add("no-op resync: reconcile time", ms(median(noop)));
    let t = Instant::now();
    let d = dataplane::desired(&full);
    let t_desired = t.elapsed();
    let t = Instant::now();
    let have = netlink::observe(&h, devs()).await.unwrap();
    let t_observe = t.elapsed();
    let t = Instant::now();
    let ops = dataplane::diff(&d.state, &have);
    let t_plan = t.elapsed();
    assert!(ops.is_empty());
    let t = Instant::now();
    let spec = skipnat::spec(&full);
    let t_spec = t.elapsed();
    let t = Instant::now();
    for f in skipnat::Family::ALL {
        skipnat::observe(f).await.unwrap();
    }
    let t_nat = t.elapsed();
    drop(spec);
    report.add(
        "no-op resync phases: desired / observe / plan (routes)",
        format!("{} / {} / {}", ms(t_desired), ms(t_observe), ms(t_plan)),
    );
    report.add(
        "no-op resync phases: skip-NAT spec / nat listings",
        format!("{} / {}", ms(t_spec), ms(t_nat)),
    );
    report.add("no-op resync: kernel changes", report.noop_ops.to_string());

    // One-node change.
    let mut changed = gateways.clone();
    let mut times = vec![];
    for round in 0..cfg.rounds {
        change_one_node(&mut changed, u32::try_from(round).unwrap());
        let next = inputs(changed.clone());
        let h = netlink::connect().unwrap();
        let have = netlink::observe(&h, devs()).await.unwrap();
        let ops = dataplane::diff(&dataplane::desired(&next).state, &have);
        report.change_routes_touched = ops
            .iter()
            .filter(|o| {
                matches!(
                    o,
                    Op::AddRoute(_) | Op::DeleteRoute(_) | Op::ReplaceRoute(_)
                )
            })
            .count();
        let t = Instant::now();
        let r = kernel.reconcile(&next).await.unwrap();
        times.push(t.elapsed());
        report.change_skip_nat_touched = r.ops_applied - report.change_routes_touched;
        check_exact(&dataplane::desired(&next).state, "after a one-node change").await;
    }
    report.add(
        "one-node change: resync pass (reads the kernel)",
        ms(median(times)),
    );
    report.add(
        "one-node change: routes touched",
        report.change_routes_touched.to_string(),
    );
    report.add(
        "one-node change: skip-NAT rule changes",
        report.change_skip_nat_touched.to_string(),
    );

    // One-node change → kernel, as the agent does it: the update committed
    // to the cache (fsync included), the view built, and a change pass that
    // plans against what the last pass applied.
    let node = me().name;
    let change_dir = tempfile::tempdir().unwrap();
    let (cache, empty) = Cache::open(change_dir.path(), &node, 256 << 20).unwrap();
    let mut held = cached_state(&changed, 1);
    cache.commit(&accepted(&empty, held.clone())).unwrap();
    let assembled = |state: &CachedState| {
        dataplane::assemble(state.view(&node).as_ref(), &local(), BTreeMap::new())
    };
    let r = kernel.reconcile(&assembled(&held)).await.unwrap();
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    let (mut commits, mut views, mut passes, mut totals) = (vec![], vec![], vec![], vec![]);
    for round in 0..cfg.rounds {
        change_one_node(&mut changed, 100 + u32::try_from(round).unwrap());
        let update = accepted(&held, cached_state(&changed, 2 + round as u64));
        let t = Instant::now();
        cache.commit(&update).unwrap();
        let committed = t.elapsed();
        let next = assembled(&update.next);
        let viewed = t.elapsed();
        let r = kernel.reconcile_change(&next).await.unwrap();
        let total = t.elapsed();
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        report.change_pass = r.io;
        // The skip-NAT rules that differ, either way (and a bucket that
        // appears or empties, with its jump).
        let layout = |s: &CachedState| skipnat::spec(&assembled(s)).v4.layout();
        report.change_pass_nat_differ =
            skipnat::changes_between(&layout(&held), &layout(&update.next));
        commits.push(committed);
        views.push(viewed - committed);
        passes.push(total - viewed);
        totals.push(total);
        check_exact(&dataplane::desired(&next).state, "after a change pass").await;
        held = update.next;
    }
    drop(cache);
    report.add(
        "one-node change -> kernel (commit + view + change pass)",
        ms(median(totals)),
    );
    report.add(
        "one-node change phases: cache commit / view / change pass",
        format!(
            "{} / {} / {}",
            ms(median(commits)),
            ms(median(views)),
            ms(median(passes))
        ),
    );
    report.add(
        "one-node change pass: netlink ops / nat listings / nat rules",
        format!(
            "{} / {} / {}{}",
            report.change_pass.netlink_ops,
            report.change_pass.nat_listings,
            report.change_pass.nat_changes,
            if report.change_pass.observed {
                " (read the kernel!)"
            } else {
                ""
            }
        ),
    );

    // The same change on a compact member (its own gateway, the other
    // domains as prefix sets): the change pass against the kernel, and its
    // planning patched vs planned in full (Index::build + diff + skip-NAT
    // diff, what the change pass did for a compact view before), same run.
    let mut moving = changed.clone();
    let r = kernel
        .reconcile(&compact_inputs(moving.clone()))
        .await
        .unwrap();
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    let (mut passes, mut patched, mut rebuilt) = (vec![], vec![], vec![]);
    let mut io = dataplane::Io::default();
    for round in 0..cfg.rounds {
        let was = compact_inputs(moving.clone());
        change_one_node(&mut moving, 300 + u32::try_from(round).unwrap());
        let next = compact_inputs(moving.clone());
        let t = Instant::now();
        let r = kernel.reconcile_change(&next).await.unwrap();
        passes.push(t.elapsed());
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        io = r.io;
        check_exact(
            &dataplane::desired(&next).state,
            "after a compact change pass",
        )
        .await;
        let mut index = dataplane::incremental::Index::build(&was);
        let old = index.clone();
        let t = Instant::now();
        let delta = index.update(&next);
        patched.push(t.elapsed());
        let t = Instant::now();
        let whole = dataplane::incremental::Index::build(&next);
        let ops = dataplane::diff(&whole.desired().state, &old.desired().state);
        let script = skipnat::diff(
            &whole.skip_nat().v4,
            &skipnat::Observed::after(&old.skip_nat().v4),
        );
        rebuilt.push(t.elapsed());
        if let Some(delta) = delta {
            assert_eq!(delta.ops, ops, "the patch plans what the whole diff plans");
            assert_eq!(
                delta.nat[0].as_ref().map(|r| r.changes),
                script.map(|r| r.changes)
            );
        }
    }
    report.add(
        "compact member one-node change pass",
        format!(
            "{}{}",
            ms(median(passes)),
            if io.rebuilt { " (planned in full)" } else { "" }
        ),
    );
    report.add(
        "compact member change pass: netlink ops / nat listings / nat rules",
        format!(
            "{} / {} / {}",
            io.netlink_ops, io.nat_listings, io.nat_changes
        ),
    );
    let (patched, rebuilt) = (median(patched), median(rebuilt));
    report.add(
        "compact member change planning: index patch / planned in full",
        format!(
            "{} / {} (ratio {:.3})",
            ms(patched),
            ms(rebuilt),
            patched.as_secs_f64() / rebuilt.as_secs_f64().max(1e-9)
        ),
    );
    // Back to the full view for what follows.
    kernel.reconcile(&inputs(changed.clone())).await.unwrap();

    // Planning a one-node change: the index patched with the changed
    // gateway vs what the change pass did before (desired() of the whole
    // view, the planner's diff of two whole states, the skip-NAT spec and
    // its diff), same inputs; both must plan the same operations.
    let (mut patched, mut rebuilt) = (vec![], vec![]);
    let mut moving = gateways.clone();
    for round in 0..cfg.rounds {
        let was = inputs(moving.clone());
        change_one_node(&mut moving, 200 + u32::try_from(round).unwrap());
        let next = inputs(moving.clone());
        let mut index = dataplane::incremental::Index::build(&was);
        let (old_state, old_nat) = (dataplane::desired(&was).state, skipnat::spec(&was));
        let t = Instant::now();
        let delta = index.update(&next).expect("a one-node change is patched");
        patched.push(t.elapsed());
        let t = Instant::now();
        let ops = dataplane::diff(&dataplane::desired(&next).state, &old_state);
        let nat = skipnat::spec(&next);
        let script = skipnat::diff(&nat.v4, &skipnat::Observed::after(&old_nat.v4));
        rebuilt.push(t.elapsed());
        assert_eq!(delta.ops, ops, "the patch plans what the whole diff plans");
        assert_eq!(
            delta.nat[0].as_ref().map(|r| r.changes),
            script.map(|r| r.changes)
        );
    }
    let (patched, rebuilt) = (median(patched), median(rebuilt));
    report.add(
        "one-node change planning: index patch / whole desired+diff",
        format!(
            "{} / {} (ratio {:.3})",
            ms(patched),
            ms(rebuilt),
            patched.as_secs_f64() / rebuilt.as_secs_f64().max(1e-9)
        ),
    );

    // Why the destinations live in buckets: one rule deleted and appended
    // by `iptables-restore --noflush` in raven's bucket vs in one chain
    // holding all the destinations (as before), same table, same run.
    let lines = nat.v4.destination_lines();
    if let Some(first) = lines.first() {
        let flat_chain = "RBENCH-FLAT";
        let bucket_chain = first
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        let rule = first
            .split_once(&bucket_chain)
            .map_or("", |(_, r)| r)
            .to_owned();
        let mut flat = format!("*nat\n:{flat_chain} - [0:0]\n");
        for l in &lines {
            let r = l.split_whitespace().skip(2).collect::<Vec<_>>().join(" ");
            flat.push_str(&format!("-A {flat_chain} {r}\n"));
        }
        flat.push_str("COMMIT\n");
        restore(&flat);
        let (mut in_flat, mut in_bucket) = (vec![], vec![]);
        for _ in 0..cfg.rounds.max(3) {
            for (chain, out) in [
                (flat_chain, &mut in_flat),
                (bucket_chain.as_str(), &mut in_bucket),
            ] {
                let script = format!("*nat\n-D {chain}{rule}\n-A {chain}{rule}\nCOMMIT\n");
                let t = Instant::now();
                restore(&script);
                out.push(t.elapsed());
            }
        }
        restore(&format!("*nat\n-F {flat_chain}\n-X {flat_chain}\nCOMMIT\n"));
        let (f, b) = (median(in_flat), median(in_bucket));
        report.add(
            "skip-NAT: one rule -D/-A, bucket / one chain of all",
            format!(
                "{} / {} ({} rules; ratio {:.2})",
                ms(b),
                ms(f),
                lines.len(),
                b.as_secs_f64() / f.as_secs_f64().max(1e-9)
            ),
        );
    }

    // Cold start from cache, hub down.
    let data = tempfile::tempdir().unwrap();
    let held = cached_state(&gateways, 1);
    {
        let (cache, empty) = Cache::open(data.path(), &node, 256 << 20).unwrap();
        cache.commit(&accepted(&empty, held.clone())).unwrap();
    }
    kernel.reconcile(&full).await.unwrap();
    let cold = |data: &Path| {
        let data = data.to_owned();
        let node = node.clone();
        let kernel = kernel.clone();
        async move {
            let t = Instant::now();
            let (_cache, state) = Cache::open(&data, &node, 256 << 20).unwrap();
            let opened = t.elapsed();
            let inputs = dataplane::assemble(state.view(&node).as_ref(), &local(), BTreeMap::new());
            let r = kernel.reconcile(&inputs).await.unwrap();
            (t.elapsed(), opened, r.ops_applied)
        }
    };
    let (mut warm, mut reboot, mut open) = (vec![], vec![], vec![]);
    for _ in 0..cfg.rounds {
        let (t, o, ops) = cold(data.path()).await;
        warm.push(t);
        open.push(o);
        report.warm_restart_ops = ops;
        flush_routes();
        let (t, _, _) = cold(data.path()).await;
        reboot.push(t);
        check_exact(&want.state, "cold start").await;
    }
    report.add(
        "cold start (hub down): open + decode the sled cache",
        ms(median(open)),
    );
    // Where a cold start's time goes, phase by phase (kernel programmed).
    let t = Instant::now();
    let opened = raven_store::Store::open(
        &data.path().join("cache"),
        raven_store::StoreOptions {
            purpose: raven_edge::cache::purpose(&node),
            max_bytes: 256 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let t_open = t.elapsed();
    let state = raven_edge::cache::decode_snapshot(&opened.snapshot).unwrap();
    let t_decode = t.elapsed();
    drop(opened);
    let inputs = dataplane::assemble(state.view(&node).as_ref(), &local(), BTreeMap::new());
    let t_view = t.elapsed();
    let r = kernel.reconcile(&inputs).await.unwrap();
    let t_pass = t.elapsed();
    assert_eq!(r.ops_applied, 0);
    report.add(
        "cold start phases: store open+read / decode / view / resync pass",
        format!(
            "{} / {} / {} / {}",
            ms(t_open),
            ms(t_decode - t_open),
            ms(t_view - t_decode),
            ms(t_pass - t_view)
        ),
    );
    report.add(
        "cold start (hub down), kernel programmed (agent restart)",
        ms(median(warm)),
    );
    report.add(
        "cold start (hub down), empty tables (node reboot)",
        ms(median(reboot)),
    );

    // Store size across one-node changes.
    let store_dir = tempfile::tempdir().unwrap();
    let (cache, empty) = Cache::open(store_dir.path(), &node, 256 << 20).unwrap();
    let mut held_state = cached_state(&gateways, 1);
    cache.commit(&accepted(&empty, held_state.clone())).unwrap();
    let first = dir_size(store_dir.path());
    let (mut largest, mut sizes) = (first, vec![]);
    let mut gws = gateways.clone();
    let t = Instant::now();
    for c in 0..cfg.changes {
        change_one_node(&mut gws, c + 1000);
        let next = cached_state(&gws, u64::from(c) + 2);
        cache.commit(&accepted(&held_state, next.clone())).unwrap();
        held_state = next;
        let size = dir_size(store_dir.path());
        largest = largest.max(size);
        if (c + 1) % (cfg.changes / 5).max(1) == 0 {
            sizes.push(format!("{}:{:.1}", c + 1, size as f64 / 1e6));
        }
    }
    let per_commit = t.elapsed() / cfg.changes.max(1);
    let last = dir_size(store_dir.path());
    report.store_bytes = (first, largest, last);
    report.add(
        "store: after the first commit",
        format!("{:.1} MB", first as f64 / 1e6),
    );
    report.add(
        format!("store: after each {} changes (change:MB)", cfg.changes / 5),
        sizes.join(" "),
    );
    report.add(
        format!("store: largest / last across {} changes", cfg.changes),
        format!(
            "{:.1} MB / {:.1} MB",
            largest as f64 / 1e6,
            last as f64 / 1e6
        ),
    );
    report.add(
        "store: time per one-node commit (incl. fsync)",
        ms(per_commit),
    );
    drop(cache);

    wireguard(cfg, &mut report).await;
    kernel.teardown(model::DEFAULT_TUNNEL_DEV).await.unwrap();
    report
}

#[allow(dead_code)]
fn main() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the edge benchmark needs root (it creates a network namespace)"
    );
    let cfg = Config::parse(std::env::args().skip(1));
    let _ = run(&cfg);
}
