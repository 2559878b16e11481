//! Skip-NAT: traffic between raven domains keeps its source address.
//!
//! A CNI masquerades what leaves the node (flannel's `FLANNEL-POSTRTG`,
//! calico's `natOutgoing`, kube-proxy's `KUBE-POSTROUTING`): all of it in
//! the `nat` table's `POSTROUTING` chain. Rewriting the source of a packet
//! from this node's domain to a remote domain would hide the pod behind the
//! node and break replies routed back by pod address, so raven ends the
//! chain first for exactly that traffic:
//!
//! ```text
//! POSTROUTING  1: -m comment --comment "raven: …" -j RAVEN-SKIP-NAT   (then the CNI's rules)
//! RAVEN-SKIP-NAT      -s <each prefix of my domain>   -j RAVEN-SKIP-NAT-DST
//! RAVEN-SKIP-NAT-DST  -j RAVEN-SKIP-NAT-B<nn>        (one per bucket holding a destination)
//! RAVEN-SKIP-NAT-B<nn> -d <each remote prefix of the bucket> -j ACCEPT
//! ```
//!
//! `ACCEPT` in a `nat` chain ends the traversal of `POSTROUTING` without
//! NAT, so the rule count is sources + destinations, not their product.
//! Sources are my gateway's prefixes (members' addresses, pod subnets,
//! extra source CIDRs); destinations are the remote prefixes raven routes
//! (the same filter as the routes in [`super::model::desired`]: a remote
//! host prefix that is one of my members or a tunnel endpoint's public
//! address is not routed to a remote domain, so it is not exempted either),
//! aggregated per remote gateway. The destinations are spread over
//! [`BUCKETS`] chains by a hash of the prefix: `iptables-nft-restore`
//! fetches the whole chain a rule is deleted from, so a moved prefix among
//! 4,000 in one chain cost ~200 ms, in its bucket about the cost of starting
//! the process (see BENCHMARKS.md).
//!
//! Programmed with the `iptables`/`ip6tables` binaries, which pick the
//! host's backend (nft or legacy) the way the CNI's own tools do. Raven owns
//! the two chains and every `POSTROUTING` rule jumping to `RAVEN-SKIP-NAT`;
//! nothing else is ever changed. Level-triggered and incremental: observe
//! (one `iptables -t nat -S` per family: the kernel's rules are the truth,
//! also after a restart) → [`diff`] (pure) → one atomic
//! `iptables-restore --noflush` that deletes exactly the rules of raven's
//! chains that are not wanted (stale, duplicated or foreign) and appends
//! exactly the wanted ones that are missing — a change of one remote
//! prefix writes two rules, never a rebuild of thousands. A change pass
//! does not list at all: it writes what [`super::incremental::Index`]
//! planned from what the last pass applied. Each chain's rules are all
//! alike (`-j RAVEN-SKIP-NAT-DST`, `-j RAVEN-SKIP-NAT-B<nn>`, `-j ACCEPT`),
//! so their order carries no meaning and is never corrected. Should an incremental
//! transaction be refused (a hand-made rule `iptables-restore` cannot
//! delete by its listing, say), the chains are rebuilt whole instead.
//! A jump already present is left where it is, also when another tool has
//! since inserted rules above it: moving it back to the top would fight
//! CNIs that keep their own jump first (calico's insert mode).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::{Output, Stdio};

use ipnet::IpNet;
use tokio::io::AsyncWriteExt;

use raven_model::topology::GatewayView;

use super::model::NodeInputs;

/// The chain `POSTROUTING` jumps to: one rule per source prefix.
pub const CHAIN: &str = "RAVEN-SKIP-NAT";
/// The chain of destinations: one `ACCEPT` per remote prefix.
pub const DST_CHAIN: &str = "RAVEN-SKIP-NAT-DST";
/// The comment on raven's jump in `POSTROUTING`.
pub const COMMENT: &str = "raven: no CNI masquerade between raven domains";
/// Seconds to wait for the xtables lock (legacy backend; nft ignores it).
const WAIT_SECONDS: &str = "5";

/// An address family, and the binaries that program it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    pub fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    pub fn of(net: &IpNet) -> Self {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }
}

/// The skip-NAT rules of one family: traffic from any source to any
/// destination is not masqueraded. Both sorted, aggregated, host bits
/// cleared; both empty when either would be (no rules at all).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    pub sources: Vec<IpNet>,
    pub destinations: Vec<IpNet>,
}

impl Rules {
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// `-A` lines of [`CHAIN`], exactly as `iptables -S` prints them.
    pub fn source_lines(&self) -> Vec<String> {
        self.sources.iter().map(source_line).collect()
    }

    /// The `-A` lines of the destination buckets, exactly as `iptables -S`
    /// prints them (each in the bucket [`bucket_chain`] names).
    pub fn destination_lines(&self) -> Vec<String> {
        self.destinations.iter().map(destination_line).collect()
    }

    /// Raven's chains holding these rules: [`CHAIN`], [`DST_CHAIN`] (one
    /// jump per bucket that holds a destination) and those buckets; none at
    /// all for empty rules.
    pub fn layout(&self) -> Chains {
        let mut chains = Chains::new();
        if self.is_empty() {
            return chains;
        }
        chains.insert(CHAIN.to_owned(), self.source_lines());
        let mut jumps = Vec::new();
        for d in &self.destinations {
            let chain = bucket_chain(bucket(d));
            let lines = chains.entry(chain).or_insert_with(|| {
                jumps.push(bucket(d));
                Vec::new()
            });
            lines.push(destination_line(d));
        }
        jumps.sort_unstable();
        chains.insert(
            DST_CHAIN.to_owned(),
            jumps.into_iter().map(bucket_jump_line).collect(),
        );
        chains
    }
}

