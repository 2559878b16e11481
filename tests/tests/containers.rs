//! The agent as the Kubernetes manifests run it — the `raven-edge` image in
//! a lab node's network namespace, exactly NET_ADMIN and NET_RAW, and (with
//! userspace WireGuard) wireguard-go in containers of its own — next to the
//! real hub and the other agents of the lab. Restarting the agent container
//! and upgrading it (stop, start another image) must leave cross-domain
//! traffic through that node's tunnel flowing: continuous pings count every
//! lost packet and the figures are printed.
//!
//! Needs root, podman (runc), mmdebstrap, wireguard-go, nft, curl and
//! grpcurl; skipped otherwise unless `RAVEN_REQUIRE_TOOLS=1`. The kernel
//! WireGuard variant runs where the kernel can make WireGuard links.

use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use raven_tests::containers::{EdgePod, Images, Pinger, Wireguard, kernel_wireguard};
use raven_tests::lab::{Lab, NODES, is_root, manual_node};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn ready() -> bool {
    let root = is_root();
    let tools = [
        "podman",
        "runc",
        "mmdebstrap",
        "wireguard-go",
        "nft",
        "curl",
        "grpcurl",
    ];
    let missing: Vec<&str> = tools
        .into_iter()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect();
    if !root || !missing.is_empty() {
        let why = format!("container tests need root (root: {root}) and {missing:?}");
        assert!(
            std::env::var_os("RAVEN_REQUIRE_TOOLS").is_none(),
            "{why}; RAVEN_REQUIRE_TOOLS is set"
        );
        eprintln!("skipped: {why}");
        return false;
    }
    true
}

fn pod_ip(short: &str) -> &'static str {
    manual_node(short).map_or_else(|| panic!("no lab node {short}"), |n| n.pod)
}

/// The interface index of a link in a node's namespace (`None`: no link).
fn ifindex(lab: &Lab, short: &str, dev: &str) -> Option<String> {
    let out = lab.sh(short, &["ip", "-o", "link", "show", dev]).ok()?;
    out.split(':').next().map(|s| s.trim().to_owned())
}

