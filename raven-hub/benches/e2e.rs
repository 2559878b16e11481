//! End to end: a one-node change at the hub → the route in an agent's
//! kernel. A real `raven-hub` (manifest directory of G gateways × N nodes,
//! the fan-out benchmark's cluster generator) and one real agent
//! (`raven-edge run`, a member of gateway 0, programming its own kernel)
//! run in a network namespace of this run (`re2e<pid>`, deleted by name at
//! the end; both processes stopped by PID). Then, `--changes` times, one
//! node's manifest file is rewritten (its pod CIDR moves) and the time is
//! taken until the new route is in the agent's kernel (`ip monitor route`),
//! split into:
//!
//! - hub: file renamed → the hub publishes the new revision (`/readyz`,
//!   polled every 2 ms): the manifest watch, parse, compile, publish;
//! - hub → agent: → the agent persisted the update (its `update persisted`
//!   log line): fan-out, TLS, decode, the cache commit with its fsync;
//! - agent apply: → the kernel announces the route: view, change pass.
//!
//! The baseline is the same path for a cluster of 2 gateways × N nodes in
//! the same run: a change that costs what changed takes as long at
//! 10,000 nodes as at 20. Prints figures, never asserts a time. Needs root,
//! `ip` and `iptables`, and a `raven-edge` binary (next to `raven-hub`, or
//! `RAVEN_EDGE_BIN`; `RAVEN_HUB_BIN` runs another hub): skipped otherwise,
//! unless `RAVEN_REQUIRE_TOOLS=1`.
//!
//! ```text
//! cargo build --release -p raven-edge
//! cargo bench -p raven-hub --bench e2e                       # 1,000 × 10, 5 changes
//! cargo bench -p raven-hub --bench e2e -- --gateways 100 --nodes 10 --changes 3
//! ```

#[path = "fanout/cluster.rs"]
#[allow(dead_code)]
mod cluster;
#[path = "common/flags.rs"]
mod flags;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cluster::Shape;

/// The agent: the last node of gateway 0 (a member, not a tunnel
/// candidate). The change: node 2 of the middle gateway.
const CHANGED_NODE: usize = 2;
const HUB_HTTP: &str = "127.0.0.1:10272";

fn require_tools() -> bool {
    std::env::var("RAVEN_REQUIRE_TOOLS").is_ok_and(|v| v == "1")
}

fn skip(why: &str) {
    assert!(!require_tools(), "RAVEN_REQUIRE_TOOLS=1 but {why}");
    println!("e2e benchmark skipped: {why}");
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// `raven-edge`: `RAVEN_EDGE_BIN`, or next to the hub binary.
fn edge_binary(hub: &Path) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("RAVEN_EDGE_BIN") {
        return Some(PathBuf::from(p));
    }
    let p = hub.parent()?.join("raven-edge");
    p.exists().then_some(p)
}

fn sh(args: &[&str]) {
    let st = Command::new(args[0])
        .args(&args[1..])
        .status()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(st.success(), "{args:?}: {st}");
}

/// A network namespace of this run, deleted by name on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A process of this run, stopped by its PID (SIGTERM) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            // The PID of a child this run started and has not reaped.
            let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        let _ = self.0.wait();
    }
}

/// Moves the calling thread into namespace `ns`.
fn enter(ns: &str) {
    let f = std::fs::File::open(format!("/run/netns/{ns}"))
        .unwrap_or_else(|e| panic!("namespace {ns}: {e}"));
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("setns {ns}: {e}"));
}

/// What the run watches, each stamped when it was seen.
enum Event {
    /// The hub's published revision changed.
    Hub(Instant, u64),
    /// A line of the agent's log.
    Agent(Instant, String),
    /// A line of `ip monitor route`.
    Route(Instant, String),
}

/// The hub's published revision (`/readyz`: "ready: epoch E revision R").
fn hub_revision() -> Option<u64> {
    let mut s = std::net::TcpStream::connect(HUB_HTTP).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let body = buf.split("\r\n\r\n").nth(1)?;
    body.split_whitespace()
        .skip_while(|w| *w != "revision")
        .nth(1)?
        .parse()
        .ok()
}