/// How many chains the destinations are spread over. One chain of 4,000
/// rules costs `iptables-nft-restore` ~200 ms to delete one rule from (it
/// fetches the whole chain to find the rule); 64 buckets of ~60 rules make
/// it the cost of starting the process. A packet still meets each
/// destination rule once: the buckets are jumped to in turn and return
/// when nothing matches.
pub const BUCKETS: u8 = 64;
/// The prefix of the bucket chains' names (`RAVEN-SKIP-NAT-B00` …).
pub const BUCKET_PREFIX: &str = "RAVEN-SKIP-NAT-B";

/// The bucket of destination `net`: a hash of the prefix (FNV-1a over its
/// address and length), so that it never depends on the other rules and
/// a change of one destination touches one bucket.
pub fn bucket(net: &IpNet) -> u8 {
    let mut h: u32 = 0x811c_9dc5;
    let bytes: Vec<u8> = match net.trunc().addr() {
        std::net::IpAddr::V4(a) => a.octets().to_vec(),
        std::net::IpAddr::V6(a) => a.octets().to_vec(),
    };
    for b in bytes.into_iter().chain([net.prefix_len()]) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % u32::from(BUCKETS)) as u8
}

/// The chain of bucket `b`.
pub fn bucket_chain(b: u8) -> String {
    format!("{BUCKET_PREFIX}{b:02}")
}

/// Whether `chain` is one of raven's skip-NAT chains.
pub fn is_ravens_chain(chain: &str) -> bool {
    chain == CHAIN
        || chain == DST_CHAIN
        || chain
            .strip_prefix(BUCKET_PREFIX)
            .is_some_and(|n| n.len() == 2 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The rule of [`CHAIN`] for source `s`, as `iptables -S` prints it.
pub fn source_line(s: &IpNet) -> String {
    format!("-A {CHAIN}{} -j {DST_CHAIN}", addr_match("-s", s))
}

/// The rule of destination `d` in its bucket, as `iptables -S` prints it.
pub fn destination_line(d: &IpNet) -> String {
    format!(
        "-A {}{} -j ACCEPT",
        bucket_chain(bucket(d)),
        addr_match("-d", d)
    )
}

/// The rule of [`DST_CHAIN`] jumping to bucket `b`.
pub fn bucket_jump_line(b: u8) -> String {
    format!("-A {DST_CHAIN} -j {}", bucket_chain(b))
}

/// Raven's chains of one family: each chain's `-A` lines, as `iptables -S`
/// prints them.
pub type Chains = BTreeMap<String, Vec<String>>;

/// ` -s NET`, or nothing for a catch-all prefix (`iptables -S` omits it).
fn addr_match(flag: &str, net: &IpNet) -> String {
    if net.prefix_len() == 0 {
        String::new()
    } else {
        format!(" {flag} {net}")
    }
}

/// raven's jump from `POSTROUTING`, as `iptables -S` prints it.
pub fn jump_line() -> String {
    format!("-A POSTROUTING -m comment --comment \"{COMMENT}\" -j {CHAIN}")
}

/// The node's skip-NAT rules, per family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SkipNat {
    pub v4: Rules,
    pub v6: Rules,
}

impl SkipNat {
    pub fn family(&self, f: Family) -> &Rules {
        match f {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }
}

/// The skip-NAT rules `inputs` call for: from my gateway's prefixes to
/// every other gateway's. Empty when the node belongs to no gateway (or
/// to one the topology does not list) or there is no remote domain. Pure;
/// independent of the order of gateways, members and prefixes.
///
/// The destinations are aggregated per remote gateway (see
/// [`gateway_destinations`]), not across gateways: a change of one gateway
/// then rewrites only its own rules (an aggregate spanning two domains
/// would move with either). Overlapping rules of two gateways are
/// harmless: each accepts.
pub fn spec(inputs: &NodeInputs) -> SkipNat {
    let Some(gw_name) = inputs.me.as_ref().and_then(|me| me.gateway.as_ref()) else {
        return SkipNat::default();
    };
    let Some(my_gw) = inputs.gateways.iter().find(|g| &g.name == gw_name) else {
        return SkipNat::default();
    };
    let excluded = super::model::Excluded::of(&inputs.gateways, &inputs.remote, my_gw);
    let mut destinations: Vec<IpNet> = inputs
        .gateways
        .iter()
        .filter(|g| &g.name != gw_name)
        .flat_map(|g| gateway_destinations(g, &excluded))
        .chain(
            inputs
                .remote
                .iter()
                .filter(|d| &d.gateway != gw_name)
                .flat_map(|d| domain_destinations(d, &excluded)),
        )
        .collect();
    destinations.sort_unstable();
    destinations.dedup();
    let sources = sources(my_gw);
    SkipNat {
        v4: Rules::of(Family::V4, &sources, &destinations),
        v6: Rules::of(Family::V6, &sources, &destinations),
    }
}

/// My domain's prefixes, aggregated per family: the skip-NAT sources.
pub fn sources(my_gw: &GatewayView) -> Vec<IpNet> {
    aggregated(my_gw.prefixes())
}

/// The skip-NAT destinations of remote gateway `g`: its prefixes that are
/// routed (`excluded` takes out host prefixes of my members and of tunnel
/// endpoints), aggregated per family.
pub fn gateway_destinations(g: &GatewayView, excluded: &super::model::Excluded) -> Vec<IpNet> {
    aggregated(g.prefixes().filter(|p| !excluded.excludes(p)))
}

/// The skip-NAT destinations of a remote domain known by its prefixes
/// alone (the compact member view), as [`gateway_destinations`] of its
/// gateway.
pub fn domain_destinations(
    d: &raven_model::topology::DomainPrefixes,
    excluded: &super::model::Excluded,
) -> Vec<IpNet> {
    aggregated(d.prefixes.iter().copied().filter(|p| !excluded.excludes(p)))
}

/// `nets` aggregated per family: IPv4 first, each sorted.
fn aggregated(nets: impl Iterator<Item = IpNet>) -> Vec<IpNet> {
    let (v4, v6): (Vec<IpNet>, Vec<IpNet>) = nets.partition(|n| Family::of(n) == Family::V4);
    let mut out = IpNet::aggregate(&v4);
    out.extend(IpNet::aggregate(&v6));
    out
}

impl Rules {
    /// The rules of family `f` from sorted `sources` and `destinations`
    /// (both families): none unless both have one of `f`.
    fn of(f: Family, sources: &[IpNet], destinations: &[IpNet]) -> Self {
        let pick = |nets: &[IpNet]| -> Vec<IpNet> {
            nets.iter()
                .filter(|n| Family::of(n) == f)
                .copied()
                .collect()
        };
        let rules = Rules {
            sources: pick(sources),
            destinations: pick(destinations),
        };
        if rules.sources.is_empty() || rules.destinations.is_empty() {
            Rules::default()
        } else {
            rules
        }
    }
}

/// Raven's part of one family's `nat` table, as `iptables -S` prints it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// The `POSTROUTING` rules jumping to [`CHAIN`].
    pub jumps: Vec<String>,
    /// Raven's chains that exist ([`is_ravens_chain`]), with their `-A`
    /// lines.
    pub chains: Chains,
}

/// The rules of `POSTROUTING` (`iptables -S POSTROUTING` output) that jump
/// to [`CHAIN`].
pub fn parse_jumps(postrouting: &str) -> Vec<String> {
    postrouting
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("-A POSTROUTING "))
        .filter(|l| {
            let t: Vec<&str> = l.split_whitespace().collect();
            t.windows(2)
                .last()
                .is_some_and(|w| (w[0] == "-j" || w[0] == "--jump") && w[1] == CHAIN)
        })
        .map(str::to_owned)
        .collect()
}

