//! Admission under a dial storm and under a flood from one address: every
//! dial is taken off the kernel's listen backlog at once and waits its turn
//! in the hub, so none is reset or dropped; one source address cannot take
//! the handshake slots or the connections that other addresses need; a
//! stream over the initial-sync limit waits for a permit on its connection
//! before it is told to retry.

use std::net::SocketAddr;
use std::time::Duration;

use raven_hub::hub;

// Shared with tests/sync.rs; this file uses part of it.
#[allow(dead_code)]
mod support;
use support::*;

/// A TCP connection to `to` from the loopback address `from` (all of
/// 127.0.0.0/8 is loopback on Linux).
async fn dial_from(from: [u8; 4], to: SocketAddr) -> tokio::net::TcpStream {
    let s = tokio::net::TcpSocket::new_v4().expect("socket");
    s.bind(SocketAddr::from((from, 0)))
        .expect("bind a loopback source address");
    s.connect(to).await.expect("tcp connect")
}

async fn dial_many(n: usize, from: [u8; 4], to: SocketAddr) -> Vec<tokio::net::TcpStream> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(dial_from(from, to).await);
    }
    v
}

/// Connections the kernel holds for the listening socket on `port` that
/// the hub has not accepted yet: `rx_queue` of its LISTEN row in
/// `/proc/net/tcp`.
fn backlog(port: u16) -> Option<usize> {
    let text = std::fs::read_to_string("/proc/net/tcp").ok()?;
    text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (_, p) = f.get(1)?.split_once(':')?;
        if u16::from_str_radix(p, 16).ok()? != port || *f.get(3)? != "0A" {
            return None;
        }
        let (_, rx) = f.get(4)?.split_once(':')?;
        usize::from_str_radix(rx, 16).ok()
    })
}

