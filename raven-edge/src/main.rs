use clap::Parser;

fn main() -> anyhow::Result<std::process::ExitCode> {
    raven_edge::args::Args::parse().run()
}