/// The rules of a chain (`iptables -S CHAIN` output), without its `-N`.
pub fn parse_chain(listing: &str) -> Vec<String> {
    listing
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("-A "))
        .map(str::to_owned)
        .collect()
}

/// Raven's part of a whole `nat` table listing (`iptables -t nat -S`):
/// the jumps from `POSTROUTING` and raven's chains that exist.
pub fn parse_table(listing: &str) -> Observed {
    let mut o = Observed {
        jumps: parse_jumps(listing),
        ..Observed::default()
    };
    for line in listing.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        let (Some(verb), Some(chain)) = (words.next(), words.next()) else {
            continue;
        };
        if !is_ravens_chain(chain) {
            continue;
        }
        let slot = o.chains.entry(chain.to_owned()).or_default();
        if verb == "-A" {
            slot.push(line.to_owned());
        }
    }
    o
}

/// What turns raven's chains `a` into `b`, counted as [`plan`] counts: each
/// rule deleted or appended, each chain created or removed.
pub fn changes_between(a: &Chains, b: &Chains) -> usize {
    let rules = |c: &Chains| -> std::collections::BTreeSet<(String, String)> {
        c.iter()
            .flat_map(|(k, v)| v.iter().map(move |l| (k.clone(), l.clone())))
            .collect()
    };
    let names = |c: &Chains| -> std::collections::BTreeSet<String> { c.keys().cloned().collect() };
    rules(a).symmetric_difference(&rules(b)).count()
        + names(a).symmetric_difference(&names(b)).count()
}

/// One atomic change of a family's `nat` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restore {
    /// Input for `iptables-restore --noflush`.
    pub script: String,
    /// Rules written: each rule appended or deleted, each jump inserted or
    /// deleted, each chain created, rebuilt or removed counts one.
    pub changes: usize,
}

/// What turns `observed` into `desired`, touching only the rules that
/// differ; `None` when they already agree. A missing chain is created; an
/// exact jump is kept wherever it stands; empty rules remove the jumps and
/// raven's chains. Pure.
pub fn diff(desired: &Rules, observed: &Observed) -> Option<Restore> {
    plan(&desired.layout(), observed, false)
}

/// Like [`diff`], but every chain that differs at all is redeclared
/// (flushed and refilled in the same transaction): the fallback when an
/// incremental transaction is refused.
pub fn plan_rebuild(desired: &Rules, observed: &Observed) -> Option<Restore> {
    plan(&desired.layout(), observed, true)
}

/// The order chains are written in: the buckets, then [`DST_CHAIN`] (its
/// rules jump to them), then [`CHAIN`].
fn chain_rank(chain: &str) -> (u8, &str) {
    match chain {
        CHAIN => (2, chain),
        DST_CHAIN => (1, chain),
        _ => (0, chain),
    }
}

