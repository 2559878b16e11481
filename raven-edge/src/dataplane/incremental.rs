//! The desired state of the last clean pass, kept with the indexes that let
//! a new topology patch it: a change costs what changed, not the table.
//!
//! [`Index::build`] computes [`desired`](super::model::desired) and
//! [`spec`](skipnat::spec) from scratch (a resync does) and remembers, per
//! remote prefix, which gateways hold it, how often each address is a
//! tunnel endpoint, and each remote gateway's skip-NAT destinations.
//! [`Index::update`] takes the next topology, finds the gateways that
//! differ (one comparison per gateway, no allocation for the rest), and
//! recomputes only their prefixes' routes and their skip-NAT rules —
//! returning the kernel operations and the `iptables-restore` scripts that
//! turn the old state into the new one, exactly what
//! [`diff`](super::model::diff) of the two whole states and
//! [`skipnat::diff`] of the two whole rule sets would write (the property
//! tests below prove it over random one-node changes).
//!
//! The other domains come as gateways or, in the compact member view, as
//! prefix sets ([`DomainPrefixes`]); both are domains of the index, keyed
//! by gateway name, and a change of one prefix set patches its routes and
//! skip-NAT rules as a change of one gateway does. A domain that changes
//! form (a member becoming a tunnel candidate gets the full view) is a
//! change of that domain too.
//!
//! What the node's role decides for every remote route — the node itself,
//! the settings, the MTU, the tunnel devices, local failover, its domain's
//! active gateway node — is compared first: when it changed, every route
//! may change, and `update` returns `None` (the caller rebuilds; that is
//! O(table) because the change is).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use raven_model::GatewayName;
use raven_model::topology::{DomainPrefixes, GatewayView};

use super::model::{
    self, Desired, Excluded, LocalPart, NodeInputs, Op, Route, RouteDev, State, TABLE_REMOTE, diff,
};
use super::skipnat::{self, Chains, Family, Observed, Restore, Rules, SkipNat};

/// What [`Index::update`] writes: the kernel operations (in the planner's
/// order) and, per family, the skip-NAT transaction (`None`: no change).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    pub ops: Vec<Op>,
    pub nat: [Option<Restore>; 2],
}

/// Another domain as the node sees it: a gateway, or (compact member
/// view) its prefix set.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Domain {
    Gateway(Box<GatewayView>),
    Prefixes(DomainPrefixes),
}

impl Domain {
    fn name(&self) -> &GatewayName {
        match self {
            Domain::Gateway(g) => &g.name,
            Domain::Prefixes(d) => &d.gateway,
        }
    }

    /// The public addresses of its tunnel endpoints (with repeats, as
    /// [`Excluded::of`] reads them).
    fn endpoint_ips(&self) -> Vec<IpAddr> {
        match self {
            Domain::Gateway(g) => model::endpoint_ips(g).collect(),
            Domain::Prefixes(d) => d.endpoint_addresses.clone(),
        }
    }

    fn prefixes(&self) -> Vec<IpNet> {
        match self {
            Domain::Gateway(g) => g.prefixes().collect(),
            Domain::Prefixes(d) => d.prefixes.clone(),
        }
    }

    fn destinations(&self, excluded: &Excluded) -> Vec<IpNet> {
        match self {
            Domain::Gateway(g) => skipnat::gateway_destinations(g, excluded),
            Domain::Prefixes(d) => skipnat::domain_destinations(d, excluded),
        }
    }

    /// Whether this is gateway `g`, as it is.
    fn is_gateway(&self, g: &GatewayView) -> bool {
        matches!(self, Domain::Gateway(x) if **x == *g)
    }

    fn is_prefixes(&self, d: &DomainPrefixes) -> bool {
        matches!(self, Domain::Prefixes(x) if x == d)
    }
}

/// The domains of `inputs` (gateways, then prefix sets).
fn domains(inputs: &NodeInputs) -> impl Iterator<Item = Domain> + '_ {
    inputs
        .gateways
        .iter()
        .map(|g| Domain::Gateway(Box::new(g.clone())))
        .chain(inputs.remote.iter().cloned().map(Domain::Prefixes))
}

/// One family's skip-NAT rules, held as counts so that gateways sharing a
/// destination can come and go.
#[derive(Debug, Clone, Default)]
struct NatFamily {
    sources: Vec<IpNet>,
    /// Destination → how many remote gateways ask for it.
    destinations: BTreeMap<IpNet, u32>,
    /// Destinations per bucket ([`skipnat::bucket`]).
    buckets: Vec<u32>,
}

impl NatFamily {
    fn rules(&self) -> Rules {
        if self.sources.is_empty() || self.destinations.is_empty() {
            return Rules::default();
        }
        Rules {
            sources: self.sources.clone(),
            destinations: self.destinations.keys().copied().collect(),
        }
    }

