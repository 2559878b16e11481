//! The hub's fan-out benchmark: a generated cluster (G gateways × N Ready
//! nodes), the `raven-hub` binary as its own process, and M simulated agents
//! in this process — each its own TLS connection and node certificate —
//! against it; then etcd's watch fan-out in the same run as the baseline.
//!
//! ```text
//! cargo bench -p raven-hub --bench fanout -- [--gateways G] [--nodes N] [--agents M]
//!     [--changes C] [--applied-with-resources] [--full-view] [--members-only] [--no-etcd]
//!     [--hello-with-list]
//!     [--hold-after-sync SECS]
//! ```
//!
//! Prints figures (all connect → all synced, one-node change → ACK p50/p99,
//! of it change → published at the hub (the hub's own timestamp) and
//! published → ACK (the fan-out), hub CPU per change, hub RSS per agent,
//! restart → in sync, bytes) and their ratios to the etcd baseline, and the CPU-seconds of the hub and of this
//! process (the load generator) through the connect storm and the restart —
//! on one machine they share the cores, so the split says which of the two
//! a connect figure measures. Never asserts a time: it fails only when the
//! hub does not deliver at all or sends an agent something it refuses.
//!
//! What a simulated agent does (`agent.rs`): its own TCP + TLS connection
//! and certificate; Hello with the digest of its inventory (its list when
//! the hub asks, or always with `--hello-with-list`); for every Update it checks
//! what raven-edge's store checks of the envelope — revision never back
//! within an epoch, the parts of a snapshot share one (epoch, revision),
//! resources sorted and unique, none both sent and removed, each with a
//! body of the kind its name says and a 16-hex-digit version — keeps the
//! names and versions (its cache, the next Hello's inventory), ACKs, sends
//! Applied, a Report (candidates), heartbeats, and redials with raven-edge's
//! backoff. What it does not do: decode the bodies into raven's model and
//! recompute their versions (each body stays the bytes of its message,
//! `lite.rs`), persist, or program a kernel — a real node does that on its
//! own CPU, not the hub's. The wire is exactly what raven-edge receives;
//! agent 0 checks the mirror decoding against the full `raven.v1` decoding
//! on the first message of each of its streams.

mod agent;
mod cluster;
mod etcd;
#[path = "../common/flags.rs"]
mod flags;
mod lite;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::Shape;
use raven_core::NodeName;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

struct Opts {
    shape: Shape,
    agents: usize,
    changes: usize,
    applied_with_resources: bool,
    full_view: bool,
    /// Agents list their inventory in every Hello, as before the inventory
    /// digest (and as agents without `CAPABILITY_INVENTORY_DIGEST` do).
    hello_with_list: bool,
    members_only: bool,
    etcd: bool,
    /// Seconds to keep every agent connected after the first sync, before
    /// the changes (to profile the hub's memory then).
    hold_after_sync: u64,
}

fn opts() -> Opts {
    let mut o = Opts {
        shape: Shape {
            gateways: 20,
            nodes: 10,
        },
        agents: 0,
        changes: 5,
        applied_with_resources: false,
        full_view: false,
        hello_with_list: false,
        members_only: false,
        etcd: true,
        hold_after_sync: 0,
    };
    flags::parse(|flag, num| match flag {
        "--gateways" => o.shape.gateways = num(),
        "--nodes" => o.shape.nodes = num(),
        "--agents" => o.agents = num(),
        "--changes" => o.changes = num().max(1),
        "--applied-with-resources" => o.applied_with_resources = true,
        "--full-view" => o.full_view = true,
        "--hello-with-list" => o.hello_with_list = true,
        "--members-only" => o.members_only = true,
        "--no-etcd" => o.etcd = false,
        "--hold-after-sync" => o.hold_after_sync = num() as u64,
        _ => {}
    });
    if o.agents == 0 {
        o.agents = o.shape.gateways * o.shape.nodes;
    }
    o.agents = o.agents.min(o.shape.gateways * o.shape.nodes);
    o
}

/// Field `n` (1-based, as proc(5) numbers them) of a process's
/// `/proc/<pid>/stat`, when it is a number; 0 when it cannot be read.
fn proc_stat(pid: u32, n: usize) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The command (field 2) is in parentheses and may hold spaces:
            // what follows the last `)` starts at field 3.
            let rest = stat.rsplit_once(')')?.1.to_owned();
            rest.split_whitespace().nth(n.checked_sub(3)?)?.parse().ok()
        })
        .unwrap_or(0)
}