/// What turns `have` into the chains `want` (empty: none of raven's
/// chains, no jump) in one `iptables-restore --noflush`: chains only in
/// `want` are declared and filled, chains in both get the rules that
/// differ (or, with `rebuild`, are redeclared whole), chains only in `have`
/// are flushed and removed last (after the rules jumping to them went).
/// `have` may be a part of the table — the chains and rules a change
/// touches — as long as `want` is the same part: what neither names is
/// left alone. Changes: each rule appended or deleted and each chain
/// created or removed counts one (a flushed chain counts its rules); a
/// rebuilt chain counts one. Pure.
pub fn plan(want: &Chains, have: &Observed, rebuild: bool) -> Option<Restore> {
    let mut declare = String::new();
    let mut body = String::new();
    let mut tail = String::new();
    let mut changes = 0;
    let delete = |body: &mut String, rule: &str| {
        if let Some(rest) = rule.strip_prefix("-A ") {
            let _ = writeln!(body, "-D {rest}");
        }
    };
    let mut names: Vec<&String> = want.keys().chain(have.chains.keys()).collect();
    names.sort_by(|a, b| chain_rank(a).cmp(&chain_rank(b)));
    names.dedup();
    let mut gone = Vec::new();
    for chain in names {
        match (want.get(chain), have.chains.get(chain)) {
            (Some(lines), None) => {
                let _ = writeln!(declare, ":{chain} - [0:0]");
                changes += 1 + lines.len();
                for l in lines {
                    let _ = writeln!(body, "{l}");
                }
            }
            (Some(lines), Some(had)) => {
                let (stale, missing) = rule_diff(lines, had);
                if stale.is_empty() && missing.is_empty() {
                    continue;
                }
                if rebuild {
                    let _ = writeln!(declare, ":{chain} - [0:0]");
                    for l in lines {
                        let _ = writeln!(body, "{l}");
                    }
                    changes += 1;
                    continue;
                }
                changes += stale.len() + missing.len();
                for l in stale {
                    delete(&mut body, l);
                }
                for l in missing {
                    let _ = writeln!(body, "{l}");
                }
            }
            (None, Some(had)) => {
                changes += 1 + had.len();
                gone.push(chain);
            }
            (None, None) => {}
        }
    }
    // Flush all before removing any: raven's chains jump to each other.
    gone.sort_by_key(|c| std::cmp::Reverse(chain_rank(c).0));
    for c in &gone {
        let _ = writeln!(tail, "-F {c}");
    }
    for c in &gone {
        let _ = writeln!(tail, "-X {c}");
    }
    let jump = jump_line();
    let mut kept = false;
    for j in &have.jumps {
        if *j == jump && !kept && !want.is_empty() {
            kept = true;
        } else {
            delete(&mut body, j);
            changes += 1;
        }
    }
    if !kept && !want.is_empty() {
        let rest = jump.strip_prefix("-A POSTROUTING").unwrap_or_default();
        let _ = writeln!(body, "-I POSTROUTING 1{rest}");
        changes += 1;
    }
    (changes > 0).then(|| Restore {
        script: format!("*nat\n{declare}{body}{tail}COMMIT\n"),
        changes,
    })
}

/// The rules of `have` to delete (not wanted, or a duplicate: one `-D`
/// each, so duplicates go one by one) and the rules of `want` to append.
/// Order is ignored. Linear in the sizes.
fn rule_diff<'a>(want: &'a [String], have: &'a [String]) -> (Vec<&'a str>, Vec<&'a str>) {
    let mut wanted: BTreeMap<&str, bool> = want.iter().map(|l| (l.as_str(), false)).collect();
    let mut stale = Vec::new();
    for l in have {
        match wanted.get_mut(l.as_str()) {
            Some(seen @ false) => *seen = true,
            _ => stale.push(l.as_str()),
        }
    }
    let missing = want
        .iter()
        .map(String::as_str)
        .filter(|l| wanted.get(l) == Some(&false))
        .collect();
    (stale, missing)
}

/// Programming skip-NAT failed.
#[derive(Debug, thiserror::Error)]
pub enum SkipNatError {
    #[error(
        "{binary} not found: install iptables so the CNI does not masquerade traffic between raven domains"
    )]
    NotInstalled { binary: &'static str },
    #[error("could not run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
}

/// Runs `binary args`, feeding `stdin`. Spawned from the calling thread,
/// so it runs in that thread's network namespace.
async fn run(
    binary: &'static str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<Output, SkipNatError> {
    let command = format!("{binary} {}", args.join(" "));
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            SkipNatError::NotInstalled { binary }
        } else {
            SkipNatError::Spawn {
                command: command.clone(),
                source,
            }
        }
    })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .await
            .map_err(|source| SkipNatError::Spawn {
                command: command.clone(),
                source,
            })?;
    }
    child
        .wait_with_output()
        .await
        .map_err(|source| SkipNatError::Spawn { command, source })
}

fn failed(binary: &str, args: &[&str], out: &Output) -> SkipNatError {
    SkipNatError::Failed {
        command: format!("{binary} {}", args.join(" ")),
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    }
}

/// `iptables -t nat -S`: the whole `nat` table in one listing. A table
/// that does not exist yet lists as empty.
async fn list_table(family: Family) -> Result<String, SkipNatError> {
    let binary = family.iptables();
    let args = ["-w", WAIT_SECONDS, "-t", "nat", "-S"];
    let out = run(binary, &args, None).await?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let missing = ["does not exist", "Table does not exist"]
        .iter()
        .any(|m| stderr.contains(m));
    if missing {
        Ok(String::new())
    } else {
        Err(failed(binary, &args, &out))
    }
}

/// Raven's skip-NAT objects of `family` in the current namespace, from one
/// listing of the `nat` table.
pub async fn observe(family: Family) -> Result<Observed, SkipNatError> {
    let table = list_table(family).await?;
    Ok(parse_table(&table))
}

async fn restore(family: Family, script: &str) -> Result<(), SkipNatError> {
    let binary = family.restore();
    let args = ["-w", WAIT_SECONDS, "--noflush"];
    let out = run(binary, &args, Some(script)).await?;
    if !out.status.success() {
        return Err(failed(binary, &args, &out));
    }
    Ok(())
}

impl Observed {
    /// What a family's `nat` table holds of raven's once `rules` were
    /// applied without an error: the jump and the chains exactly as
    /// [`diff`] writes them (nothing at all for empty rules).
    pub fn after(rules: &Rules) -> Self {
        Self::holding(rules.layout())
    }

    /// A part of a table that holds raven's jump: `chains` as a change
    /// touches them (see [`plan`]).
    pub fn part(chains: Chains) -> Self {
        Self {
            jumps: vec![jump_line()],
            chains,
        }
    }

    /// A table holding exactly `chains` and, unless they are none, the
    /// jump.
    pub fn holding(chains: Chains) -> Self {
        Self {
            jumps: if chains.is_empty() {
                Vec::new()
            } else {
                vec![jump_line()]
            },
            chains,
        }
    }
}

