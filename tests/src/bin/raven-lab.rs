//! `raven-lab`: brings the OpenYurt Raven user-manual cluster up in network
//! namespaces (real hub, real agents), prints the connectivity matrix and the
//! tunnel paths, and tears everything down. Exits non-zero when anything it
//! printed shows a FAIL. Needs root.
//!
//! `raven-lab` (up, matrix, down) · `raven-lab --keep` (leave it running
//! until Enter) · `raven-lab --vpn ipsec` (IPsec between the gateways:
//! `vpn-driver: ipsec` in raven-cfg and a charon per node; `--vpn
//! wireguard` is the default) · `raven-lab down` (remove a lab left behind).

use std::time::{Duration, Instant};

use raven_tests::lab::Lab;

const PREFIX: &str = "rlab-";
const STATE: &str = "/tmp/raven-lab";

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let state = std::path::Path::new(STATE);
    if args.first().is_some_and(|a| a == "down") {
        Lab::clean(PREFIX, state);
        eprintln!("removed the lab: its processes and every {PREFIX}* namespace");
        return std::process::ExitCode::SUCCESS;
    }
    // Ctrl-C or SIGTERM still tears the lab down. (A handler thread, not a
    // blocked signal mask: the mask would be inherited by hub and agents.)
    match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ]) {
        Ok(mut signals) => {
            std::thread::spawn(move || {
                if signals.forever().next().is_some() {
                    eprintln!("interrupted; tearing the lab down");
                    Lab::clean(PREFIX, std::path::Path::new(STATE));
                    std::process::exit(130);
                }
            });
        }
        Err(e) => {
            eprintln!("cannot handle signals ({e}); use `raven-lab down` after an interruption")
        }
    }
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if !root {
        eprintln!(
            "raven-lab builds network namespaces and needs root: run it as root (e.g. `sudo target/debug/raven-lab`)"
        );
        return std::process::ExitCode::FAILURE;
    }
    let path = std::env::var("PATH").unwrap_or_default();
    if let Some(report) = raven_tests::preflight::report(&raven_tests::preflight::missing(
        raven_tests::preflight::LAB_TOOLS,
        &path,
    )) {
        eprint!("{report}");
        return std::process::ExitCode::FAILURE;
    }
    let keep = args.iter().any(|a| a == "--keep");
    let vpn = match args
        .iter()
        .position(|a| a == "--vpn")
        .map(|i| args.get(i + 1).map(String::as_str))
    {
        None | Some(Some("wireguard")) => raven_tests::lab::Vpn::Wireguard,
        Some(Some("ipsec")) => raven_tests::lab::Vpn::Ipsec,
        Some(other) => {
            eprintln!("--vpn {other:?}: expected wireguard or ipsec");
            return std::process::ExitCode::FAILURE;
        }
    };
    let started = Instant::now();
    let mut lab = match Lab::build(PREFIX, state) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("building the lab failed: {e}");
            Lab::clean(PREFIX, state);
            return std::process::ExitCode::FAILURE;
        }
    };
    if vpn == raven_tests::lab::Vpn::Ipsec
        && let Err(e) = lab.use_ipsec()
    {
        eprintln!("IPsec needs strongSwan's charon (strongswan-charon): {e}");
        return std::process::ExitCode::FAILURE;
    }
    eprintln!(
        "lab built in {:?}: 3 domains, 6 nodes, 2 NAT routers, {vpn:?} between gateways",
        started.elapsed()
    );
    if let Err(e) = lab.start_hub().and_then(|()| lab.start_agents()) {
        eprintln!("starting raven failed: {e}");
        return std::process::ExitCode::FAILURE;
    }
    // The verdict is computed from what is printed: a FAIL in the matrix or
    // the paths fails the run, also after a full matrix was seen once.
    let report = lab.report(Duration::from_secs(60), Duration::from_secs(10));
    let ok = report.ok();
    println!("{}", report.render());
    eprintln!("{}", report.verdict());
    if !ok {
        eprintln!("{}", lab.logs());
    }
    if keep {
        eprintln!("lab left running (namespaces {PREFIX}*); press Enter to tear it down");
        let mut s = String::new();
        let _ = std::io::stdin().read_line(&mut s);
    }
    drop(lab);
    eprintln!("lab torn down");
    if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