/// Minor page faults of a process so far (stat field 10): each is a page
/// the kernel found or zeroed for it, which on a VM is often far from free.
fn proc_faults(pid: u32) -> u64 {
    proc_stat(pid, 10)
}

/// The machine's CPU time so far as (all, stolen by the hypervisor), in
/// ticks (the `cpu` line of /proc/stat).
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    (f.iter().sum(), f.get(7).copied().unwrap_or(0))
}

/// The share of the machine's CPU time stolen since `t0`, in %.
fn steal_since(t0: (u64, u64)) -> f64 {
    let t = machine_ticks();
    let all = t.0.saturating_sub(t0.0).max(1);
    100.0 * t.1.saturating_sub(t0.1) as f64 / all as f64
}

/// utime + stime of a process.
pub fn proc_cpu(pid: u32) -> Duration {
    // utime and stime (stat fields 14 and 15), in ticks; USER_HZ is 100 on
    // Linux.
    Duration::from_millis((proc_stat(pid, 14) + proc_stat(pid, 15)) * 10)
}

/// Resident set size in bytes.
fn proc_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// The load generator keeps the memory it frees, in one heap: its agents
/// decode Updates of up to ~1 MB (a candidate's first sync) and each
/// stream's decode buffer keeps the size of its largest (≈ 340 KB per agent
/// in all at 1,000 gateways). glibc would give every buffer over 128 KB a
/// mapping of its own and unmap it when freed, and trim freed memory; on a
/// VM the first touch of a page is far from free (the kernel's `clear_page`
/// was 20–33 % of the generator's CPU through a 10,000-agent storm). Each
/// agent of a fleet is its own process and pays that once; here they share
/// one heap that keeps what it touched. Call before any other thread
/// starts (one arena: every thread's allocations come from the heap that
/// [`prefault`] warmed). The hub is another process and keeps its own
/// settings.
#[allow(unsafe_code)]
fn keep_freed_memory() {
    // SAFETY: mallopt only changes malloc parameters (32 MB: glibc's
    // largest mmap threshold on 64-bit; a trim threshold of -1 turns
    // trimming off).
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
    }
}

/// Touches about what the agents will hold (`bytes`, at most a third of
/// the memory available) once and frees it into the heap, so the connect
/// storm measures the hub and not the first touch of the generator's own
/// pages. Returns how much and how long it took.
fn prefault(bytes: usize) -> (usize, Duration) {
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<usize>().ok())
        })
        .map_or(0, |kb| kb * 1024);
    let bytes = bytes.min(available / 3);
    let t = Instant::now();
    const CHUNK: usize = 16 << 20;
    // Nonzero: a zeroed allocation of fresh heap is not written (calloc),
    // so its pages would not be touched.
    let chunks: Vec<Vec<u8>> = (0..bytes / CHUNK).map(|_| vec![1u8; CHUNK]).collect();
    let touched = chunks.len() * CHUNK;
    drop(chunks);
    (touched, t.elapsed())
}

fn raise_nofile() {
    // The hub inherits it; each agent holds one socket here and one there.
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse::<u64>().ok())
        });
    if soft.is_some_and(|s| s < 4096) {
        eprintln!(
            "note: open-files limit {soft:?}; run with `ulimit -n 65536` for thousands of agents"
        );
    }
}

struct Hub {
    child: Child,
    grpc: SocketAddr,
    http: SocketAddr,
}