    fn effective(&self) -> bool {
        !self.sources.is_empty() && !self.destinations.is_empty()
    }
}

/// The desired state of a node and what patching it needs.
#[derive(Debug, Clone)]
pub struct Index {
    /// The inputs besides the domains: a change there rebuilds.
    context: NodeInputs,
    /// Domains by gateway name (all of them, mine too). `None`: the
    /// topology names a gateway twice (in either form), so it is never
    /// patched.
    gateways: Option<BTreeMap<GatewayName, Domain>>,
    /// My gateway's name; `None` when the node wants nothing.
    mine: Option<GatewayName>,
    local: Option<LocalPart>,
    desired: Desired,
    /// Each prefix of a remote gateway → the gateways holding it (one entry
    /// per occurrence).
    owners: BTreeMap<IpNet, Vec<GatewayName>>,
    /// Tunnel endpoints' public addresses → how many endpoints name them.
    endpoints: BTreeMap<IpAddr, u32>,
    /// My domain's members' addresses and prefixes.
    own: BTreeSet<IpAddr>,
    mine_prefixes: BTreeSet<IpNet>,
    /// Each remote gateway's skip-NAT destinations.
    nat_of: BTreeMap<GatewayName, Vec<IpNet>>,
    nat: [NatFamily; 2],
}

/// Sets the skip-NAT sources of `nat` to my domain `my_gw`'s, per family.
fn set_sources(nat: &mut [NatFamily; 2], my_gw: &GatewayView) {
    let sources = skipnat::sources(my_gw);
    for f in Family::ALL {
        nat[family_index(f)].sources = sources
            .iter()
            .filter(|s| Family::of(s) == f)
            .copied()
            .collect();
    }
}

