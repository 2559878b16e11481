//! The pipelined route writer against a real kernel: hundreds of route
//! requests per `sendmsg`, answers matched by sequence number, and every
//! refusal attributed to the route it belongs to — also a refusal of the
//! last request of a batch (the one that carries the batch's ACK). Each test
//! makes its own network namespace (`rnp<pid>-<n>`), deleted by name on
//! drop. Needs root; skipped otherwise, unless `RAVEN_REQUIRE_TOOLS=1`.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use ipnet::IpNet;
use raven_edge::dataplane::model::{
    DEFAULT_TUNNEL_DEV, Op, ROUTE_PROTOCOL, Route, RouteDev, TABLE_REMOTE, VxlanLink, mac_for,
};
use raven_edge::dataplane::netlink::{self, TunnelDevs};
use raven_edge::dataplane::{DataplaneError, State};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A namespace this test created; deleted by name on drop.
struct Ns(String);

impl Ns {
    fn new() -> Self {
        let ns = Self(format!(
            "rnp{}-{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        support::must(&["netns", "add", &ns.0]);
        ns
    }

    fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .output()
            .expect("ip");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn block_on<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        support::block_on_in(&self.0, || f)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

const DEVS: TunnelDevs<'static> = TunnelDevs {
    tunnel: DEFAULT_TUNNEL_DEV,
    direct: "",
};

fn route(k: u32, dev: RouteDev) -> Route {
    let dst = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 0)) + (k << 8));
    Route {
        table: TABLE_REMOTE,
        dst: IpNet::new(IpAddr::V4(dst), 24).expect("net"),
        dev,
        via: (dev == RouteDev::Vxlan).then_some(IpAddr::V4(Ipv4Addr::new(192, 168, 99, 2))),
        mtu: 1400,
    }
}

fn raven0() -> Vec<Op> {
    let local = Ipv4Addr::new(192, 168, 99, 1);
    vec![
        Op::CreateLink(VxlanLink {
            vni: 1,
            port: 4472,
            local,
            mtu: 1450,
            mac: mac_for(local),
        }),
        Op::SetUp,
    ]
}

async fn observe() -> State {
    let h = netlink::connect().expect("netlink");
    netlink::observe(&h, DEVS).await.expect("observe")
}

