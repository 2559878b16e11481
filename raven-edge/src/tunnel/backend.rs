//! Which WireGuard runs the tunnel: the kernel's (configured over generic
//! netlink) where the module exists, wireguard-go (driven over its UAPI
//! socket) otherwise — detected at start, or chosen with `--wireguard`.

use std::fmt;
use std::str::FromStr;

use super::uapi::DeviceState;
use super::{TunnelError, kernel, uapi};

/// The `--wireguard` choice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WgMode {
    /// Kernel WireGuard when the kernel has it, userspace otherwise.
    #[default]
    Auto,
    Kernel,
    Userspace,
}

impl FromStr for WgMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "kernel" => Ok(Self::Kernel),
            "userspace" => Ok(Self::Userspace),
            _ => Err(format!(
                "{s:?} is not a WireGuard implementation (auto, kernel, userspace)"
            )),
        }
    }
}

impl fmt::Display for WgMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Kernel => "kernel",
            Self::Userspace => "userspace",
        })
    }
}

/// Who runs wireguard-go for the userspace backend (`--wireguard-go`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WireguardGo {
    /// The agent starts it, in a session of its own, when the device's UAPI
    /// socket does not answer (a host install: stopping the agent leaves it
    /// running).
    #[default]
    Spawn,
    /// Something else runs it — in Kubernetes the `wireguard-go` container
    /// of the `raven-wireguard` DaemonSet, whose processes outlive the
    /// agent's container (a process the agent started would die with it).
    /// The agent only waits for the UAPI socket and never starts one.
    External,
}

impl FromStr for WireguardGo {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "spawn" => Ok(Self::Spawn),
            "external" => Ok(Self::External),
            _ => Err(format!(
                "{s:?} is not a way to run wireguard-go (spawn, external)"
            )),
        }
    }
}

impl fmt::Display for WireguardGo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Spawn => "spawn",
            Self::External => "external",
        })
    }
}

/// The WireGuard implementation in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The kernel module, over generic netlink.
    Kernel,
    /// wireguard-go, over its UAPI socket.
    Userspace,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Kernel => "kernel",
            Self::Userspace => "userspace (wireguard-go)",
        })
    }
}

/// Whether this kernel can create WireGuard links: the module is loaded, or
/// creating (and at once deleting) a throw-away link works — which also
/// loads the module where it is available. Creates a link only when
/// `may_create`.
pub async fn kernel_supported(may_create: bool) -> bool {
    if std::path::Path::new("/sys/module/wireguard").exists() {
        return true;
    }
    if !may_create {
        return false;
    }
    let probe = format!("rvwgprobe{}", std::process::id() % 100_000);
    match kernel::create(&probe).await {
        Ok(()) => {
            if let Err(e) = kernel::delete(&probe).await {
                tracing::warn!(link = %probe, error = %e, "could not delete the WireGuard probe link");
            }
            true
        }
        Err(_) => false,
    }
}

/// The backend for `mode`. `may_create`: probing may create a throw-away
/// link (false in a dry run).
pub async fn detect(mode: WgMode, may_create: bool) -> Result<Backend, TunnelError> {
    match mode {
        WgMode::Userspace => Ok(Backend::Userspace),
        WgMode::Auto if kernel_supported(may_create).await => Ok(Backend::Kernel),
        WgMode::Auto => Ok(Backend::Userspace),
        WgMode::Kernel if kernel_supported(may_create).await => Ok(Backend::Kernel),
        WgMode::Kernel => Err(TunnelError::NoKernelWireGuard),
    }
}

impl Backend {
    /// The device as it is now.
    pub async fn get(self, dev: &str) -> Result<DeviceState, TunnelError> {
        match self {
            Self::Kernel => Ok(kernel::get(dev).await?),
            Self::Userspace => Ok(uapi::get(dev).await?),
        }
    }

    /// Whether `dev` exists and answers: a kernel WireGuard link that
    /// generic netlink can read, or a wireguard-go whose UAPI socket answers.
    pub async fn device_exists(self, dev: &str) -> bool {
        self.get(dev).await.is_ok()
    }

    /// Applies a UAPI `set=1` body (see [`super::diff`]).
    pub async fn set(self, dev: &str, body: &str) -> Result<(), TunnelError> {
        match self {
            Self::Kernel => Ok(kernel::set(dev, body).await?),
            Self::Userspace => Ok(uapi::set(dev, body).await?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wireguard_go_flag_values_round_trip_and_others_are_refused() {
        for m in [WireguardGo::Spawn, WireguardGo::External] {
            assert_eq!(m.to_string().parse::<WireguardGo>(), Ok(m));
        }
        let err = "sidecar"
            .parse::<WireguardGo>()
            .expect_err("not a way to run wireguard-go");
        assert!(err.contains("sidecar") && err.contains("external"), "{err}");
    }

    #[test]
    fn the_flag_values_round_trip_and_others_are_refused() {
        for m in [WgMode::Auto, WgMode::Kernel, WgMode::Userspace] {
            assert_eq!(m.to_string().parse::<WgMode>(), Ok(m));
        }
        let e = "boringtun".parse::<WgMode>().expect_err("not a mode");
        assert!(e.contains("auto, kernel, userspace"), "{e}");
    }

    #[tokio::test]
    async fn a_device_that_does_not_exist_is_missing_for_both_backends() {
        for b in [Backend::Kernel, Backend::Userspace] {
            assert!(!b.device_exists("rvnosuchwg0").await, "{b}");
        }
    }

    #[tokio::test]
    async fn userspace_mode_is_chosen_without_probing() {
        assert_eq!(
            detect(WgMode::Userspace, false).await.ok(),
            Some(Backend::Userspace)
        );
    }
}