impl Hub {
    fn start(work: &Path, grpc: SocketAddr) -> Self {
        let http: SocketAddr = ([127, 0, 0, 1], etcd::free_port()).into();
        let plain: SocketAddr = ([127, 0, 0, 1], etcd::free_port()).into();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(work.join("hub.log"))
            .unwrap_or_else(|e| panic!("hub log: {e}"));
        // RAVEN_HUB_BIN runs another build (a before/after comparison).
        let bin = std::env::var_os("RAVEN_HUB_BIN").map_or_else(
            || env!("CARGO_BIN_EXE_raven-hub").into(),
            std::path::PathBuf::from,
        );
        let child = Command::new(bin)
            .arg("serve")
            .arg("--manifests")
            .arg(work.join("manifests"))
            .arg("--certs")
            .arg(work.join("certs"))
            .arg("--data-dir")
            .arg(work.join("hub-data"))
            .arg("--grpc-addr")
            .arg(grpc.to_string())
            .arg("--plaintext-addr")
            .arg(plain.to_string())
            .arg("--http-addr")
            .arg(http.to_string())
            // RAVEN_HUB_LOG: the hub's log filter (hub.log), `warn` unless set.
            .env(
                "RUST_LOG",
                std::env::var("RAVEN_HUB_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting raven-hub: {e}"));
        Self { child, grpc, http }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The hub's `/metrics` page.
    async fn metrics(&self) -> Option<String> {
        let http = self.http;
        tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(http).ok()?;
            s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
                .ok()?;
            let mut buf = String::new();
            s.read_to_string(&mut buf).ok()?;
            Some(buf)
        })
        .await
        .ok()?
    }

    /// The value of the sample `name` (with its labels, as written) on the
    /// hub's `/metrics` page.
    async fn metric(&self, name: &str) -> Option<f64> {
        let body = self.metrics().await?;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))?
            .trim()
            .parse()
            .ok()
    }

    /// When the hub published its current revision (its
    /// `raven_hub_revision_published_timestamp_seconds` metric), if it says.
    async fn published_at(&self) -> Option<std::time::SystemTime> {
        let secs = self
            .metric("raven_hub_revision_published_timestamp_seconds")
            .await?;
        Some(std::time::UNIX_EPOCH + Duration::from_secs_f64(secs))
    }

    /// The hub's plans so far by kind (`raven_hub_plans_total`), and its
    /// revision.
    async fn plans(&self) -> [u64; 5] {
        let mut out = [0; 5];
        for (i, name) in [
            "raven_hub_plans_total{kind=\"resumed\"}",
            "raven_hub_plans_total{kind=\"in_sync\"}",
            "raven_hub_plans_total{kind=\"delta\"}",
            "raven_hub_plans_total{kind=\"full\"}",
            "raven_hub_revision",
        ]
        .into_iter()
        .enumerate()
        {
            out[i] = self.metric(name).await.unwrap_or(0.0) as u64;
        }
        out
    }

    /// Polls `/readyz` until the hub serves.
    async fn ready(&self) -> Duration {
        let t0 = Instant::now();
        loop {
            if t0.elapsed() > Duration::from_secs(300) {
                panic!("the hub did not become ready within 300 s (see hub.log)");
            }
            let http = self.http;
            let ok = tokio::task::spawn_blocking(move || {
                let Ok(mut s) = std::net::TcpStream::connect(http) else {
                    return false;
                };
                let _ = s.write_all(b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n");
                let mut buf = String::new();
                let _ = s.read_to_string(&mut buf);
                buf.starts_with("HTTP/1.1 200") || buf.starts_with("HTTP/1.0 200")
            })
            .await
            .unwrap_or(false);
            if ok {
                return t0.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM (by PID) and wait for it to exit; how long it took (its
    /// graceful shutdown: its listener is closed and dials are refused
    /// meanwhile).
    fn stop(mut self) -> Duration {
        let t = Instant::now();
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        t.elapsed()
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// The per-agent state the benchmark tracks from events.
#[derive(Default, Clone)]
struct Seen {
    /// Latest Update of each agent: (when, revision, stream bytes so far, first of its stream)
    last: Option<(Instant, u64, usize, bool)>,
    synced_at: Option<Instant>,
    first_sync_bytes: usize,
}

struct Collector {
    rx: mpsc::UnboundedReceiver<agent::Event>,
    seen: Vec<Seen>,
    dial_failed: usize,
    /// Why dials failed, with how often.
    dial_errors: std::collections::BTreeMap<String, usize>,
    refused: usize,
    ended: usize,
    /// Why streams ended, with how often.
    ended_why: std::collections::BTreeMap<String, usize>,
    /// What agents refused (the bench fails when there is any).
    bad: Vec<String>,
    /// Update events taken so far: a phase waiting for every agent's next
    /// Update scans the agents only once this many could have come, not on
    /// every event (a scan of every agent per event is quadratic: 10,000
    /// agents made it 10^8 checks per change on the cores the hub shares).
    updates: usize,
}

impl Collector {
    fn take(&mut self, e: agent::Event) {
        match e {
            agent::Event::Update {
                idx,
                at,
                revision,
                bytes,
                first,
                complete,
            } => {
                self.updates += 1;
                let s = &mut self.seen[idx];
                if complete && s.synced_at.is_none() {
                    s.synced_at = Some(at);
                    s.first_sync_bytes = bytes;
                }
                s.last = Some((at, revision, bytes, first));
            }
            agent::Event::DialFailed(why) => {
                self.dial_failed += 1;
                *self.dial_errors.entry(why).or_default() += 1;
            }
            agent::Event::Refused => self.refused += 1,
            agent::Event::Bad(why) => self.bad.push(why),
            agent::Event::StreamEnded(why) => {
                self.ended += 1;
                *self.ended_why.entry(why).or_default() += 1;
            }
        }
    }

    /// Takes events until `done` holds or `limit` passes; false on timeout.
    async fn until(&mut self, limit: Duration, done: impl Fn(&Self) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !done(self) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(e)) => self.take(e),
                _ => return done(self),
            }
        }
        true
    }

    fn drain(&mut self) {
        while let Ok(e) = self.rx.try_recv() {
            self.take(e);
        }
    }
}

fn main() {
    keep_freed_memory();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("tokio runtime: {e}"))
        .block_on(run());
}

async fn run() {
    let o = opts();
    raise_nofile();
    // ≈ 400 KB per agent (the shape of 1,000 gateways × 10 nodes).
    let (warmed, warm) = prefault(o.agents * (400 << 10));
    println!(
        "load generator heap warmed: {:.1} GB touched once in {} (kept by malloc for the agents)",
        warmed as f64 / 1e9,
        ms(warm)
    );
    let work = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let w = work.path();
    let machine = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    println!(
        "raven hub fan-out: {} gateways × {} nodes ({} nodes), {} agents, {} changes; {} CPUs ({machine})",
        o.shape.gateways,
        o.shape.nodes,
        o.shape.gateways * o.shape.nodes,
        o.agents,
        o.changes,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("load average at the start: {}", loadavg());

    // Cluster and certificates.
    let t = Instant::now();
    cluster::write(&w.join("manifests"), o.shape).unwrap_or_else(|e| panic!("manifests: {e}"));
    let picked = cluster::pick_agents(o.shape, o.agents, o.members_only);
    let nodes: Vec<NodeName> = picked
        .iter()
        .map(|&(g, i)| NodeName::new(cluster::node_name(g, i)).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    // The CA and the hub's certificate on disk; the agents' certificates in
    // memory, one per agent, all for one shared key (a signature each, no
    // key generation, no file writes: 10,000 take seconds, not minutes).
    raven_hub::certs::generate(
        &w.join("certs"),
        &["localhost".into(), "127.0.0.1".into()],
        &[],
    )
    .unwrap_or_else(|e| panic!("certificates: {e}"));
    let issuer =
        raven_hub::certs::NodeIssuer::open(&w.join("certs")).unwrap_or_else(|e| panic!("CA: {e}"));
    let agent_key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("agent key: {e}"));
    let agent_key_pem = agent_key.serialize_pem();
    let agent_certs: Vec<String> = nodes
        .iter()
        .map(|n| {
            issuer
                .issue(n, &agent_key)
                .unwrap_or_else(|e| panic!("certificate of {n}: {e}"))
        })
        .collect();
    println!(
        "setup: cluster and {} certificates in {}",
        nodes.len(),
        ms(t.elapsed())
    );

    let grpc: SocketAddr = ([127, 0, 0, 1], etcd::free_port()).into();
    let mut hub = Hub::start(w, grpc);
    let startup = hub.ready().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = proc_rss(hub.pid());
    println!(
        "hub ready in {} (RSS {:.1} MB before agents)",
        ms(startup),
        rss0 as f64 / 1e6
    );

    let layout = raven_hub::certs::Layout {
        dir: w.join("certs"),
    };
    let roots = {
        let ca = std::fs::read(layout.ca_cert()).unwrap_or_else(|e| panic!("CA certificate: {e}"));
        Arc::new(raven_edge::hub_tls::roots(&ca).unwrap_or_else(|e| panic!("CA certificate: {e}")))
    };
    let url = Arc::new(std::sync::Mutex::new(format!("https://{}", hub.grpc)));
    let (tx, rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let mut specs = Vec::new();
    for (idx, ((&(g, i), node), cert)) in picked.iter().zip(&nodes).zip(&agent_certs).enumerate() {
        specs.push(agent::Spec {
            idx,
            node: node.to_string(),
            candidate: i < 2,
            internal_ip: cluster::internal_ip(o.shape, g, i),
            source: agent::source(idx),
            tls: raven_edge::hub_tls::client_config_with(
                roots.clone(),
                cert.as_bytes(),
                agent_key_pem.as_bytes(),
            )
            .map(Arc::new)
            .unwrap_or_else(|e| panic!("TLS client of {node}: {e}")),
            hub: url.clone(),
            applied_with_resources: o.applied_with_resources,
            compact: !o.full_view,
            hello_with_list: o.hello_with_list,
            heartbeat: Duration::from_secs(10),
            check_mirror: idx == 0,
        });
    }
    let mut c = Collector {
        rx,
        seen: vec![Seen::default(); o.agents],
        dial_failed: 0,
        dial_errors: std::collections::BTreeMap::new(),
        refused: 0,
        ended: 0,
        ended_why: std::collections::BTreeMap::new(),
        bad: Vec::new(),
        updates: 0,
    };

    // 1. Everyone at once.
    let me = std::process::id();
    let connect_cpu0 = (proc_cpu(hub.pid()), proc_cpu(me));
    let connect_faults0 = (proc_faults(hub.pid()), proc_faults(me));
    let connect_ticks0 = machine_ticks();
    let t0 = Instant::now();
    for spec in specs {
        tokio::spawn(agent::run(spec, tx.clone(), stop.clone()));
    }
    let all = c
        .until(Duration::from_secs(600), |c| {
            c.seen.iter().all(|s| s.synced_at.is_some())
        })
        .await;
    let synced = c.seen.iter().filter(|s| s.synced_at.is_some()).count();
    let connect_all = c
        .seen
        .iter()
        .filter_map(|s| s.synced_at)
        .max()
        .map_or(Duration::ZERO, |t| t.saturating_duration_since(t0));
    let connect_cpu = (
        proc_cpu(hub.pid()).saturating_sub(connect_cpu0.0),
        proc_cpu(me).saturating_sub(connect_cpu0.1),
    );
    let connect_faults = (
        proc_faults(hub.pid()).saturating_sub(connect_faults0.0),
        proc_faults(me).saturating_sub(connect_faults0.1),
    );
    let connect_steal = steal_since(connect_ticks0);
    let (dials, refusals, ended_connecting) = (c.dial_failed, c.refused, c.ended);
    let connect_plans = hub.plans().await;
    let dial_errors = std::mem::take(&mut c.dial_errors);
    // Let Reports and the peers they create settle.
    settle(&mut c, Duration::from_secs(2)).await;
    let rss1 = proc_rss(hub.pid());
    if o.hold_after_sync > 0 {
        println!(
            "all synced; hub pid {} RSS {:.1} MB; holding {} s (--hold-after-sync)",
            hub.pid(),
            rss1 as f64 / 1e6,
            o.hold_after_sync
        );
        settle(&mut c, Duration::from_secs(o.hold_after_sync)).await;
    }
    let first_bytes: Vec<(bool, usize)> = c
        .seen
        .iter()
        .zip(&picked)
        .map(|(s, &(_, i))| (i < 2, s.first_sync_bytes))
        .collect();
    let avg = |gw: bool| {
        let v: Vec<usize> = first_bytes
            .iter()
            .filter(|(g, _)| *g == gw)
            .map(|(_, b)| *b)
            .collect();
        (
            v.iter().sum::<usize>() / v.len().max(1),
            v.iter().copied().max().unwrap_or(0),
        )
    };
    let (cand_avg, cand_max) = avg(true);
    let (member_avg, member_max) = avg(false);

    // 2. One-node changes: a member of gateway 1 moves its pod CIDR, back
    // and forth. Every node in a domain sees the gateway's view change.
    let g = 1.min(o.shape.gateways - 1);
    let n = (o.shape.nodes - 1).min(2);
    let mut latencies = Vec::new();
    let mut cpu_per_change = Vec::new();
    let mut delivered = Vec::new();
    let mut bytes_per_change = Vec::new();
    // Change → published at the hub (its own timestamp), and published →
    // each agent's ACK: the two parts of every latency above.
    let mut to_publish = Vec::new();
    let mut fan_out = Vec::new();
    // The hub's CPU over each quiet second before a change (heartbeats,
    // HTTP/2 keepalive PINGs): what the CPU per change has subtracted.
    let mut idle_per_second = Vec::new();
    eprintln!("fan-out bench: change phase starts");
    for k in 0..o.changes {
        // Idle CPU of the hub (heartbeats) over a quiet second, subtracted.
        let idle0 = proc_cpu(hub.pid());
        settle(&mut c, Duration::from_millis(1000)).await;
        let idle = proc_cpu(hub.pid()).saturating_sub(idle0);
        idle_per_second.push(idle);
        let before: Vec<Option<(Instant, u64, usize, bool)>> =
            c.seen.iter().map(|s| s.last).collect();
        let cpu0 = proc_cpu(hub.pid());
        let at = Instant::now();
        let wall = std::time::SystemTime::now();
        cluster::rewrite(&w.join("manifests"), o.shape, g, (k % 2 == 0).then_some(n))
            .unwrap_or_else(|e| panic!("rewrite: {e}"));
        let changed = |c: &Collector| {
            c.seen
                .iter()
                .zip(&before)
                .filter(|(s, b)| s.last.map(|l| l.0) != b.map(|b| b.0))
                .count()
        };
        let updates0 = c.updates;
        c.until(Duration::from_secs(120), |c| {
            c.updates >= updates0 + o.agents && changed(c) >= o.agents
        })
        .await;
        let took = at.elapsed();
        // Applied and anything else the change causes.
        settle(&mut c, Duration::from_millis(300)).await;
        let spent = proc_cpu(hub.pid()).saturating_sub(cpu0);
        let window = took + Duration::from_millis(300);
        let idle_share = idle.mul_f64(window.as_secs_f64().min(10.0));
        cpu_per_change.push(spent.saturating_sub(idle_share));
        let published = hub
            .published_at()
            .await
            .and_then(|p| p.duration_since(wall).ok());
        if let Some(p) = published {
            to_publish.push(p);
        }
        let mut got = 0;
        for (s, b) in c.seen.iter().zip(&before) {
            if let Some(l) = s.last
                && Some(l.0) != b.map(|b| b.0)
            {
                let latency = l.0.saturating_duration_since(at);
                latencies.push(latency);
                if let Some(p) = published {
                    fan_out.push(latency.saturating_sub(p));
                }
                bytes_per_change.push(l.2.saturating_sub(b.map_or(0, |b| b.2)));
                got += 1;
            }
        }
        delivered.push(got);
    }
    latencies.sort();
    cpu_per_change.sort();
    to_publish.sort();
    idle_per_second.sort();
    fan_out.sort();
    let change_p50 = pct(&latencies, 0.5);
    let change_p99 = pct(&latencies, 0.99);
    let cpu_change = pct(&cpu_per_change, 0.5);
    let per_change_bytes = bytes_per_change.iter().sum::<usize>() / bytes_per_change.len().max(1);

    // 3. Restart with nothing changed.
    let ended0 = c.ended;
    let rss_connected = proc_rss(hub.pid());
    let old_exit = hub.stop();
    let before: Vec<Option<(Instant, u64, usize, bool)>> = c.seen.iter().map(|s| s.last).collect();
    let updates0 = c.updates;
    c.drain();
    let dials_before_restart = c.dial_failed;
    let restart_me0 = proc_cpu(me);
    let t_restart = Instant::now();
    hub = Hub::start(w, grpc);
    let hub_ready = hub.ready().await;
    c.drain();
    let dials_until_ready = c.dial_failed - dials_before_restart;
    let back = |c: &Collector| {
        c.seen
            .iter()
            .zip(&before)
            .filter(|(s, b)| s.last.map(|l| l.0) != b.map(|b| b.0))
            .count()
    };
    c.until(Duration::from_secs(600), |c| {
        c.updates >= updates0 + o.agents && back(c) >= o.agents
    })
    .await;
    let restart_back = back(&c);
    // The new hub's CPU from its start (its startup and first compile
    // included), the bench's since the restart.
    let restart_cpu = (
        proc_cpu(hub.pid()),
        proc_cpu(me).saturating_sub(restart_me0),
    );
    // Every agent resumed with its inventory in its Hello.
    let rss_restarted = proc_rss(hub.pid());
    let restart_tls = (
        hub.metric("raven_hub_tls_handshakes_total{kind=\"full\"}")
            .await
            .unwrap_or(0.0) as u64,
        hub.metric("raven_hub_tls_handshakes_total{kind=\"resumed\"}")
            .await
            .unwrap_or(0.0) as u64,
    );
    let restart = c
        .seen
        .iter()
        .zip(&before)
        .filter_map(|(s, b)| s.last.filter(|l| Some(l.0) != b.map(|b| b.0)))
        .map(|l| l.0.saturating_duration_since(t_restart))
        .max()
        .unwrap_or_default();
    let restart_bytes: Vec<usize> = c
        .seen
        .iter()
        .zip(&before)
        .filter_map(|(s, b)| s.last.filter(|l| Some(l.0) != b.map(|b| b.0)))
        .map(|l| l.2)
        .collect();
    let restart_avg = restart_bytes.iter().sum::<usize>() / restart_bytes.len().max(1);
    let _ = ended0;
    stop.cancel();
    hub.stop();

    let dials_after = c.dial_failed - dials;
    let rss_per_agent = rss1.saturating_sub(rss0) / o.agents.max(1) as u64;
    println!();
    println!("| figure | raven hub |");
    println!("|---|---|");
    println!(
        "| all {} connect at once → all synced | {} ({} synced{}; {} dials failed, {} admission refusals, {} streams ended) |",
        o.agents,
        ms(connect_all),
        synced,
        if all { "" } else { ", TIMED OUT" },
        dials,
        refusals,
        ended_connecting
    );
    println!(
        "| CPU through the connect phase (until all synced) | hub {} CPU-s ({:.2} cores), load generator {} CPU-s ({:.2} cores) |",
        cpu_s(connect_cpu.0),
        cores(connect_cpu.0, connect_all),
        cpu_s(connect_cpu.1),
        cores(connect_cpu.1, connect_all),
    );
    println!(
        "| the machine through the connect phase | {:.1} % of its CPU time stolen by the hypervisor; page faults: hub {}, load generator {} |",
        connect_steal, connect_faults.0, connect_faults.1
    );
    println!(
        "| plans through the connect phase (`raven_hub_plans_total`) | {} full, {} delta, {} in sync, {} resumed; revision {} at the end |",
        connect_plans[3], connect_plans[2], connect_plans[1], connect_plans[0], connect_plans[4]
    );
    println!(
        "| first-sync bytes per agent | tunnel candidates {:.1} KB avg ({:.1} KB max); members {:.1} KB avg ({:.1} KB max) |",
        cand_avg as f64 / 1e3,
        cand_max as f64 / 1e3,
        member_avg as f64 / 1e3,
        member_max as f64 / 1e3
    );
    println!(
        "| one-node change → ACK p50 / p99 | {} / {} (agents updated per change: {:?}) |",
        ms(change_p50),
        ms(change_p99),
        delivered
    );
    println!(
        "| of which change → published at the hub (median / max) | {} / {} ({} of {} changes stamped) |",
        ms(pct(&to_publish, 0.5)),
        ms(to_publish.last().copied().unwrap_or_default()),
        to_publish.len(),
        o.changes
    );
    println!(
        "| of which published → ACK (fan-out) p50 / p99 | {} / {} |",
        ms(pct(&fan_out, 0.5)),
        ms(pct(&fan_out, 0.99))
    );
    println!(
        "| hub CPU per one-node change (median, idle subtracted) | {} |",
        ms(cpu_change)
    );
    println!(
        "| hub CPU per quiet second, connected (median; heartbeats, keepalive) | {} |",
        ms(pct(&idle_per_second, 0.5))
    );
    println!(
        "| hub RSS connected | {:.1} MB ({:.1} MB before agents; {:.1} KB per agent; {:.1} MB after the changes) |",
        rss1 as f64 / 1e6,
        rss0 as f64 / 1e6,
        rss_per_agent as f64 / 1e3,
        rss_connected as f64 / 1e6
    );
    println!(
        "| hub restart, nothing changed → all in sync | {} ({} of {} back; the old hub exited {} after SIGTERM; hub ready after {}; {} dials failed until ready, {} after the connect phase in all; {} admission refusals in all) |",
        ms(restart),
        restart_back,
        o.agents,
        ms(old_exit),
        ms(hub_ready),
        dials_until_ready,
        dials_after,
        c.refused
    );
    println!(
        "| CPU from the restart until all in sync | hub {} CPU-s (from its start), load generator {} CPU-s |",
        cpu_s(restart_cpu.0),
        cpu_s(restart_cpu.1),
    );
    println!(
        "| TLS handshakes with the restarted hub (`raven_hub_tls_handshakes_total`) | {} resumed, {} full |",
        restart_tls.1, restart_tls.0,
    );
    println!(
        "| hub RSS after the restart, all back in sync (resumed with their inventories) | {:.1} MB ({:.1} KB per agent over the first hub's before agents) |",
        rss_restarted as f64 / 1e6,
        rss_restarted.saturating_sub(rss0) as f64 / 1e3 / o.agents.max(1) as f64,
    );
    println!(
        "| bytes per agent per change / after restart | {per_change_bytes} B / {restart_avg} B |"
    );

    for (why, n) in dial_errors.iter().chain(c.dial_errors.iter()).take(8) {
        println!("dial failure ×{n}: {why}");
    }
    for (why, n) in c.ended_why.iter().take(8) {
        println!("stream ended ×{n}: {why}");
    }
    println!("load average at the end: {}", loadavg());

    if o.etcd {
        match etcd::start(w).await {
            None => println!(
                "\netcd baseline: skipped (no `etcd` on PATH; apt-get install etcd-server)"
            ),
            Some(e) => {
                let f = etcd::fanout(&e, o.agents, o.changes).await;
                let mut d = f.delivery.clone();
                d.sort();
                let (e50, e99) = (pct(&d, 0.5), pct(&d, 0.99));
                println!();
                println!(
                    "| baseline: etcd watch fan-out, {} watchers of one key, 650 B put | etcd | raven ÷ etcd |",
                    f.watchers
                );
                println!("|---|---|---|");
                println!(
                    "| all watches open | {} | {:.2}× (all synced) |",
                    ms(f.open),
                    ratio(connect_all, f.open)
                );
                println!(
                    "| delivery p50 | {} | {:.2}× |",
                    ms(e50),
                    ratio(change_p50, e50)
                );
                println!(
                    "| delivery p99 | {} | {:.2}× |",
                    ms(e99),
                    ratio(change_p99, e99)
                );
                println!(
                    "| server CPU per change | {} | {:.2}× |",
                    ms(f.cpu_per_change),
                    ratio(cpu_change, f.cpu_per_change)
                );
            }
        }
    }
    for why in c.bad.iter().take(8) {
        eprintln!("an agent refused what the hub sent: {why}");
    }
    if std::env::var_os("RAVEN_HUB_LOG").is_some() {
        let kept = std::env::temp_dir().join("fanout-hub.log");
        if std::fs::copy(w.join("hub.log"), &kept).is_ok() {
            println!("hub log (both runs): {}", kept.display());
        }
    }
    if !all || synced == 0 || latencies.is_empty() || !c.bad.is_empty() {
        eprintln!(
            "the hub did not deliver to every agent (see {})",
            w.join("hub.log").display()
        );
        let _ = std::fs::copy(
            w.join("hub.log"),
            std::env::temp_dir().join("fanout-hub.log"),
        );
        std::process::exit(1);
    }
}

/// The 1, 5 and 15 minute load averages.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn cpu_s(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

/// CPU time over wall time: how many cores a process used on average.
fn cores(cpu: Duration, wall: Duration) -> f64 {
    cpu.as_secs_f64() / wall.as_secs_f64().max(1e-6)
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-6)
}

async fn settle(c: &mut Collector, d: Duration) {
    let _ = c.until(d, |_| false).await;
    c.drain();
}