/// Waits (up to 20 s, a liveness bound) until the hub has taken every
/// connection off its backlog; the backlog left otherwise.
async fn backlog_drained(port: u16) -> Result<(), usize> {
    let mut left = usize::MAX;
    for _ in 0..200 {
        left = backlog(port).expect("the hub's LISTEN row in /proc/net/tcp");
        if left == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(left)
}

/// No FIN or RST has arrived on `c` (the hub keeps it open).
fn still_open(c: &tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 1];
    matches!(c.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Closed by the hub (EOF or reset) within `within`.
async fn closed_within(c: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(within, c.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn dials_beyond_the_handshake_slots_are_taken_off_the_backlog_and_none_is_dropped() {
    let env = Env::new();
    let mut config = env.config(64);
    config.sync.max_tls_handshakes = 1;
    config.sync.tls_handshake_timeout = Duration::from_secs(60);
    let hub = hub::start(config).await.expect("hub");
    let port = hub.grpc_addr.port();
    // Sixty-four dials, one handshake slot: the kernel's backlog (capped by
    // net.core.somaxconn, 4,096 here) would drop the SYNs of a storm the size
    // of the fleet; the hub must take them into its own queue.
    let silent = dial_many(64, [127, 0, 0, 2], hub.grpc_addr).await;
    if let Err(left) = backlog_drained(port).await {
        panic!("{left} connections still wait in the kernel's listen backlog");
    }
    assert!(
        silent.iter().all(still_open),
        "a queued dial was closed: a lost dial"
    );
    // They leave; an agent dialling after all 64 gets its turn.
    drop(silent);
    let mut agent = tokio::time::timeout(Duration::from_secs(30), synced_agent(&env, &hub, HZ_GW))
        .await
        .expect("an agent behind 64 abandoned dials gets in");
    agent.no_update_within(Duration::from_millis(100)).await;
    hub.stop().await;
}

#[tokio::test]
async fn a_dial_storm_of_real_agents_all_complete_their_handshakes_with_few_slots() {
    let env = Env::new();
    let mut config = env.config(64);
    config.sync.max_tls_handshakes = 2;
    config.sync.max_tls_handshakes_per_source = 1;
    let hub = hub::start(config).await.expect("hub");
    // 100 mTLS channels at once, two handshakes at a time: every one
    // connects (Env::channel panics on a failed dial), none is refused.
    let channels = futures::future::join_all((0..100).map(|_| env.channel(&hub, HZ_GW))).await;
    assert_eq!(channels.len(), 100);
    assert_eq!(hub.metrics.connections_refused(), 0);
    drop(channels);
    hub.stop().await;
}

#[tokio::test]
async fn one_address_holding_silent_connections_does_not_delay_another_addresss_handshake() {
    let env = Env::new();
    let mut config = env.config(64);
    config.sync.max_tls_handshakes = 4;
    config.sync.max_tls_handshakes_per_source = 2;
    config.sync.tls_handshake_timeout = Duration::from_secs(60);
    let hub = hub::start(config).await.expect("hub");
    // 127.0.0.2 opens 20 connections and never says a word: it may hold
    // two handshake slots for a minute each, never all four.
    let silent = dial_many(20, [127, 0, 0, 2], hub.grpc_addr).await;
    if let Err(left) = backlog_drained(hub.grpc_addr.port()).await {
        panic!("{left} connections still wait in the kernel's listen backlog");
    }
    // An agent from 127.0.0.1 is handshaken and synced while every silent
    // connection still holds on (a liveness bound, far below the minute
    // the silent handshakes may take).
    let mut agent = tokio::time::timeout(Duration::from_secs(20), synced_agent(&env, &hub, HZ_GW))
        .await
        .expect("another address's agent got in while 127.0.0.2 held its slots");
    assert!(
        silent.iter().all(still_open),
        "the agent got in only because silent connections were dropped"
    );
    agent.no_update_within(Duration::from_millis(100)).await;
    drop(silent);
    hub.stop().await;
}

#[tokio::test]
async fn one_address_over_its_connection_cap_is_closed_at_once_and_others_still_connect() {
    let env = Env::new();
    let mut config = env.config(64);
    config.sync.max_connections_per_source = 4;
    config.sync.tls_handshake_timeout = Duration::from_secs(60);
    let hub = hub::start(config).await.expect("hub");
    let mut held = dial_many(4, [127, 0, 0, 2], hub.grpc_addr).await;
    let mut fifth = dial_from([127, 0, 0, 2], hub.grpc_addr).await;
    assert!(
        closed_within(&mut fifth, Duration::from_secs(10)).await,
        "a fifth connection from 127.0.0.2 was kept open"
    );
    assert!(
        held.iter().all(still_open),
        "the source's first four were closed"
    );
    assert!(hub.metrics.connections_refused() >= 1);
    // Another address is not affected.
    let mut agent = tokio::time::timeout(Duration::from_secs(20), synced_agent(&env, &hub, HZ_GW))
        .await
        .expect("an agent from 127.0.0.1 gets in");
    agent.no_update_within(Duration::from_millis(100)).await;
    // One of the four closes: 127.0.0.2 may open one more.
    drop(held.pop());
    let mut reopened = false;
    for _ in 0..50 {
        let c = dial_from([127, 0, 0, 2], hub.grpc_addr).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        if still_open(&c) {
            held.push(c);
            reopened = true;
            break;
        }
    }
    assert!(reopened, "the closed connection was never counted down");
    drop(held);
    hub.stop().await;
}

#[tokio::test]
async fn a_stream_over_the_initial_sync_limit_waits_on_its_connection_and_is_admitted_when_a_permit_frees()
 {
    let env = Env::new();
    let mut config = env.config(1);
    config.sync.admission_wait = Duration::from_secs(30);
    let hub = hub::start(config).await.expect("hub");
    let mut a = env.client(&hub, HZ_GW).await;
    let mut first = Agent::open(&mut a, hello(HZ_GW, &[], "", 0, false))
        .await
        .expect("first admitted");
    let snapshot = first.update().await.expect("snapshot in flight, not acked");
    // The only permit is held: the second stream waits for it.
    let mut b = env.client(&hub, HZ_MEMBER).await;
    let second = tokio::spawn(async move {
        let mut s = Agent::open(&mut b, hello(HZ_MEMBER, &[], "", 0, false)).await?;
        s.update().await.map(|u| (s, u))
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !second.is_finished(),
        "the second stream did not wait for the permit"
    );
    // The first finishes its initial sync: its permit goes to the waiter.
    first.ack(&snapshot).await;
    let (_second, u) = tokio::time::timeout(Duration::from_secs(20), second)
        .await
        .expect("admitted once the permit freed")
        .expect("task")
        .expect("no refusal: it waited for the permit");
    assert!(u.snapshot, "the waiter got its snapshot");
    assert_eq!(hub.metrics.admission_rejections(), 0);
    drop(first);
    hub.stop().await;
}

#[tokio::test]
async fn only_an_addresss_surplus_of_queued_connections_is_closed_after_the_queue_timeout() {
    let env = Env::new();
    let mut config = env.config(64);
    config.sync.max_tls_handshakes = 1;
    config.sync.max_tls_handshakes_per_source = 1;
    config.sync.tls_handshake_timeout = Duration::from_secs(60);
    config.sync.tls_queue_timeout = Duration::from_millis(500);
    let hub = hub::start(config).await.expect("hub");
    // 127.0.0.2 takes the one handshake slot and queues three more; 127.0.0.3
    // queues one.
    let mut parked = dial_many(4, [127, 0, 0, 2], hub.grpc_addr).await;
    let other = dial_from([127, 0, 0, 3], hub.grpc_addr).await;
    if let Err(left) = backlog_drained(hub.grpc_addr.port()).await {
        panic!("{left} connections still wait in the kernel's listen backlog");
    }
    // The surplus of 127.0.0.2 (beyond the one in its handshake and the
    // first queued) is closed once it has waited past the queue timeout.
    for (i, c) in parked.iter_mut().enumerate().skip(2) {
        assert!(
            closed_within(c, Duration::from_secs(20)).await,
            "127.0.0.2's queued connection {i} was never closed"
        );
    }
    // Every address's first queued dial waits its turn, however long.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        still_open(&parked[0]),
        "the one in its handshake was closed"
    );
    assert!(
        still_open(&parked[1]),
        "127.0.0.2's first queued dial was closed"
    );
    assert!(still_open(&other), "127.0.0.3's only dial was closed");
    drop((parked, other));
    hub.stop().await;
}
