//! Helpers shared by the Kubernetes test binaries (each uses a part; the
//! rest is dead code there).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use raven_hub::grpc::TlsFiles;
use raven_hub::grpc::sync::SyncConfig;
use raven_hub::hub::{self, HubConfig, RunningHub, Source as HubSource};
use raven_hub::index::{Index, IndexHandle};
use raven_hub::pipeline::Debounce;
use tokio_util::sync::CancellationToken;

/// Upper bound of every wait.
pub const WAIT: Duration = Duration::from_secs(30);

/// A whole hub reading the Kubernetes API through `kubeconfig`, with its
/// certificates and data under `dir` (certificates made on first use).
pub async fn start_hub(kubeconfig: &Path, dir: &Path, replica: &str) -> Result<RunningHub> {
    let certs = raven_hub::certs::Layout {
        dir: dir.join("certs"),
    };
    if !certs.ca_cert().exists() {
        raven_hub::certs::generate(&dir.join("certs"), &["localhost".into()], &[])?;
    }
    Ok(hub::start(HubConfig {
        source: HubSource::Kubernetes {
            kubeconfig: Some(kubeconfig.to_owned()),
        },
        grpc_addr: "127.0.0.1:0".parse()?,
        plaintext_addr: None,
        http_addr: None,
        tls: TlsFiles {
            cert: certs.hub_cert(),
            key: certs.hub_key(),
            client_ca: vec![certs.ca_cert()],
            tickets: Some(dir.join(format!("data-{replica}")).join("tls-tickets.key")),
        },
        data_dir: Some(dir.join(format!("data-{replica}"))),
        sync: SyncConfig::default(),
        debounce: Debounce {
            quiet: Duration::from_millis(20),
            max_delay: Duration::from_millis(200),
        },
        replica: replica.into(),
        epoch: Some("kubernetes".into()),
        manifest_limits: Default::default(),
    })
    .await?)
}

/// Waits (at most [`WAIT`]) until the hub publishes a state that `f` accepts.
pub async fn until(
    hub: &RunningHub,
    what: &str,
    f: impl Fn(&raven_hub::pipeline::Published) -> bool,
) -> Result<()> {
    let mut rx = hub.published.clone();
    tokio::time::timeout(WAIT, rx.wait_for(|p| f(p)))
        .await
        .with_context(|| format!("timed out waiting for: {what}"))??;
    Ok(())
}

/// The real Kubernetes source feeding a fresh index (no pipeline, no gRPC).
pub struct Source {
    pub index: IndexHandle,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Source {
    pub fn start(client: kube::Client) -> Self {
        let index = IndexHandle::default();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(raven_hub::sources::kube::run(
            client,
            index.clone(),
            shutdown.clone(),
        ));
        Self {
            index,
            shutdown,
            task,
        }
    }

    /// [`Source::start`], then waits until every kind is synced.
    pub async fn synced(client: kube::Client) -> Result<Self> {
        let source = Self::start(client);
        source.until("every kind synced", Index::is_synced).await?;
        Ok(source)
    }

    /// Asserts the index holds the cluster both source tests fill: two
    /// domains, gw-a (a1, a2) and gw-b (b1), three nodes, and the tunnel on
    /// as kube-system's raven-cfg says (not the decoy in default). Returns
    /// what it read.
    pub fn assert_holds_the_two_domains(&self) -> Snapshot {
        let s = self.snapshot();
        assert_eq!(s.gateway_names(), ["gw-a", "gw-b"]);
        assert_eq!(s.gateways["gw-a"], ["a1", "a2"]);
        assert_eq!(s.nodes.len(), 3);
        assert_eq!(s.nodes["b1"], ["10.244.3.0/24"]);
        assert!(
            s.config_present && s.l3,
            "kube-system/raven-cfg is read, not the decoy in default: {s:?}"
        );
        assert!(self.index.read(Index::high_water) > 0);
        s
    }

    pub async fn until(&self, what: &str, f: impl Fn(&Index) -> bool) -> Result<()> {
        tokio::time::timeout(WAIT, async {
            while !self.index.read(&f) {
                tokio::select! {
                    () = self.index.changed() => {}
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        })
        .await
        .with_context(|| {
            format!(
                "timed out waiting for: {what}; index: {:?}",
                self.snapshot()
            )
        })
    }

    pub fn snapshot(&self) -> Snapshot {
        self.index.read(Snapshot::of)
    }

    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .context("the source did not stop")??;
        Ok(())
    }
}

/// What the index holds, comparably.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub synced: bool,
    pub fresh: bool,
    /// Gateway → endpoint node names.
    pub gateways: BTreeMap<String, Vec<String>>,
    /// Node → pod CIDRs.
    pub nodes: BTreeMap<String, Vec<String>>,
    pub config_present: bool,
    pub l3: bool,
}

impl Snapshot {
    pub fn of(index: &Index) -> Self {
        let (inputs, _) = index.inputs();
        Self {
            synced: index.is_synced(),
            fresh: index.is_fresh(),
            gateways: inputs
                .gateways
                .iter()
                .map(|(name, gw)| {
                    let eps = gw.gateway().spec.endpoints.iter();
                    let eps = eps.map(|e| e.node_name.clone());
                    (name.to_string(), eps.collect())
                })
                .collect(),
            nodes: inputs
                .nodes
                .iter()
                .map(|(name, n)| {
                    let cidrs = n.pod_cidrs.iter().map(ToString::to_string);
                    (name.to_string(), cidrs.collect())
                })
                .collect(),
            config_present: inputs.config.present,
            l3: inputs.config.enable_l3_tunnel,
        }
    }

    pub fn gateway_names(&self) -> Vec<&str> {
        self.gateways.keys().map(String::as_str).collect()
    }

    /// Everything but the sync flags.
    pub fn content(&self) -> Self {
        Self {
            synced: false,
            fresh: false,
            ..self.clone()
        }
    }
}
