//! Which WireGuard the agent picks, decided inside a network namespace made
//! for the test: the kernel's when this kernel can create WireGuard links
//! (then a real kernel device is configured and read back over generic
//! netlink), userspace otherwise — and `--wireguard=kernel` refuses a kernel
//! without it. Needs root; skipped otherwise unless `RAVEN_REQUIRE_TOOLS=1`.

mod support;

use raven_edge::tunnel::backend::{Backend, WgMode, WireguardGo, detect};
use raven_edge::tunnel::keys::{Key, Secret};
use raven_edge::tunnel::{Change, PeerChange, Tunnel, kernel, uapi};
use support::must;

fn is_root() -> bool {
    support::root_with(&[])
}

/// A namespace of this test, removed by name on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

#[test]
fn auto_picks_the_kernel_only_where_it_has_wireguard_and_kernel_mode_refuses_otherwise() {
    if !is_root() {
        return;
    }
    let ns = Netns(format!("rwb{}", std::process::id() % 100_000));
    must(&["netns", "add", &ns.0]);
    let (auto, forced, can_create) = support::block_on_in(&ns.0, || {
        Box::pin(async {
            let can_create = kernel::create("rwbprobe0").await.is_ok();
            let _ = kernel::delete("rwbprobe0").await;
            let auto = detect(WgMode::Auto, true).await.ok();
            let forced = detect(WgMode::Kernel, true)
                .await
                .map_err(|e| e.to_string());
            (auto, forced, can_create)
        })
    });
    let module = std::path::Path::new("/sys/module/wireguard").exists();
    if module || can_create {
        assert_eq!(auto, Some(Backend::Kernel));
        assert_eq!(forced, Ok(Backend::Kernel));
        // A real kernel device: a change written over generic netlink reads
        // back.
        let state = support::block_on_in(&ns.0, || {
            Box::pin(async {
                kernel::create("rwbwg0").await.expect("create");
                let change = Change {
                    private_key: Some(Secret(Key([0x11; 32]))),
                    listen_port: Some(4599),
                    peers: vec![
                        PeerChange::new(Key([0x22; 32]))
                            .endpoint("192.0.2.1:4500".parse().expect("addr"))
                            .replace_allowed_ips(["10.77.0.0/24".parse().expect("net")]),
                    ],
                };
                kernel::set("rwbwg0", &change).await.expect("set");
                kernel::get("rwbwg0").await.expect("get")
            })
        });
        assert_eq!(state.listen_port, 4599);
        assert_eq!(
            state.peers.values().next().map(|p| p.allowed_ips.clone()),
            Some(vec!["10.77.0.0/24".parse().expect("net")])
        );
    } else {
        // No kernel WireGuard on this machine (the CI machines have none).
        assert_eq!(auto, Some(Backend::Userspace));
        let e = forced.expect_err("kernel mode without kernel WireGuard");
        assert!(e.contains("--wireguard=kernel"), "{e}");
    }
    // Probing left no link behind in the namespace.
    let (_, links) = support::ip(&["-n", &ns.0, "-o", "link", "show"]);
    assert!(
        !links.contains("rwbprobe") && !links.contains("rvwgprobe"),
        "{links}"
    );
}

/// `--wireguard-go=external` (Kubernetes: wireguard-go runs in a container of
/// its own, so that it outlives the agent's): the agent never starts
/// wireguard-go — without one it fails naming the socket it waited for —
/// and adopts the one started outside it.
#[test]
fn with_external_wireguard_go_the_agent_never_starts_one_and_adopts_the_one_running() {
    if !support::root_with(&["wireguard-go"]) {
        return;
    }
    let ns = Netns(format!("rwx{}", std::process::id() % 100_000));
    must(&["netns", "add", &ns.0]);
    let dev = format!("rwx{}wg", std::process::id() % 100_000);
    let data = tempfile::tempdir().expect("tempdir");
    let tunnel = Tunnel::new(dev.clone(), data.path(), Backend::Userspace)
        .expect("key")
        .with_wireguard_go(WireguardGo::External);
    let t = tunnel.clone();
    let err = support::block_on_in(&ns.0, move || {
        Box::pin(async move { t.ensure_device(1420, None).await.map_err(|e| e.to_string()) })
    })
    .expect_err("no wireguard-go runs for the device");
    assert!(
        err.contains("--wireguard-go=external") && err.contains(&format!("{dev}.sock")),
        "{err}"
    );
    assert!(
        !tunnel.pid_file().exists(),
        "the agent started wireguard-go"
    );
    let (_, links) = support::ip(&["-n", &ns.0, "-o", "link", "show"]);
    assert!(!links.contains(&dev), "a device appeared: {links}");

    // wireguard-go started by someone else, in the namespace.
    let outside = support::Proc(
        std::process::Command::new("ip")
            .args(["netns", "exec", &ns.0, "wireguard-go", "-f", &dev])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("wireguard-go"),
    );
    let t = tunnel.clone();
    support::block_on_in(&ns.0, move || {
        Box::pin(async move { t.ensure_device(1420, None).await.map_err(|e| e.to_string()) })
    })
    .expect("adopts the running wireguard-go");
    assert!(
        !tunnel.pid_file().exists(),
        "the agent started wireguard-go"
    );
    let (_, link) = support::ip(&["-n", &ns.0, "-o", "link", "show", &dev]);
    assert!(link.contains("mtu 1420") && link.contains(",UP"), "{link}");
    drop(outside);
    let _ = std::fs::remove_file(uapi::socket_path(&dev));
}