/// What programming one family cost: rules changed, `iptables -S`
/// listings run, `iptables-restore` transactions run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Work {
    pub changes: usize,
    pub listings: usize,
    pub restores: usize,
}

/// Observe → diff → restore for one family, counting into `work`;
/// `read`: the family's table as already listed.
async fn sync_family(
    family: Family,
    rules: &Rules,
    read: Option<Result<Observed, SkipNatError>>,
    work: &mut Work,
) -> Result<(), SkipNatError> {
    let read = match read {
        Some(r) => r,
        None => observe(family).await,
    };
    work.listings += 1;
    let observed = match read {
        Ok(o) => o,
        // Without the binary there is nothing of raven's to remove.
        Err(SkipNatError::NotInstalled { .. }) if rules.is_empty() => return Ok(()),
        Err(e) => return Err(e),
    };
    let Some(change) = diff(rules, &observed) else {
        return Ok(());
    };
    match restore_counted(family, &change, work).await {
        Err(SkipNatError::Failed { stderr, .. }) => {
            // In doubt: read the table again and rebuild what differs.
            tracing::warn!(family = ?family, error = %stderr, "incremental skip-NAT change refused; rebuilding the chains");
            work.listings += 1;
            let observed = observe(family).await?;
            let Some(rebuild) = plan_rebuild(rules, &observed) else {
                return Ok(());
            };
            restore_counted(family, &rebuild, work).await
        }
        done => done,
    }
}

/// Runs `change`, counting the transaction and, once it succeeded, its
/// changes into `work`.
async fn restore_counted(
    family: Family,
    change: &Restore,
    work: &mut Work,
) -> Result<(), SkipNatError> {
    work.restores += 1;
    restore(family, &change.script).await?;
    work.changes += change.changes;
    Ok(())
}

/// The outcome of [`apply`]: one family failing does not stop the other.
#[derive(Debug, Default)]
pub struct SkipNatApplied {
    pub changes: usize,
    /// `iptables -S` listings and `iptables-restore` transactions run.
    pub listings: usize,
    pub restores: usize,
    pub errors: Vec<SkipNatError>,
}

impl SkipNatApplied {
    fn record(&mut self, work: Work, result: Result<(), SkipNatError>) {
        self.changes += work.changes;
        self.listings += work.listings;
        self.restores += work.restores;
        if let Err(e) = result {
            self.errors.push(e);
        }
    }
}

/// Makes the current namespace's `nat` tables hold exactly `spec`.
pub async fn apply(spec: &SkipNat) -> SkipNatApplied {
    apply_read(spec, [None, None]).await
}

/// Both families' tables, listed at the same time: what [`apply_read`]
/// plans against.
pub async fn read() -> [Result<Observed, SkipNatError>; 2] {
    let (v4, v6) = tokio::join!(observe(Family::V4), observe(Family::V6));
    [v4, v6]
}

/// Like [`apply`], against the tables as [`read`] listed them (a family
/// given `None` is listed here).
pub async fn apply_read(
    spec: &SkipNat,
    read: [Option<Result<Observed, SkipNatError>>; 2],
) -> SkipNatApplied {
    let mut out = SkipNatApplied::default();
    for (f, read) in Family::ALL.into_iter().zip(read) {
        let mut work = Work::default();
        let result = sync_family(f, spec.family(f), read, &mut work).await;
        out.record(work, result);
    }
    out
}

/// Writes `changes` (per family, planned from what the last pass applied
/// without an error, not from a listing: a family without one costs
/// nothing, a moved remote prefix one `iptables-restore` of its two rules).
/// A refused transaction (the table changed behind raven's back) falls back
/// to listing the table and planning `spec` against it.
pub async fn apply_planned(
    changes: [Option<Restore>; 2],
    spec: impl FnOnce() -> SkipNat,
) -> SkipNatApplied {
    let mut out = SkipNatApplied::default();
    let mut spec = Some(spec);
    let mut whole: Option<SkipNat> = None;
    for (f, change) in Family::ALL.into_iter().zip(changes) {
        let mut work = Work::default();
        let result = match change {
            None => Ok(()),
            Some(change) => match restore_counted(f, &change, &mut work).await {
                Err(SkipNatError::Failed { stderr, .. }) => {
                    tracing::warn!(family = ?f, error = %stderr, "skip-NAT change refused; reading the table and planning again");
                    let rules =
                        whole.get_or_insert_with(|| spec.take().map(|s| s()).unwrap_or_default());
                    sync_family(f, rules.family(f), None, &mut work).await
                }
                done => done,
            },
        };
        out.record(work, result);
    }
    out
}

