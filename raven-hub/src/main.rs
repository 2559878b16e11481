use clap::Parser;

fn main() -> anyhow::Result<std::process::ExitCode> {
    raven_hub::args::Args::parse().run()
}