fn family_index(f: Family) -> usize {
    match f {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

fn count<K: Ord>(map: &mut BTreeMap<K, u32>, key: K, up: bool) -> bool {
    if up {
        let c = map.entry(key).or_insert(0);
        *c += 1;
        *c == 1
    } else {
        match map.get_mut(&key) {
            Some(c) if *c > 1 => {
                *c -= 1;
                false
            }
            Some(_) => {
                map.remove(&key);
                true
            }
            None => false,
        }
    }
}

impl Index {
    /// The desired state of `inputs`, computed in full.
    pub fn build(inputs: &NodeInputs) -> Self {
        // Built once: the later passes borrow them.
        let all: Vec<Domain> = domains(inputs).collect();
        let mut gateways = BTreeMap::new();
        let mut unique = true;
        for d in &all {
            unique &= gateways.insert(d.name().clone(), d.clone()).is_none();
        }
        let context = NodeInputs {
            gateways: Vec::new(),
            remote: Vec::new(),
            ..inputs.clone()
        };
        let desired = model::desired(inputs);
        let mut index = Self {
            context,
            gateways: unique.then_some(gateways),
            mine: None,
            local: None,
            desired,
            owners: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            own: BTreeSet::new(),
            mine_prefixes: BTreeSet::new(),
            nat_of: BTreeMap::new(),
            nat: Default::default(),
        };
        for f in &mut index.nat {
            f.buckets = vec![0; usize::from(skipnat::BUCKETS)];
        }
        let Some((me, private, my_gw)) = model::mine(inputs) else {
            // Nothing to route: never patched, rebuilt on every change;
            // only the skip-NAT rules (which need no address of the node's
            // own) are kept.
            index.gateways = None;
            let spec = skipnat::spec(inputs);
            for f in Family::ALL {
                let rules = spec.family(f);
                let fam = &mut index.nat[family_index(f)];
                fam.sources.clone_from(&rules.sources);
                fam.destinations = rules.destinations.iter().map(|d| (*d, 1)).collect();
            }
            return index;
        };
        index.mine = Some(my_gw.name.clone());
        index.local = Some(model::local_part(inputs, me, private, my_gw));
        index.own = my_gw.members.iter().map(|m| m.private_ip).collect();
        index.mine_prefixes = my_gw.prefixes().collect();
        for d in &all {
            for ip in d.endpoint_ips() {
                count(&mut index.endpoints, ip, true);
            }
            if *d.name() != my_gw.name {
                for p in d.prefixes() {
                    index.owners.entry(p).or_default().push(d.name().clone());
                }
            }
        }
        let excluded = index.excluded();
        for d in all.iter().filter(|d| *d.name() != my_gw.name) {
            let dsts = d.destinations(&excluded);
            index.count_destinations(&dsts, true, &mut Vec::new());
            index.nat_of.insert(d.name().clone(), dsts);
        }
        set_sources(&mut index.nat, my_gw);
        index
    }

    /// The desired state.
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// The skip-NAT rules (materialized: linear in the rules).
    pub fn skip_nat(&self) -> SkipNat {
        SkipNat {
            v4: self.nat[0].rules(),
            v6: self.nat[1].rules(),
        }
    }

    fn excluded(&self) -> Excluded {
        Excluded {
            own: self.own.clone(),
            endpoints: self.endpoints.keys().copied().collect(),
        }
    }

    fn excludes(&self, p: &IpNet) -> bool {
        p.prefix_len() == p.max_prefix_len()
            && (self.own.contains(&p.addr()) || self.endpoints.contains_key(&p.addr()))
    }

    /// Counts `dsts` in (`up`) or out, noting each destination that
    /// appears or disappears in `moved` (with `true`: appeared).
    fn count_destinations(&mut self, dsts: &[IpNet], up: bool, moved: &mut Vec<(IpNet, bool)>) {
        for d in dsts {
            let fam = &mut self.nat[family_index(Family::of(d))];
            if count(&mut fam.destinations, *d, up) {
                let b = &mut fam.buckets[usize::from(skipnat::bucket(d))];
                if up {
                    *b += 1;
                } else {
                    *b -= 1;
                }
                moved.push((*d, up));
            }
        }
    }

    /// Whether `p` goes to the direct-path device (on the gateway): it is a
    /// prefix of a gateway (not of a prefix set) reached directly.
    fn direct(&self, p: &IpNet) -> bool {
        let inputs = &self.context;
        let is_gateway = |g: &GatewayName| {
            self.gateways
                .as_ref()
                .is_some_and(|gs| matches!(gs.get(g), Some(Domain::Gateway(_))))
        };
        let by_owner = self.owners.get(p).is_some_and(|o| {
            o.iter()
                .any(|g| model::is_direct(inputs, g) && is_gateway(g))
        });
        by_owner
            || self
                .mine
                .as_ref()
                .is_some_and(|m| model::is_direct(inputs, m) && self.mine_prefixes.contains(p))
    }

    /// The route remote prefix `p` wants now.
    fn remote_route(&self, p: &IpNet) -> Option<Route> {
        let remote = self.local.as_ref()?.remote;
        if !self.owners.contains_key(p) || self.excludes(p) {
            return None;
        }
        remote.route(*p, self.direct(p))
    }

    /// Whether `new` differs from the inputs of this index only in its
    /// domains.
    fn same_context(&self, new: &NodeInputs) -> bool {
        let c = &self.context;
        c.me == new.me
            && c.settings == new.settings
            && c.active_override == new.active_override
            && c.underlay_mtu == new.underlay_mtu
            && c.tunnel_dev == new.tunnel_dev
            && c.tunnel_up == new.tunnel_up
            && c.direct == new.direct
    }

    /// Patches this index to `new` and returns what the kernel needs to
    /// get there; `None` when the change is not local to some gateways (the
    /// node, its settings, its domain's active gateway node changed, or a
    /// gateway name repeats) — the caller then builds anew. On `None` the
    /// index is left as it was.
    pub fn update(&mut self, new: &NodeInputs) -> Option<Delta> {
        if !self.same_context(new) {
            return None;
        }
        let gateways = self.gateways.as_ref()?;
        let mine = self.mine.clone()?;
        // The domains that differ: (name, new version or removed).
        let mut names = HashSet::with_capacity(new.gateways.len() + new.remote.len());
        let mut changed: Vec<(GatewayName, Option<Domain>)> = Vec::new();
        for g in &new.gateways {
            if !names.insert(&g.name) {
                return None;
            }
            if !gateways.get(&g.name).is_some_and(|d| d.is_gateway(g)) {
                changed.push((g.name.clone(), Some(Domain::Gateway(Box::new(g.clone())))));
            }
        }
        for d in &new.remote {
            if !names.insert(&d.gateway) {
                return None;
            }
            if !gateways.get(&d.gateway).is_some_and(|x| x.is_prefixes(d)) {
                changed.push((d.gateway.clone(), Some(Domain::Prefixes(d.clone()))));
            }
        }
        if names.len() != gateways.len() || changed.iter().any(|(n, _)| !gateways.contains_key(n)) {
            for name in gateways.keys().filter(|n| !names.contains(n)) {
                changed.push((name.clone(), None));
            }
        }
        if changed.is_empty() {
            return Some(Delta::default());
        }
        // My own domain: its local part, when the way remote prefixes are
        // routed stays the same.
        let mut new_local = None;
        if let Some((_, g)) = changed.iter().find(|(n, _)| *n == mine) {
            let Some(Domain::Gateway(g)) = g else {
                return None;
            };
            let me = new.me.as_ref()?;
            let private = me.private_ip.and_then(|ip| match ip {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            })?;
            let local = model::local_part(new, me, private, g);
            if Some(local.remote) != self.local.as_ref().map(|l| l.remote) {
                return None;
            }
            new_local = Some(local);
        }
        Some(self.patch(&mine, changed, new_local))
    }

    fn patch(
        &mut self,
        mine: &GatewayName,
        changed: Vec<(GatewayName, Option<Domain>)>,
        new_local: Option<LocalPart>,
    ) -> Delta {
        let mut old_part = State::default();
        let mut new_part = State::default();
        let mut touched: BTreeSet<IpNet> = BTreeSet::new();
        let mut regate: BTreeSet<GatewayName> = BTreeSet::new();
        let mut hosts: BTreeSet<IpAddr> = BTreeSet::new();
        let old_sources: [Vec<IpNet>; 2] =
            [self.nat[0].sources.clone(), self.nat[1].sources.clone()];
        let was: [bool; 2] = [self.nat[0].effective(), self.nat[1].effective()];
        let Some(gateways) = self.gateways.as_mut() else {
            return Delta::default();
        };
        let mut removed_gateways = Vec::new();
        for (name, g) in changed {
            let old = match &g {
                Some(g) => gateways.insert(name.clone(), g.clone()),
                None => gateways.remove(&name),
            };
            for ip in old.iter().flat_map(Domain::endpoint_ips) {
                if count(&mut self.endpoints, ip, false) {
                    hosts.insert(ip);
                }
            }
            for ip in g.iter().flat_map(Domain::endpoint_ips) {
                if count(&mut self.endpoints, ip, true) {
                    hosts.insert(ip);
                }
            }
            if name == *mine {
                let Some(Domain::Gateway(g)) = &g else {
                    continue;
                };
                let own: BTreeSet<IpAddr> = g.members.iter().map(|m| m.private_ip).collect();
                hosts.extend(own.symmetric_difference(&self.own).copied());
                self.own = own;
                let prefixes: BTreeSet<IpNet> = g.prefixes().collect();
                touched.extend(prefixes.symmetric_difference(&self.mine_prefixes).copied());
                self.mine_prefixes = prefixes;
                set_sources(&mut self.nat, g);
                continue;
            }
            for p in old.iter().flat_map(Domain::prefixes) {
                if let Some(o) = self.owners.get_mut(&p) {
                    if let Some(i) = o.iter().position(|n| *n == name) {
                        o.swap_remove(i);
                    }
                    if o.is_empty() {
                        self.owners.remove(&p);
                    }
                }
                touched.insert(p);
            }
            for p in g.iter().flat_map(Domain::prefixes) {
                self.owners.entry(p).or_default().push(name.clone());
                touched.insert(p);
            }
            if g.is_some() {
                regate.insert(name);
            } else {
                removed_gateways.push(name);
            }
        }
        // Host prefixes whose exclusion may have changed, and the gateways
        // holding them (their skip-NAT destinations).
        for ip in hosts {
            let p = IpNet::from(ip);
            if let Some(o) = self.owners.get(&p) {
                regate.extend(o.iter().cloned());
            }
            touched.insert(p);
        }
        // The local part.
        if let Some(local) = new_local {
            if let Some(old) = self.local.take() {
                self.swap_local(&old.state, &local.state);
                old_part = old.state;
            }
            new_part = local.state.clone();
            self.desired.warnings.clone_from(&local.warnings);
            self.local = Some(local);
        } else if let Some(local) = &self.local {
            // Unchanged: both sides hold it, so the plan leaves it alone.
            old_part = local.state.clone();
            new_part = local.state.clone();
        }
        // Remote routes of the touched prefixes.
        for p in &touched {
            let had: Vec<Route> = self
                .desired
                .state
                .routes
                .range(slot_start(*p)..)
                .take_while(|r| r.table == TABLE_REMOTE && r.dst == *p)
                .cloned()
                .collect();
            for r in had {
                self.desired.state.routes.remove(&r);
                old_part.routes.insert(r);
            }
            if let Some(r) = self.remote_route(p) {
                self.desired.state.routes.insert(r.clone());
                new_part.routes.insert(r);
            }
        }
        let ops = diff(&new_part, &old_part);
        // Skip-NAT.
        let mut moved = Vec::new();
        for name in removed_gateways {
            if let Some(old) = self.nat_of.remove(&name) {
                self.count_destinations(&old, false, &mut moved);
            }
        }
        let excluded = self.excluded();
        for name in regate {
            let Some(dsts) = self
                .gateways
                .as_ref()
                .and_then(|gs| gs.get(&name))
                .map(|d| d.destinations(&excluded))
            else {
                continue;
            };
            let old = self.nat_of.insert(name, dsts.clone()).unwrap_or_default();
            if old != dsts {
                self.count_destinations(&old, false, &mut moved);
                self.count_destinations(&dsts, true, &mut moved);
            }
        }
        let nat = Family::ALL.map(|f| self.nat_change(f, was, &old_sources, &moved));
        Delta { ops, nat }
    }

    /// Replaces the local part `old` by `new` in the desired state.
    fn swap_local(&mut self, old: &State, new: &State) {
        let s = &mut self.desired.state;
        for r in &old.routes {
            s.routes.remove(r);
        }
        s.routes.extend(new.routes.iter().cloned());
        s.link.clone_from(&new.link);
        s.link_up = new.link_up;
        s.addresses.clone_from(&new.addresses);
        s.fdb.clone_from(&new.fdb);
        s.neighbours.clone_from(&new.neighbours);
        s.rules.clone_from(&new.rules);
    }

    /// The skip-NAT transaction of family `f` after the destinations in
    /// `moved` appeared or disappeared (net of both, per destination) and
    /// the sources went from `old_sources`.
    fn nat_change(
        &self,
        f: Family,
        was: [bool; 2],
        old_sources: &[Vec<IpNet>; 2],
        moved: &[(IpNet, bool)],
    ) -> Option<Restore> {
        let i = family_index(f);
        let fam = &self.nat[i];
        // Net change per destination (one may go and come back).
        let mut net: BTreeMap<IpNet, i32> = BTreeMap::new();
        for (d, up) in moved.iter().filter(|(d, _)| Family::of(d) == f) {
            *net.entry(*d).or_insert(0) += if *up { 1 } else { -1 };
        }
        net.retain(|_, n| *n != 0);
        let sources_changed = fam.sources != old_sources[i];
        if net.is_empty() && !sources_changed {
            return None;
        }
        if !(was[i] && fam.effective()) {
            // The rules appear or vanish (or were and stay none): the whole
            // family, which is rare.
            let old = if was[i] {
                let mut dsts: BTreeSet<IpNet> = fam.destinations.keys().copied().collect();
                for (d, n) in &net {
                    if *n > 0 {
                        dsts.remove(d);
                    } else {
                        dsts.insert(*d);
                    }
                }
                Rules {
                    sources: old_sources[i].clone(),
                    destinations: dsts.into_iter().collect(),
                }
                .layout()
            } else {
                Chains::new()
            };
            return skipnat::plan(&fam.rules().layout(), &Observed::holding(old), false);
        }
        // Both before and after: the touched buckets, the jumps to buckets
        // that appear or vanish, and the sources when they changed.
        let mut want = Chains::new();
        let mut have = Chains::new();
        for (d, n) in &net {
            let b = skipnat::bucket(d);
            let chain = skipnat::bucket_chain(b);
            let now = fam.buckets[usize::from(b)];
            // Bucket sizes before: now minus what was added plus what went.
            let before = i64::from(now)
                - net
                    .iter()
                    .filter(|(x, _)| skipnat::bucket(x) == b)
                    .map(|(_, n)| i64::from(*n))
                    .sum::<i64>();
            let line = skipnat::destination_line(d);
            if now > 0 {
                let lines = want.entry(chain.clone()).or_default();
                if *n > 0 {
                    lines.push(line.clone());
                }
            }
            if before > 0 {
                let lines = have.entry(chain).or_default();
                if *n < 0 {
                    lines.push(line);
                }
            }
            let jump = skipnat::bucket_jump_line(b);
            if (now > 0) != (before > 0) {
                let side = if now > 0 { &mut want } else { &mut have };
                let lines = side.entry(skipnat::DST_CHAIN.to_owned()).or_default();
                if !lines.contains(&jump) {
                    lines.push(jump);
                }
            }
        }
        if want.contains_key(skipnat::DST_CHAIN) || have.contains_key(skipnat::DST_CHAIN) {
            want.entry(skipnat::DST_CHAIN.to_owned()).or_default();
            have.entry(skipnat::DST_CHAIN.to_owned()).or_default();
        }
        if sources_changed {
            want.insert(skipnat::CHAIN.to_owned(), fam.rules().source_lines());
            have.insert(
                skipnat::CHAIN.to_owned(),
                old_sources[i].iter().map(skipnat::source_line).collect(),
            );
        }
        skipnat::plan(&want, &Observed::part(have), false)
    }
}

/// The first route of the slot (`TABLE_REMOTE`, `dst`) in route order.
fn slot_start(dst: IpNet) -> Route {
    Route {
        table: TABLE_REMOTE,
        dst,
        dev: RouteDev::Vxlan,
        via: None,
        mtu: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use raven_model::topology::Member;

    use crate::dataplane::model::tests::cluster;

    /// What an `iptables-restore --noflush` script does to a table, as
    /// iptables would: a rule deleted that is not there, a rule appended to
    /// a missing chain, a chain removed while it holds rules or one
    /// declared twice fails the transaction.
    fn restore(table: &Observed, script: &str) -> Result<Observed, String> {
        let mut t = table.clone();
        let mut lines = script.lines();
        if lines.next() != Some("*nat") {
            return Err("no *nat".into());
        }
        for l in lines {
            if l == "COMMIT" {
                return Ok(t);
            }
            if let Some(decl) = l.strip_prefix(':') {
                let chain = decl.split_whitespace().next().unwrap_or_default();
                t.chains.insert(chain.to_owned(), Vec::new());
                continue;
            }
            let (verb, rest) = l.split_once(' ').ok_or(format!("bad line {l}"))?;
            let (chain, _) = rest.split_once(' ').unwrap_or((rest, ""));
            match verb {
                "-A" => t
                    .chains
                    .get_mut(chain)
                    .ok_or(format!("no chain {chain}: {l}"))?
                    .push(l.to_owned()),
                "-D" if chain == "POSTROUTING" => {
                    let rule = format!("-A {rest}");
                    let i = t
                        .jumps
                        .iter()
                        .position(|j| *j == rule)
                        .ok_or(format!("no such jump: {l}"))?;
                    t.jumps.remove(i);
                }
                "-D" => {
                    let rule = format!("-A {rest}");
                    let c = t.chains.get_mut(chain).ok_or(format!("no chain: {l}"))?;
                    let i = c
                        .iter()
                        .position(|x| *x == rule)
                        .ok_or(format!("no such rule: {l}"))?;
                    c.remove(i);
                }
                "-I" => {
                    let jump = rest
                        .strip_prefix("POSTROUTING 1")
                        .ok_or(format!("bad insert {l}"))?;
                    t.jumps.insert(0, format!("-A POSTROUTING{jump}"));
                }
                "-F" => t
                    .chains
                    .get_mut(chain)
                    .ok_or(format!("no chain: {l}"))?
                    .clear(),
                "-X" => {
                    let c = t.chains.remove(chain).ok_or(format!("no chain: {l}"))?;
                    if !c.is_empty() {
                        return Err(format!("chain not empty: {l}"));
                    }
                }
                _ => return Err(format!("unknown {l}")),
            }
        }
        Err("no COMMIT".into())
    }

    /// The rules as sets: their order carries no meaning.
    fn normalized(mut t: Observed) -> Observed {
        for lines in t.chains.values_mut() {
            lines.sort();
        }
        t
    }

    #[derive(Debug, Clone)]
    enum Change {
        Subnet(usize, usize, u8),
        Address(usize, usize, u8),
        Ready(usize, usize),
        Remove(usize, usize),
        Add(usize, u8),
        Endpoint(usize, Option<u8>),
        Active(usize, usize),
        DropGateway(usize),
        /// The node's view changes form: compact member ↔ full (a member
        /// becoming a tunnel candidate or back).
        Role,
    }

    fn change() -> impl Strategy<Value = Change> {
        prop_oneof![
            (0usize..4, 0usize..4, 0u8..40).prop_map(|(g, m, s)| Change::Subnet(g, m, s)),
            (0usize..4, 0usize..4, 1u8..8).prop_map(|(g, m, h)| Change::Address(g, m, h)),
            (0usize..4, 0usize..4).prop_map(|(g, m)| Change::Ready(g, m)),
            (0usize..4, 0usize..4).prop_map(|(g, m)| Change::Remove(g, m)),
            (0usize..4, 1u8..8).prop_map(|(g, h)| Change::Add(g, h)),
            (0usize..4, proptest::option::of(1u8..8)).prop_map(|(g, h)| Change::Endpoint(g, h)),
            (0usize..4, 0usize..4).prop_map(|(g, m)| Change::Active(g, m)),
            (1usize..4).prop_map(Change::DropGateway),
            Just(Change::Role),
        ]
    }

    fn host(h: u8) -> IpAddr {
        IpAddr::from([192, 168, 1, h])
    }

    fn subnet(s: u8) -> IpNet {
        if s % 5 == 4 {
            IpNet::new(IpAddr::from([0xfd10, u16::from(s), 0, 0, 0, 0, 0, 0]), 64)
        } else {
            IpNet::new(IpAddr::from([10, s, 0, 0]), 24)
        }
        .unwrap_or_default()
    }

    /// One node (or one gateway's endpoint) changes in `inputs`.
    fn apply(inputs: &mut NodeInputs, c: &Change) {
        let gs = &mut inputs.gateways;
        let n = gs.len();
        let pick = |g: usize| g % n;
        match *c {
            Change::Subnet(g, m, s) => {
                let g = &mut gs[pick(g)];
                let k = m % g.members.len().max(1);
                if let Some(m) = g.members.get_mut(k) {
                    m.subnets = vec![subnet(s)];
                }
            }
            Change::Address(g, m, h) => {
                let g = &mut gs[pick(g)];
                let k = m % g.members.len().max(1);
                if let Some(m) = g.members.get_mut(k) {
                    m.private_ip = host(h);
                }
            }
            Change::Ready(g, m) => {
                let g = &mut gs[pick(g)];
                let k = m % g.members.len().max(1);
                if let Some(m) = g.members.get_mut(k) {
                    m.ready = !m.ready;
                }
            }
            Change::Remove(g, m) => {
                let g = &mut gs[pick(g)];
                if !g.members.is_empty() {
                    let k = m % g.members.len();
                    g.members.remove(k);
                }
            }
            Change::Add(g, h) => {
                let g = &mut gs[pick(g)];
                let k = g.members.len();
                g.members.push(Member {
                    node: raven_model::NodeName::new(format!("{}-new{k}", g.name))
                        .unwrap_or_else(|_| unreachable!()),
                    private_ip: host(h),
                    subnets: vec![subnet(h + 30)],
                    ready: true,
                });
            }
            Change::Endpoint(g, h) => {
                if let Some(e) = &mut gs[pick(g)].active_tunnel {
                    e.public_ip = h.map(host);
                }
            }
            Change::Active(g, m) => {
                let g = &mut gs[pick(g)];
                let k = m % g.members.len().max(1);
                if let (Some(e), Some(m)) = (&mut g.active_tunnel, g.members.get(k)) {
                    e.node = m.node.clone();
                }
            }
            Change::DropGateway(g) => {
                if n > 1 {
                    gs.remove(1 + (g - 1) % (n - 1));
                }
            }
            Change::Role => {}
        }
    }

    /// A cluster with endpoints that have public addresses (some equal to
    /// member addresses) and, on gateways, a direct path; the node mostly
    /// has its address (without, it wants nothing and is never patched).
    fn topology() -> impl Strategy<Value = NodeInputs> {
        (
            cluster(),
            proptest::collection::vec(proptest::option::of(1u8..8), 4),
            any::<bool>(),
            proptest::collection::btree_set(0usize..4, 0..3),
            proptest::bool::weighted(0.9),
        )
            .prop_map(|(mut inputs, public, direct_up, direct, addressed)| {
                if let Some(me) = &mut inputs.me {
                    let ip = inputs.gateways[0]
                        .members
                        .iter()
                        .find(|m| m.node == me.name)
                        .map(|m| m.private_ip);
                    me.private_ip = if addressed { ip } else { None };
                }
                for (g, p) in inputs.gateways.iter_mut().zip(public) {
                    if let Some(e) = &mut g.active_tunnel {
                        e.public_ip = p.map(host);
                    }
                }
                inputs.direct.dev = "raven-wg0d".into();
                inputs.direct.up = direct_up;
                inputs.direct.gateways = direct
                    .into_iter()
                    .filter_map(|g| inputs.gateways.get(g).map(|g| g.name.clone()))
                    .collect();
                inputs
            })
    }

    proptest! {
        #[test]
        fn the_incremental_delta_applied_to_the_old_desired_state_is_desired_of_the_new_view(
            full in topology(),
            compact in any::<bool>(),
            changes in proptest::collection::vec(change(), 1..4),
        ) {
            // The view the node holds (full or compact member view) and the
            // cluster it is cut from; each change applies to the cluster.
            let (mut full, mut compact) = (full, compact);
            let old = if compact { model::compact_view(&full) } else { full.clone() };
            let mut index = Index::build(&old);
            let mut was = old.clone();
            for c in &changes {
                apply(&mut full, c);
                if matches!(c, Change::Role) {
                    compact = !compact;
                }
                let new = if compact { model::compact_view(&full) } else { full.clone() };
                let before = model::desired(&was);
                let want = model::desired(&new);
                let Some(delta) = index.update(&new) else {
                    // Not local to some gateways: rebuilt in full.
                    index = Index::build(&new);
                    was = new;
                    continue;
                };
                // The kernel operations: exactly those of the whole diff.
                prop_assert_eq!(&delta.ops, &diff(&want.state, &before.state));
                // The index now holds desired() of the new view.
                prop_assert_eq!(index.desired(), &want);
                // Skip-NAT: the rules, and the scripts applied to the old
                // table give the new one.
                let (old_nat, new_nat) = (skipnat::spec(&was), skipnat::spec(&new));
                prop_assert_eq!(index.skip_nat(), new_nat.clone());
                for f in Family::ALL {
                    let table = Observed::after(old_nat.family(f));
                    let after = match &delta.nat[family_index(f)] {
                        Some(r) => restore(&table, &r.script).map_err(TestCaseError::fail)?,
                        None => table.clone(),
                    };
                    prop_assert_eq!(
                        normalized(after),
                        normalized(Observed::after(new_nat.family(f))),
                        "{:?}: {:?}", f, delta.nat[family_index(f)]
                    );
                    // And it writes what the whole plan would count.
                    let whole = skipnat::diff(new_nat.family(f), &table).map(|r| r.changes);
                    prop_assert_eq!(delta.nat[family_index(f)].as_ref().map(|r| r.changes), whole);
                }
                was = new;
            }
        }
    }

    /// Three domains of remote members; the node is `a2` in `gw-0`.
    fn three_domains() -> NodeInputs {
        let gw = |g: u8, members: Vec<Member>| GatewayView {
            active_tunnel: Some(raven_model::fixtures::endpoint(
                members[0].node.as_str(),
                4500,
            )),
            members,
            ..raven_model::fixtures::gateway(&format!("gw-{g}"))
        };
        let m = |n: &str, ip: &str, s: &str| raven_model::fixtures::member(n, ip, &[s]);
        NodeInputs {
            me: Some(raven_model::topology::NodeView {
                private_ip: Some("192.168.1.2".parse().unwrap_or_else(|_| unreachable!())),
                ..raven_model::fixtures::node_view("a2", Some("gw-0"))
            }),
            gateways: vec![
                gw(
                    0,
                    vec![
                        m("a1", "192.168.1.1", "10.0.1.0/24"),
                        m("a2", "192.168.1.2", "10.0.2.0/24"),
                    ],
                ),
                gw(
                    1,
                    vec![
                        m("b1", "192.168.2.1", "10.1.1.0/24"),
                        m("b2", "192.168.2.2", "10.1.2.0/24"),
                    ],
                ),
                gw(2, vec![m("c1", "192.168.3.1", "10.2.1.0/24")]),
            ],
            ..Default::default()
        }
    }

    /// Node `b2`'s pod subnet moves from 10.1.2.0/24 to 10.1.9.0/24.
    fn move_b2(inputs: &mut NodeInputs) {
        inputs.gateways[1].members[1].subnets =
            vec!["10.1.9.0/24".parse().unwrap_or_else(|_| unreachable!())];
    }

    /// The two route operations `move_b2` needs.
    fn assert_b2_moved(delta: &Delta) {
        let shown: Vec<String> = delta.ops.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            vec![
                "ip route add 10.1.9.0/24 via 192.168.1.1 dev raven0 onlink table 9027 proto 82 mtu 1420",
                "ip route del 10.1.2.0/24 table 9027 proto 82",
            ]
        );
    }

    #[test]
    fn a_remote_members_move_patches_two_routes_without_rebuilding() {
        let mut inputs = three_domains();
        let mut index = Index::build(&inputs);
        move_b2(&mut inputs);
        let delta = index
            .update(&inputs)
            .unwrap_or_else(|| unreachable!("local to gw-1"));
        assert_b2_moved(&delta);
        // Moving the domain's active gateway node changes every route.
        if let Some(e) = &mut inputs.gateways[0].active_tunnel {
            e.node = raven_model::NodeName::new("a2").unwrap_or_else(|_| unreachable!());
        }
        assert!(index.update(&inputs).is_none());
    }

    #[test]
    fn a_compact_members_one_domain_prefix_change_patches_two_routes_without_rebuilding() {
        let mut full = three_domains();
        let mut index = Index::build(&model::compact_view(&full));
        move_b2(&mut full);
        let compact = model::compact_view(&full);
        assert_eq!(compact.remote.len(), 2, "two domains as prefix sets");
        let delta = index
            .update(&compact)
            .unwrap_or_else(|| unreachable!("local to prefixes/gw-1"));
        assert_b2_moved(&delta);
        assert_eq!(index.desired(), &model::desired(&compact));
        assert_eq!(index.skip_nat(), skipnat::spec(&compact));
        // Trading the compact view for the full one (the member became a
        // tunnel candidate) is a change of every other domain's form, and
        // the same routes: nothing to write.
        let delta = index
            .update(&full)
            .unwrap_or_else(|| unreachable!("the same node, settings and role"));
        assert_eq!(delta, Delta::default());
        assert_eq!(index.desired(), &model::desired(&full));
    }
}