#[test]
fn refused_routes_are_named_one_by_one_and_never_stop_the_rest_of_the_batch() {
    if !support::root_with(&["ip"]) {
        return;
    }
    let ns = Ns::new();
    ns.ip(&["link", "set", "lo", "up"]);
    // The tunnel device exists but is down: the kernel refuses routes into it.
    ns.ip(&[
        "link",
        "add",
        DEFAULT_TUNNEL_DEV,
        "type",
        "veth",
        "peer",
        "name",
        "rnp-tun-peer",
    ]);
    // A foreign route (protocol static) holds one slot raven wants.
    ns.ip(&[
        "link", "add", "rnp-eth", "type", "veth", "peer", "name", "rnp-peer",
    ]);
    ns.ip(&["link", "set", "rnp-peer", "up"]);
    ns.ip(&["link", "set", "rnp-eth", "up"]);
    ns.ip(&[
        "route",
        "add",
        "10.0.7.0/24",
        "dev",
        "rnp-eth",
        "table",
        "9027",
        "proto",
        "static",
    ]);

    // 400 routes over raven0 (several batches); routes 127 (the last of the
    // first batch), 128 (the first of the second) and 300 go into the down
    // tunnel device; route 7's slot is held by the foreign route.
    let refused = [127u32, 128, 300];
    let mut ops = raven0();
    for k in 0..400 {
        let dev = if refused.contains(&k) {
            RouteDev::Tunnel
        } else {
            RouteDev::Vxlan
        };
        ops.push(Op::AddRoute(route(k, dev)));
    }
    let result = ns.block_on({
        let ops = ops.clone();
        async move {
            let h = netlink::connect().expect("netlink");
            netlink::apply(&h, &ops, DEVS).await
        }
    });
    let failed = match result {
        Err(DataplaneError::Routes { failed }) => failed,
        other => panic!("expected the refused routes, got {other:?}"),
    };
    let named: Vec<&str> = failed.iter().map(|f| f.op.as_str()).collect();
    assert_eq!(failed.len(), refused.len(), "{named:?}");
    for (f, k) in failed.iter().zip(refused) {
        assert_eq!(f.op, Op::AddRoute(route(k, RouteDev::Tunnel)).to_string());
        assert_eq!(f.errno, 100, "ENETDOWN: {f}");
        assert!(!f.reason.is_empty());
    }

    // Everything else is in the kernel exactly; the foreign route is untouched.
    let have = ns.block_on(observe());
    let mut want: Vec<Route> = (0..400)
        .filter(|k| !refused.contains(k) && *k != 7)
        .map(|k| route(k, RouteDev::Vxlan))
        .collect();
    want.sort();
    assert_eq!(have.routes.into_iter().collect::<Vec<_>>(), want);
    let foreign = ns.ip(&["route", "show", "table", "9027", "proto", "static"]);
    assert!(foreign.contains("10.0.7.0/24 dev rnp-eth"), "{foreign}");

    // Replacing and deleting go through the same pipeline; deleting what is
    // gone already is success.
    let mut changes: Vec<Op> = (0..400)
        .filter(|k| !refused.contains(k) && *k != 7)
        .map(|k| Op::DeleteRoute(route(k, RouteDev::Vxlan)))
        .collect();
    changes.push(Op::DeleteRoute(route(500, RouteDev::Vxlan)));
    changes.push(Op::ReplaceRoute(route(1, RouteDev::Vxlan)));
    let done = ns
        .block_on(async move {
            let h = netlink::connect().expect("netlink");
            netlink::apply(&h, &changes, DEVS).await
        })
        .expect("apply");
    assert_eq!(done.ops, 396 + 1 + 1);
    let have = ns.block_on(observe());
    assert_eq!(
        have.routes.into_iter().collect::<Vec<_>>(),
        vec![route(1, RouteDev::Vxlan)]
    );
    let all = ns.ip(&[
        "route",
        "show",
        "table",
        "9027",
        "proto",
        &ROUTE_PROTOCOL.to_string(),
    ]);
    assert_eq!(all.lines().count(), 1, "{all}");
}

#[test]
fn observing_reads_only_ravens_tables_and_protocol() {
    if !support::root_with(&["ip"]) {
        return;
    }
    let ns = Ns::new();
    ns.ip(&["link", "set", "lo", "up"]);
    ns.ip(&[
        "link", "add", "rnp-eth", "type", "veth", "peer", "name", "rnp-peer",
    ]);
    ns.ip(&["link", "set", "rnp-peer", "up"]);
    ns.ip(&["link", "set", "rnp-eth", "up"]);
    // Before any of raven's tables exists, the filtered dump is empty.
    assert!(ns.block_on(observe()).routes.is_empty());
    for (dst, table, proto) in [
        ("10.1.0.0/24", "main", "82"),
        ("10.2.0.0/24", "9027", "static"),
        ("10.3.0.0/24", "100", "82"),
        ("10.4.0.0/24", "9027", "82"),
        ("10.5.0.0/24", "9028", "82"),
    ] {
        ns.ip(&[
            "route", "add", dst, "dev", "rnp-eth", "table", table, "proto", proto,
        ]);
    }
    ns.ip(&[
        "-6",
        "route",
        "add",
        "fd10::/64",
        "dev",
        "rnp-eth",
        "table",
        "9028",
        "proto",
        "82",
    ]);
    let have = ns.block_on(observe());
    let dsts: Vec<String> = have.routes.iter().map(|r| r.dst.to_string()).collect();
    assert_eq!(dsts, vec!["10.4.0.0/24", "10.5.0.0/24", "fd10::/64"]);
}