/// Forwards each line of `r` as an event.
fn lines(
    r: impl Read + Send + 'static,
    tx: mpsc::Sender<Event>,
    log: Option<PathBuf>,
    route: bool,
) {
    std::thread::spawn(move || {
        let mut log = log.and_then(|p| std::fs::File::create(p).ok());
        for l in BufReader::new(r).lines().map_while(Result::ok) {
            let at = Instant::now();
            if let Some(f) = &mut log {
                let _ = writeln!(f, "{l}");
            }
            let e = if route {
                Event::Route(at, l)
            } else {
                Event::Agent(at, l)
            };
            if tx.send(e).is_err() {
                return;
            }
        }
    });
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// One change's phases: hub, hub → agent, agent apply, total.
#[derive(Debug, Default, Clone)]
struct Phases {
    hub: Vec<Duration>,
    wire: Vec<Duration>,
    apply: Vec<Duration>,
    total: Vec<Duration>,
    /// First start: hub ready, agent's kernel programmed.
    setup: Duration,
}

fn run(shape: Shape, changes: usize, hub_bin: &Path, edge_bin: &Path) -> Phases {
    let ns = Netns(format!("re2e{}", std::process::id()));
    sh(&["ip", "netns", "add", &ns.0]);
    let ip = |args: &[&str]| sh(&[&["ip", "-n", ns.0.as_str()], args].concat());
    ip(&["link", "set", "lo", "up"]);
    ip(&[
        "link",
        "add",
        "re2e-eth",
        "type",
        "veth",
        "peer",
        "name",
        "re2e-peer",
    ]);
    ip(&["link", "set", "re2e-peer", "up"]);
    let me = shape.nodes - 1;
    let addr = format!("{}/16", cluster::internal_ip(shape, 0, me));
    ip(&["addr", "add", &addr, "dev", "re2e-eth"]);
    ip(&["link", "set", "re2e-eth", "up"]);

    let work = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let w = work.path();
    let manifests = w.join("manifests");
    cluster::write(&manifests, shape).unwrap_or_else(|e| panic!("manifests: {e}"));
    let node = raven_core::NodeName::new(cluster::node_name(0, me))
        .unwrap_or_else(|e| panic!("node name: {e}"));
    raven_hub::certs::generate(
        &w.join("certs"),
        &["localhost".into(), "127.0.0.1".into()],
        std::slice::from_ref(&node),
    )
    .unwrap_or_else(|e| panic!("certificates: {e}"));

    let (tx, rx) = mpsc::channel();
    let t_start = Instant::now();
    let hub_log = std::fs::File::create(w.join("hub.log")).unwrap_or_else(|e| panic!("{e}"));
    let hub = Proc(
        Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .arg(hub_bin)
            .arg("serve")
            .arg("--manifests")
            .arg(&manifests)
            .arg("--certs")
            .arg(w.join("certs"))
            .arg("--data-dir")
            .arg(w.join("hub-data"))
            .args(["--grpc-addr", "127.0.0.1:10270"])
            .args(["--plaintext-addr", "127.0.0.1:10271"])
            .args(["--http-addr", HUB_HTTP])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(hub_log)
            .spawn()
            .unwrap_or_else(|e| panic!("raven-hub: {e}")),
    );
    // The hub's revision, polled from inside the namespace.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (tx, ns, stop) = (tx.clone(), ns.0.clone(), stop.clone());
        std::thread::spawn(move || {
            enter(&ns);
            let mut last = None;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = hub_revision();
                if r.is_some() && r != last {
                    last = r;
                    if tx.send(Event::Hub(Instant::now(), r.unwrap_or(0))).is_err() {
                        return;
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
    }
    let mut agent = Proc(
        Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .arg(edge_bin)
            .arg("run")
            .arg("--node")
            .arg(node.as_str())
            .arg("--data-dir")
            .arg(w.join("edge-data"))
            .args(["--hub", "https://127.0.0.1:10270"])
            .arg("--certs")
            .arg(w.join(format!("certs/nodes/{node}")))
            .args(["--http-addr", "127.0.0.1:10273"])
            .args(["--tunnel-dev", "re2e-wg"])
            .arg("--no-proxy")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("raven-edge: {e}")),
    );
    let stderr = agent.0.stderr.take().unwrap_or_else(|| unreachable!());
    lines(stderr, tx.clone(), Some(w.join("edge.log")), false);
    let mut monitor = Proc(
        Command::new("ip")
            .args(["-n", &ns.0, "monitor", "route"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("ip monitor: {e}")),
    );
    let out = monitor.0.stdout.take().unwrap_or_else(|| unreachable!());
    lines(out, tx.clone(), None, true);
    drop(tx);

    let g = shape.gateways / 2;
    let cidr = |alt: bool| cluster::pod_cidr(shape, g, CHANGED_NODE, alt);
    // Synced: the route of the node that will change is in the kernel.
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut revision = 0;
    let first = cidr(false);
    let mut synced = false;
    while !synced {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Event::Hub(_, r)) => revision = r,
            Ok(Event::Route(_, l)) => synced = l.starts_with(&format!("{first} ")),
            Ok(Event::Agent(..)) => {}
            Err(_) => panic!(
                "the agent's kernel never got {first} (logs in {})",
                w.display()
            ),
        }
    }
    let mut p = Phases {
        setup: t_start.elapsed(),
        ..Phases::default()
    };
    for round in 0..changes {
        // Quiet first: the hub compiles a change after quiet at once.
        std::thread::sleep(Duration::from_millis(600));
        while let Ok(e) = rx.try_recv() {
            if let Event::Hub(_, r) = e {
                revision = r;
            }
        }
        let alt = round % 2 == 0;
        let want = format!("{} ", cidr(alt));
        let t0 = Instant::now();
        cluster::rewrite(&manifests, shape, g, alt.then_some(CHANGED_NODE))
            .unwrap_or_else(|e| panic!("rewrite: {e}"));
        let (mut hub, mut wire, mut kernel) = (None, None, None);
        while kernel.is_none() {
            let left = (t0 + Duration::from_secs(120)).saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Event::Hub(at, r)) if r > revision => {
                    revision = r;
                    hub.get_or_insert(at);
                }
                Ok(Event::Agent(at, l)) if l.contains("update persisted") => {
                    wire.get_or_insert(at);
                }
                Ok(Event::Route(at, l)) if l.starts_with(&want) => kernel = Some(at),
                Ok(_) => {}
                Err(_) => panic!("change {round}: {want} never reached the kernel"),
            }
        }
        let kernel = kernel.unwrap_or(t0);
        // A phase not seen (the poll missed it) counts as instantaneous.
        let hub = hub.unwrap_or(t0).min(kernel);
        let wire = wire.unwrap_or(hub).clamp(hub, kernel);
        p.hub.push(hub - t0);
        p.wire.push(wire - hub);
        p.apply.push(kernel - wire);
        p.total.push(kernel - t0);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(monitor);
    drop(agent);
    drop(hub);
    drop(ns);
    p
}

fn main() {
    let mut shape = Shape {
        gateways: 1000,
        nodes: 10,
    };
    let mut changes = 5;
    flags::parse(|flag, num| match flag {
        "--gateways" => shape.gateways = num().max(2),
        "--nodes" => shape.nodes = num().max(3),
        "--changes" => changes = num().max(1),
        _ => {}
    });
    if !nix::unistd::geteuid().is_root() {
        return skip("not root");
    }
    for tool in ["ip", "iptables"] {
        if !have(tool) {
            return skip(&format!("{tool} is not installed"));
        }
    }
    let hub_bin = std::env::var_os("RAVEN_HUB_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_raven-hub")),
        PathBuf::from,
    );
    let Some(edge_bin) = edge_binary(&hub_bin) else {
        return skip(&format!(
            "no raven-edge next to {} (cargo build -p raven-edge, or set RAVEN_EDGE_BIN)",
            hub_bin.display()
        ));
    };
    println!(
        "raven end to end: one-node change at the hub -> the route in one agent's kernel; {} changes; hub {}, agent {}",
        changes,
        hub_bin.display(),
        edge_bin.display()
    );
    let base_shape = Shape {
        gateways: 2,
        nodes: shape.nodes,
    };
    let base = run(base_shape, changes, &hub_bin, &edge_bin);
    let big = run(shape, changes, &hub_bin, &edge_bin);
    let label = |s: Shape| {
        format!(
            "{} × {} ({} nodes)",
            s.gateways,
            s.nodes,
            s.gateways * s.nodes
        )
    };
    println!(
        "| median of {changes} | {} | {} (baseline) | ratio |",
        label(shape),
        label(base_shape)
    );
    println!("|---|---|---|---|");
    let row = |name: &str, a: &[Duration], b: &[Duration]| {
        let (a, b) = (median(a.to_vec()), median(b.to_vec()));
        println!(
            "| {name} | {} | {} | {:.2}× |",
            ms(a),
            ms(b),
            a.as_secs_f64() / b.as_secs_f64().max(1e-6)
        );
    };
    row(
        "hub: file renamed → revision published",
        &big.hub,
        &base.hub,
    );
    row(
        "hub → agent: → update persisted (incl. fsync)",
        &big.wire,
        &base.wire,
    );
    row(
        "agent apply: → route in the kernel",
        &big.apply,
        &base.apply,
    );
    row(
        "**one-node change → the agent's kernel**",
        &big.total,
        &base.total,
    );
    println!(
        "| start: hub up, agent synced, kernel programmed | {} | {} | |",
        ms(big.setup),
        ms(base.setup)
    );
    println!(
        "all totals: {:?} (baseline {:?})",
        big.total.iter().map(|d| d.as_millis()).collect::<Vec<_>>(),
        base.total.iter().map(|d| d.as_millis()).collect::<Vec<_>>()
    );
}