/// Removes raven's jumps and chains from both families' `nat` tables.
pub async fn teardown() -> SkipNatApplied {
    apply(&SkipNat::default()).await
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use raven_model::fixtures::{self, member, net};
    use raven_model::topology::{GatewayEndpoint, GatewayView, Member, NodeView};

    use super::*;

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|s| net(s)).collect()
    }

    fn gateway(name: &str, members: Vec<Member>) -> GatewayView {
        GatewayView {
            under_nat: true,
            members,
            ..fixtures::gateway(name)
        }
    }

    /// Node `hz-2` of `gw-hangzhou`; `gw-qingdao` is the remote domain.
    fn inputs() -> NodeInputs {
        let mut hz = gateway(
            "gw-hangzhou",
            vec![
                member("hz-gw", "172.16.2.103", &["10.244.1.0/24", "fd10:1::/64"]),
                member("hz-2", "172.16.2.104", &["10.244.2.0/24"]),
            ],
        );
        hz.extra_source_cidrs = nets(&["192.168.50.0/24"]);
        NodeInputs {
            me: Some(NodeView {
                private_ip: Some(fixtures::ip("172.16.2.104")),
                ..fixtures::node_view("hz-2", Some("gw-hangzhou"))
            }),
            gateways: vec![
                hz,
                gateway(
                    "gw-qingdao",
                    vec![member(
                        "qd-gw",
                        "172.16.1.89",
                        &["10.244.3.0/24", "fd10:3::/64"],
                    )],
                ),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn sources_are_my_domains_prefixes_and_destinations_the_remote_ones_per_family() {
        let s = spec(&inputs());
        assert_eq!(
            s.v4.sources,
            nets(&[
                "10.244.1.0/24",
                "10.244.2.0/24",
                "172.16.2.103/32",
                "172.16.2.104/32",
                "192.168.50.0/24",
            ])
        );
        assert_eq!(
            s.v4.destinations,
            nets(&["10.244.3.0/24", "172.16.1.89/32"])
        );
        assert_eq!(s.v6.sources, nets(&["fd10:1::/64"]));
        assert_eq!(s.v6.destinations, nets(&["fd10:3::/64"]));
    }

    #[test]
    fn no_rules_without_a_gateway_or_without_a_remote_domain() {
        let mut n = inputs();
        n.me = None;
        assert!(spec(&n).is_empty(), "unknown node");

        let mut n = inputs();
        if let Some(me) = &mut n.me {
            me.gateway = None;
        }
        assert!(spec(&n).is_empty(), "node in no gateway");

        let mut n = inputs();
        if let Some(me) = &mut n.me {
            me.gateway = Some(fixtures::gateway_name("gw-gone"));
        }
        assert!(spec(&n).is_empty(), "gateway missing from the topology");

        let mut n = inputs();
        n.gateways.truncate(1);
        assert!(spec(&n).is_empty(), "no remote domain");
    }

    #[test]
    fn a_family_without_remote_destinations_gets_no_rules() {
        let mut n = inputs();
        n.gateways[1].members[0].subnets = nets(&["10.244.3.0/24"]);
        let s = spec(&n);
        assert!(!s.v4.is_empty());
        assert_eq!(s.v6, Rules::default(), "IPv6 sources but no IPv6 remote");
        let mut n = inputs();
        n.gateways[1].members[0].subnets = nets(&["fd10:3::/64"]);
        n.gateways[1].members[0].private_ip = "fd00::89".parse().expect("ip");
        assert_eq!(spec(&n).v4, Rules::default(), "no IPv4 remote");
    }

    #[test]
    fn remote_hosts_that_are_my_members_or_tunnel_endpoints_stay_masqueraded() {
        let mut n = inputs();
        // Overlapping private ranges across NATs: a remote member shares
        // hz-gw's address; and qd-gw's public endpoint is its node address.
        n.gateways[1]
            .members
            .push(member("qd-2", "172.16.2.103", &["10.244.4.0/24"]));
        n.gateways[1].active_tunnel = Some(GatewayEndpoint {
            public_ip: Some(fixtures::ip("172.16.1.89")),
            ..fixtures::endpoint("qd-gw", 4500)
        });
        assert_eq!(
            spec(&n).v4.destinations,
            nets(&["10.244.3.0/24", "10.244.4.0/24"])
        );
    }

    #[test]
    fn prefixes_are_normalised_deduplicated_and_aggregated() {
        let mut n = inputs();
        n.gateways[0].extra_source_cidrs = nets(&["10.244.1.7/24", "10.244.0.0/16"]);
        n.gateways[1].members[0].subnets = nets(&["10.245.3.9/24", "10.245.3.0/24"]);
        let s = spec(&n);
        assert_eq!(
            s.v4.sources,
            nets(&["10.244.0.0/16", "172.16.2.103/32", "172.16.2.104/32"])
        );
        assert_eq!(
            s.v4.destinations,
            nets(&["10.245.3.0/24", "172.16.1.89/32"])
        );
    }

    #[test]
    fn spec_does_not_depend_on_input_order() {
        let n = inputs();
        let mut r = n.clone();
        r.gateways.reverse();
        for g in &mut r.gateways {
            g.members.reverse();
            for m in &mut g.members {
                m.subnets.reverse();
            }
        }
        assert_eq!(spec(&n), spec(&r));
    }

    /// The lines below are what iptables 1.8.9 (nft and legacy) prints for
    /// these rules with `-S`: anything else would rebuild the chains on
    /// every reconcile.
    #[test]
    fn rendered_rules_match_iptables_listing_format() {
        let r = Rules {
            sources: nets(&["0.0.0.0/0", "172.16.2.103/32"]),
            destinations: nets(&["10.3.0.0/16"]),
        };
        assert_eq!(
            r.source_lines(),
            vec![
                "-A RAVEN-SKIP-NAT -j RAVEN-SKIP-NAT-DST",
                "-A RAVEN-SKIP-NAT -s 172.16.2.103/32 -j RAVEN-SKIP-NAT-DST",
            ]
        );
        assert_eq!(
            r.destination_lines(),
            vec![format!(
                "-A {} -d 10.3.0.0/16 -j ACCEPT",
                bucket_chain(bucket(&net("10.3.0.0/16")))
            )]
        );
        let v6 = Rules {
            sources: nets(&["fd10:0:0:1::5/128"]),
            destinations: nets(&["fd10:2::/64"]),
        };
        assert_eq!(
            v6.source_lines(),
            vec!["-A RAVEN-SKIP-NAT -s fd10:0:0:1::5/128 -j RAVEN-SKIP-NAT-DST"]
        );
        assert_eq!(
            v6.destination_lines(),
            vec![format!(
                "-A {} -d fd10:2::/64 -j ACCEPT",
                bucket_chain(bucket(&net("fd10:2::/64")))
            )]
        );
        assert_eq!(
            jump_line(),
            "-A POSTROUTING -m comment --comment \"raven: no CNI masquerade between raven domains\" -j RAVEN-SKIP-NAT"
        );
    }

    #[test]
    fn listings_are_parsed_into_ravens_jumps_and_chain_rules() {
        let postrouting = format!(
            "-P POSTROUTING ACCEPT\n{}\n-A POSTROUTING -j RAVEN-SKIP-NAT-DST\n\
             -A POSTROUTING -m comment --comment \"old\" -j RAVEN-SKIP-NAT\n\
             -A POSTROUTING -s 10.244.0.0/16 -j MASQUERADE\n",
            jump_line()
        );
        assert_eq!(
            parse_jumps(&postrouting),
            vec![
                jump_line(),
                "-A POSTROUTING -m comment --comment \"old\" -j RAVEN-SKIP-NAT".to_owned()
            ]
        );
        assert_eq!(
            parse_chain(
                "-N RAVEN-SKIP-NAT\n-A RAVEN-SKIP-NAT -s 10.0.0.0/8 -j RAVEN-SKIP-NAT-DST\n"
            ),
            vec!["-A RAVEN-SKIP-NAT -s 10.0.0.0/8 -j RAVEN-SKIP-NAT-DST"]
        );
    }

    fn rules() -> Rules {
        Rules {
            sources: nets(&["10.244.1.0/24", "10.244.2.0/24"]),
            destinations: nets(&["10.244.3.0/24"]),
        }
    }

    fn in_place(r: &Rules) -> Observed {
        Observed::after(r)
    }

    /// The bucket chain of the one destination of [`rules`].
    fn the_bucket() -> String {
        bucket_chain(bucket(&net("10.244.3.0/24")))
    }

    #[test]
    fn fresh_table_gets_the_chains_and_the_jump_in_one_transaction() {
        let p = diff(&rules(), &Observed::default()).expect("changes");
        assert_eq!(p.changes, 8, "three chains, four rules, the jump");
        let b = the_bucket();
        assert_eq!(
            p.script,
            format!(
                "*nat\n:{b} - [0:0]\n:RAVEN-SKIP-NAT-DST - [0:0]\n:RAVEN-SKIP-NAT - [0:0]\n\
                 -A {b} -d 10.244.3.0/24 -j ACCEPT\n\
                 -A RAVEN-SKIP-NAT-DST -j {b}\n\
                 -A RAVEN-SKIP-NAT -s 10.244.1.0/24 -j RAVEN-SKIP-NAT-DST\n\
                 -A RAVEN-SKIP-NAT -s 10.244.2.0/24 -j RAVEN-SKIP-NAT-DST\n\
                 -I POSTROUTING 1 -m comment --comment \"{COMMENT}\" -j RAVEN-SKIP-NAT\n\
                 COMMIT\n"
            )
        );
    }

    #[test]
    fn destinations_spread_over_buckets_each_jumped_to_once() {
        let r = Rules {
            sources: nets(&["10.244.1.0/24"]),
            destinations: (0..1000u32)
                .map(|k| {
                    IpNet::new(IpAddr::from([10, 100 + (k >> 8) as u8, k as u8, 0]), 24)
                        .expect("net")
                })
                .collect(),
        };
        let layout = r.layout();
        let buckets: Vec<&String> = layout
            .keys()
            .filter(|c| c.starts_with(BUCKET_PREFIX))
            .collect();
        assert_eq!(
            buckets.len(),
            usize::from(BUCKETS),
            "1,000 destinations fill every bucket"
        );
        let largest = buckets
            .iter()
            .map(|b| layout[*b].len())
            .max()
            .unwrap_or_default();
        assert!(
            largest < 40,
            "no bucket holds much more than its share (~16): {largest}"
        );
        assert_eq!(layout[DST_CHAIN].len(), usize::from(BUCKETS));
        assert!(buckets.iter().all(|b| is_ravens_chain(b)));
        assert!(!is_ravens_chain("RAVEN-SKIP-NAT-B1") && !is_ravens_chain("KUBE-POSTROUTING"));
    }

    #[test]
    fn matching_table_plans_nothing() {
        assert_eq!(diff(&rules(), &in_place(&rules())), None);
        assert_eq!(diff(&Rules::default(), &Observed::default()), None);
    }

    #[test]
    fn one_changed_prefix_writes_only_its_two_rules() {
        // 3,000 destinations, one of which moves: one -D and one -A.
        let many = |moved: Option<&str>| Rules {
            sources: nets(&["10.244.1.0/24"]),
            destinations: (0..3000u32)
                .map(|k| match moved {
                    Some(m) if k == 1500 => net(m),
                    _ => IpNet::new(IpAddr::from([10, 100 + (k >> 8) as u8, k as u8, 0]), 24)
                        .expect("net"),
                })
                .collect(),
        };
        let before = many(None);
        let after = many(Some("10.250.0.0/24"));
        let p = diff(&after, &in_place(&before)).expect("changes");
        assert_eq!(p.changes, 2);
        let (gone, new) = (net("10.105.220.0/24"), net("10.250.0.0/24"));
        let mut lines = [
            destination_line(&gone).replacen("-A", "-D", 1),
            destination_line(&new),
        ];
        if bucket(&new) < bucket(&gone) {
            lines.reverse();
        }
        assert_eq!(p.script, format!("*nat\n{}\nCOMMIT\n", lines.join("\n")));
        // The rebuild fallback redeclares the buckets that differ.
        let r = plan_rebuild(&after, &in_place(&before)).expect("changes");
        assert_eq!(r.changes, if bucket(&new) == bucket(&gone) { 1 } else { 2 });
        assert!(
            r.script.starts_with(&format!(
                "*nat\n:{} - [0:0]\n",
                bucket_chain(bucket(&gone).min(bucket(&new)))
            )),
            "{}",
            r.script
        );
        assert!(!r.script.contains(":RAVEN-SKIP-NAT -"), "{}", r.script);
        assert!(!r.script.contains(":RAVEN-SKIP-NAT-DST -"), "{}", r.script);
    }

    #[test]
    fn rule_order_is_ignored_and_duplicates_and_foreign_rules_are_deleted_one_by_one() {
        let mut have = in_place(&rules());
        if let Some(s) = have.chains.get_mut(CHAIN) {
            s.reverse();
        }
        assert_eq!(diff(&rules(), &have), None, "order carries no meaning");
        let dup = "-A RAVEN-SKIP-NAT -s 10.244.1.0/24 -j RAVEN-SKIP-NAT-DST".to_owned();
        let foreign = "-A RAVEN-SKIP-NAT-DST -d 192.0.2.0/24 -j DROP".to_owned();
        if let Some(s) = have.chains.get_mut(CHAIN) {
            s.push(dup);
        }
        if let Some(d) = have.chains.get_mut(DST_CHAIN) {
            d.insert(0, foreign);
        }
        let p = diff(&rules(), &have).expect("changes");
        assert_eq!(p.changes, 2);
        assert_eq!(
            p.script,
            "*nat\n-D RAVEN-SKIP-NAT-DST -d 192.0.2.0/24 -j DROP\n\
             -D RAVEN-SKIP-NAT -s 10.244.1.0/24 -j RAVEN-SKIP-NAT-DST\nCOMMIT\n"
        );
    }

    #[test]
    fn a_whole_table_listing_yields_ravens_chains_and_jumps_only() {
        let listing = format!(
            "-P PREROUTING ACCEPT\n-P POSTROUTING ACCEPT\n-N KUBE-POSTROUTING\n\
             -N RAVEN-SKIP-NAT\n-N RAVEN-SKIP-NAT-DST\n{}\n\
             -A POSTROUTING -j MASQUERADE\n\
             -A KUBE-POSTROUTING -j RETURN\n\
             -A RAVEN-SKIP-NAT -s 10.244.1.0/24 -j RAVEN-SKIP-NAT-DST\n",
            jump_line()
        );
        let o = parse_table(&listing);
        assert_eq!(o.jumps, vec![jump_line()]);
        assert_eq!(
            o.chains.get(CHAIN),
            Some(&vec![
                "-A RAVEN-SKIP-NAT -s 10.244.1.0/24 -j RAVEN-SKIP-NAT-DST".to_owned()
            ])
        );
        assert_eq!(o.chains.get(DST_CHAIN), Some(&vec![]), "declared, empty");
        assert_eq!(o.chains.len(), 2, "no chain of another's");
        assert_eq!(parse_table("-P POSTROUTING ACCEPT\n"), Observed::default());
    }

    #[test]
    fn missing_jump_is_inserted_first_and_stale_or_duplicate_jumps_removed() {
        let mut have = in_place(&rules());
        have.jumps.clear();
        let p = diff(&rules(), &have).expect("changes");
        assert_eq!(p.changes, 1);
        assert_eq!(
            p.script,
            format!(
                "*nat\n-I POSTROUTING 1 -m comment --comment \"{COMMENT}\" -j RAVEN-SKIP-NAT\nCOMMIT\n"
            )
        );

        let stale = "-A POSTROUTING -m comment --comment \"old\" -j RAVEN-SKIP-NAT".to_owned();
        have.jumps = vec![stale, jump_line(), jump_line()];
        let p = diff(&rules(), &have).expect("changes");
        assert_eq!(p.changes, 2);
        assert_eq!(
            p.script,
            format!(
                "*nat\n-D POSTROUTING -m comment --comment \"old\" -j RAVEN-SKIP-NAT\n\
                 -D POSTROUTING -m comment --comment \"{COMMENT}\" -j RAVEN-SKIP-NAT\nCOMMIT\n"
            ),
            "one exact jump stays where it is"
        );
    }

    #[test]
    fn empty_rules_remove_the_jumps_then_the_chains() {
        let p = diff(&Rules::default(), &in_place(&rules())).expect("changes");
        assert_eq!(p.changes, 8, "the jump, three chains and their four rules");
        let b = the_bucket();
        assert_eq!(
            p.script,
            format!(
                "*nat\n-D POSTROUTING -m comment --comment \"{COMMENT}\" -j RAVEN-SKIP-NAT\n\
                 -F RAVEN-SKIP-NAT\n-F RAVEN-SKIP-NAT-DST\n-F {b}\n\
                 -X RAVEN-SKIP-NAT\n-X RAVEN-SKIP-NAT-DST\n-X {b}\nCOMMIT\n"
            )
        );
        // Only what exists is removed (-X of a missing chain fails the
        // whole transaction).
        let leftover = Observed {
            chains: [(DST_CHAIN.to_owned(), vec![])].into(),
            ..Observed::default()
        };
        let p = diff(&Rules::default(), &leftover).expect("changes");
        assert_eq!(
            p.script,
            "*nat\n-F RAVEN-SKIP-NAT-DST\n-X RAVEN-SKIP-NAT-DST\nCOMMIT\n"
        );
    }

    #[tokio::test]
    async fn a_missing_binary_is_reported_by_name() {
        let e = run("raven-no-such-iptables", &["-S"], None)
            .await
            .expect_err("not installed");
        assert!(matches!(e, SkipNatError::NotInstalled { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("raven-no-such-iptables not found"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_failing_command_is_reported_with_its_arguments_and_stderr() {
        let out = run("sh", &["-c", "echo boom >&2; exit 3"], None)
            .await
            .expect("ran");
        let e = failed("sh", &["-c", "x"], &out);
        let text = e.to_string();
        assert!(
            text.contains("`sh -c x` failed") && text.contains("boom"),
            "{text}"
        );
    }
}
