//! Command line of `raven-hub`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::sources::manifests;

/// raven's cloud hub.
#[derive(Debug, Parser)]
#[command(name = "raven-hub", version, about)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Compile a directory of Gateway/Node/ConfigMap manifests and print the
    /// topology as JSON (stable, sorted). Problems also go to stderr.
    Compile {
        /// Directory of YAML manifests; without it, the embedded user-manual
        /// example (deploy/examples/user-manual) is compiled.
        #[arg(long, env = "RAVEN_MANIFESTS")]
        manifests: Option<PathBuf>,
        /// Exit with status 2 when any object has an error.
        #[arg(long)]
        strict: bool,
    },
}

impl Args {
    pub fn run(self) -> anyhow::Result<std::process::ExitCode> {
        match self.command {
            Command::Compile { manifests, strict } => compile(manifests.as_deref(), strict),
        }
    }
}

fn compile(dir: Option<&std::path::Path>, strict: bool) -> anyhow::Result<std::process::ExitCode> {
    let loaded = match dir {
        Some(dir) => manifests::read_dir(dir)?,
        None => raven_core::manifest::load(&crate::embedded::user_manual()),
    };
    let mut compiled = raven_core::compile(&loaded.inputs);
    compiled.topology.problems.extend(loaded.problems);
    compiled.topology.problems.sort();
    for p in &compiled.topology.problems {
        eprintln!("{p}");
    }
    print!("{}", compiled.topology.to_json());
    let errors = compiled
        .topology
        .problems
        .iter()
        .any(|p| p.severity == raven_core::Severity::Error);
    Ok(if strict && errors {
        std::process::ExitCode::from(2)
    } else {
        std::process::ExitCode::SUCCESS
    })
}