fn wait_ready(lab: &Lab, short: &str, timeout: Duration) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if lab.readyz(short).0 == 200 {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Two streams across hangzhou's gateway (h1, the containerised node):
/// qingdao's member pod → hangzhou's member pod (NATed to NATed), and the
/// cloud's member pod → hangzhou's member pod.
fn start_pings(lab: &Lab, count: u32) -> Vec<(&'static str, Pinger)> {
    [("q2", "qingdao→hangzhou"), ("c2", "cloud→hangzhou")]
        .into_iter()
        .map(|(from, what)| {
            let p = Pinger::start(lab, from, pod_ip(from), pod_ip("h2"), count).expect("ping");
            (what, p)
        })
        .collect()
}

/// Restarts and then upgrades h1's agent container with pings flowing
/// across its tunnel; returns the printed figures.
fn restart_and_upgrade(mode: Wireguard, tag: &str) {
    let _guard = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let pid = std::process::id() % 10_000;
    let letter = if mode == Wireguard::Userspace {
        'u'
    } else {
        'k'
    };
    let prefix = format!("rc{letter}{pid}-");
    let dir = std::env::temp_dir().join(format!("raven-container-test-{letter}-{pid}"));
    let (a, b) = (
        format!("{tag}{letter}{pid}a"),
        format!("{tag}{letter}{pid}b"),
    );

    let mut lab = Lab::build(&prefix, &dir).expect("lab builds");
    let t = Instant::now();
    let images = Images::build(
        lab.binaries_dir().expect("binaries"),
        &[(&a, None), (&b, Some("io.raven.test.build=upgrade"))],
    )
    .expect("images build");
    eprintln!(
        "images built in {:?}: raven-edge {}, raven-wireguard-go {}, raven-hub {}",
        t.elapsed(),
        images.size("raven-edge", &a),
        images.size("raven-wireguard-go", &a),
        images.size("raven-hub", &a)
    );
    let ids: Vec<String> = [&a, &b]
        .iter()
        .map(|t| {
            images
                .podman(&[
                    "image",
                    "inspect",
                    "--format",
                    "{{.Id}}",
                    &Images::reference("raven-edge", t),
                ])
                .expect("inspect")
        })
        .collect();
    assert_ne!(ids[0], ids[1], "the upgrade is another image");

    lab.start_hub().expect("hub");
    for n in NODES.iter().filter(|n| n.short != "h1") {
        lab.start_agent(n.short).expect("agent");
    }
    let pod = EdgePod::start(&lab, &images, "h1", mode, &a).expect("h1's pod starts");
    let report = |lab: &Lab, pod: &EdgePod| format!("{}\n{}", pod.all_logs(), lab.logs());
    if let Err(m) = lab.converge(Duration::from_secs(60)) {
        panic!(
            "no full matrix with h1's agent in a container\n{}\n{}",
            Lab::render(&m),
            report(&lab, &pod)
        );
    }
    let dev = lab.tunnel_dev("h1");
    let before = ifindex(&lab, "h1", &dev).expect("h1 has its tunnel device");
    let wg_pids: Vec<Option<u32>> = pod.wireguard.iter().map(|c| pod.pid(c)).collect();
    if mode == Wireguard::Userspace {
        let logs = pod.logs(&pod.agent);
        assert!(
            !logs.contains("started wireguard-go"),
            "the agent started wireguard-go itself: {logs}"
        );
    }

    for (what, tag) in [("restart", &a), ("upgrade", &b)] {
        // 15 s of pings: the agent is stopped after 2 s, away 1 s, then a
        // new container starts; the rest shows the new agent adopting.
        let pings = start_pings(&lab, 300);
        std::thread::sleep(Duration::from_secs(2));
        let t = Instant::now();
        pod.stop_agent().expect("agent container stops");
        let stopped = t.elapsed();
        std::thread::sleep(Duration::from_secs(1));
        pod.run_agent(tag).expect("agent container starts");
        let ready = wait_ready(&lab, "h1", Duration::from_secs(30)).unwrap_or_else(|| {
            panic!("{what}: h1's new agent never ready\n{}", report(&lab, &pod))
        });
        let mut figures = Vec::new();
        let mut lost_total = 0;
        for (stream, p) in pings {
            let (sent, lost) = p.wait();
            assert!(sent >= 290, "{what}: {stream}: ping sent only {sent}");
            lost_total += lost;
            figures.push(format!("{stream} {lost} of {sent} lost"));
        }
        eprintln!(
            "{mode:?} WireGuard, agent container {what} ({tag}): stopped in {stopped:?}, away ≥ 1 s, new agent ready {ready:?} after start; {}",
            figures.join(", ")
        );
        assert_eq!(
            lost_total,
            0,
            "{what}: packets lost across h1's tunnel ({})\n{}",
            figures.join(", "),
            report(&lab, &pod)
        );
        assert_eq!(
            ifindex(&lab, "h1", &dev).as_deref(),
            Some(before.as_str()),
            "{what}: the tunnel device was recreated"
        );
        let now: Vec<Option<u32>> = pod.wireguard.iter().map(|c| pod.pid(c)).collect();
        assert_eq!(now, wg_pids, "{what}: wireguard-go was restarted");
        let image = images
            .podman(&["inspect", "--format", "{{.ImageName}}", &pod.agent])
            .expect("inspect");
        assert_eq!(image.trim(), Images::reference("raven-edge", tag));
    }

    if mode == Wireguard::Userspace {
        // The tunnel really is the wireguard-go container's: restarting the
        // one of raven-wg0 takes that device away, and with it the path
        // cloud → hangzhou, until the agent configures the new, empty device
        // (drift repair: 1 s in the lab). qingdao ↔ hangzhou (two NATed
        // gateways) may ride the direct-path device and not notice.
        let pings = start_pings(&lab, 200);
        std::thread::sleep(Duration::from_secs(2));
        pod.restart_wireguard(0).expect("wireguard-go restarts");
        let t = Instant::now();
        let back = loop {
            if lab.ping("c2", pod_ip("c2"), pod_ip("h2")) {
                break t.elapsed();
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no traffic after wireguard-go's restart\n{}",
                report(&lab, &pod)
            );
        };
        let lost: Vec<(&str, (u64, u64))> = pings.into_iter().map(|(w, p)| (w, p.wait())).collect();
        eprintln!(
            "control: raven-wg0's wireguard-go container restarted (a new, empty device): {}; cloud→hangzhou back {back:?} after the restart",
            lost.iter()
                .map(|(w, (sent, l))| format!("{w} {l} of {sent} lost"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        assert!(
            lost.iter()
                .any(|(w, (_, l))| w.starts_with("cloud") && *l > 0),
            "restarting wireguard-go lost nothing cloud → hangzhou: the tunnel is not the container's"
        );
        assert_ne!(
            ifindex(&lab, "h1", &dev).as_deref(),
            Some(before.as_str()),
            "a new wireguard-go makes a new device"
        );
    }
    if let Err(m) = lab.converge(Duration::from_secs(60)) {
        panic!(
            "no full matrix at the end\n{}\n{}",
            Lab::render(&m),
            report(&lab, &pod)
        );
    }
    drop(pod);
    drop(lab);
    drop(images);
}

#[test]
fn with_userspace_wireguard_restarting_and_upgrading_the_agent_container_loses_no_packet() {
    if !ready() {
        return;
    }
    restart_and_upgrade(Wireguard::Userspace, "t");
}

#[test]
fn with_kernel_wireguard_restarting_and_upgrading_the_agent_container_loses_no_packet() {
    if !ready() {
        return;
    }
    if !kernel_wireguard(&format!("rckprobe{}", std::process::id() % 10_000)) {
        eprintln!(
            "kernel WireGuard: this kernel cannot make WireGuard links; the kernel variant did not run"
        );
        return;
    }
    restart_and_upgrade(Wireguard::Kernel, "t");
}

/// The hub image as the Deployment runs it: user and group 65532, read-only
/// root filesystem, every capability dropped, its certificates mounted the
/// way kubelet mounts a Secret for `fsGroup: 65532` (root-owned, group
/// 65532, 0440): it starts and answers /readyz.
#[test]
fn the_hub_image_serves_as_a_non_root_user_from_a_read_only_root_with_a_secret_like_mount() {
    if !ready() {
        return;
    }
    let _guard = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let pid = std::process::id() % 10_000;
    let ns = format!("rch{pid}");
    struct Netns(String);
    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let ip = |args: &[&str]| {
        let st = Command::new("ip").args(args).status().expect("ip");
        assert!(st.success(), "ip {args:?}");
    };
    ip(&["netns", "add", &ns]);
    let _ns = Netns(ns.clone());
    ip(&["-n", &ns, "link", "set", "lo", "up"]);

    let binaries = raven_tests::lab::binary("raven-hub")
        .expect("raven-hub built")
        .parent()
        .expect("dir")
        .to_owned();
    let tag = format!("th{pid}");
    let images = Images::build(&binaries, &[(&tag, None)]).expect("images build");
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    let st = Command::new(binaries.join("raven-hub"))
        .args(["certs", "--out"])
        .arg(&certs)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("certs");
    assert!(st.success());
    // What kubelet makes of the Secret (defaultMode 0440, fsGroup 65532).
    let secret = dir.path().join("secret");
    std::fs::create_dir(&secret).expect("mkdir");
    for f in ["ca.pem", "hub.pem", "hub-key.pem"] {
        std::fs::copy(certs.join(f), secret.join(f)).expect("copy");
        std::os::unix::fs::chown(secret.join(f), Some(0), Some(65532)).expect("chown");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(secret.join(f), std::fs::Permissions::from_mode(0o440))
            .expect("chmod");
    }
    let examples = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/examples/user-manual"
    );
    let name = format!("rch{pid}-hub");
    let network = format!("ns:/run/netns/{ns}");
    let secret_mount = format!("{}:/etc/raven/certs:ro", secret.display());
    let examples_mount = format!("{examples}:/etc/raven/manifests:ro");
    let image = Images::reference("raven-hub", &tag);
    struct Container<'a>(&'a Images, String);
    impl Drop for Container<'_> {
        fn drop(&mut self) {
            let _ = self.0.podman(&["rm", "-f", "-t", "2", &self.1]);
        }
    }
    images
        .podman(&[
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            &network,
            "--user",
            "65532:65532",
            "--read-only",
            "--cap-drop",
            "all",
            "--tmpfs",
            "/var/lib/raven-hub:mode=1777",
            "-v",
            &secret_mount,
            "-v",
            &examples_mount,
            &image,
            "serve",
            "--manifests",
            "/etc/raven/manifests",
            "--certs",
            "/etc/raven/certs",
            "--data-dir",
            "/var/lib/raven-hub",
            "--grpc-addr",
            "127.0.0.1:10270",
            "--http-addr",
            "127.0.0.1:10272",
        ])
        .expect("hub container starts");
    let _c = Container(&images, name.clone());
    let t = Instant::now();
    let ok = loop {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "curl",
                "-s",
                "-m",
                "1",
                "-o",
                "/dev/null",
            ])
            .args(["-w", "%{http_code}", "http://127.0.0.1:10272/readyz"])
            .output()
            .expect("curl");
        if out.stdout == b"200" {
            break true;
        }
        if t.elapsed() > Duration::from_secs(30) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let logs = Command::new("podman")
        .args(["logs", &name])
        .env("CONTAINERS_CONF", images.conf())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .unwrap_or_default();
    assert!(ok, "the hub container never became ready:\n{logs}");
    let users = images.podman(&["top", &name, "user", "comm"]).expect("top");
    assert!(
        users
            .lines()
            .skip(1)
            .all(|l| l.trim_start().starts_with("65532")),
        "the hub runs as 65532: {users}"
    );
    eprintln!(
        "hub image {} ready {:?} after start as 65532 on a read-only root",
        images.size("raven-hub", &tag),
        t.elapsed()
    );
}
