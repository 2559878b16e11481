//! Metrics exposition shared by both binaries: the metrics are
//! `prometheus-client` types in a `Registry`; this module writes them in the
//! format the scraper asks for.
//!
//! - `Accept: application/openmetrics-text` (Prometheus itself asks for it
//!   first): OpenMetrics 1.0, as `prometheus-client` encodes it.
//! - Anything else (curl, `promtool check metrics`, older scrapers): the
//!   classic Prometheus text format 0.0.4 with `text/plain; version=0.0.4`.
//!   It differs from OpenMetrics where `promtool` reads it: a counter's
//!   `HELP`/`TYPE` lines name the `_total` sample, there are no `# UNIT` or
//!   `# EOF` lines, and an info metric is a gauge named `…_info`.
//!
//! Every binary also exports `<prefix>_build_info{version,rust_version} 1`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Content type of OpenMetrics text.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the classic Prometheus text format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Labels of `*_build_info`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    rust_version: String,
}

/// Registers `build_info` (1, labelled with `version` — the binary's crate
/// version — and the minimum Rust version it was built for).
pub fn register_build_info(registry: &mut Registry, version: &str, rust_version: &str) {
    let family = Family::<BuildLabels, Gauge>::default();
    family
        .get_or_create(&BuildLabels {
            version: version.to_owned(),
            rust_version: rust_version.to_owned(),
        })
        .set(1);
    registry.register(
        "build_info",
        "Build of this binary (always 1; the labels carry the version)",
        family,
    );
}

/// The body and content type for a scrape sending `accept`.
pub fn render(registry: &Registry, accept: Option<&str>) -> (&'static str, String) {
    let mut om = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut om, registry);
    if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
        (OPENMETRICS, om)
    } else {
        (PROMETHEUS_TEXT, openmetrics_to_classic(&om))
    }
}

/// Rewrites `prometheus-client`'s OpenMetrics text as the classic format.
pub fn openmetrics_to_classic(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let mut help: Option<(&str, &str)> = None;
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" if !name.ends_with("_total") => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "unknown" => (name.to_owned(), "untyped"),
                other => (name.to_owned(), other),
            };
            if let Some((_, text)) = help.take() {
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        if let Some((name, text)) = help.take() {
            out.push_str(&format!("# HELP {name} {text}\n"));
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Runs `promtool check metrics` on `text`: `None` when promtool is not
/// installed, else its verdict (`Err` with what it printed). For the tests
/// that check both binaries' real `/metrics` output.
pub fn promtool_check(text: &str) -> Option<Result<(), String>> {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(text.as_bytes());
    }
    let out = match child.wait_with_output() {
        Ok(out) => out,
        Err(e) => return Some(Err(format!("promtool: {e}"))),
    };
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // promtool exits 0 on lint warnings too; anything it says is a finding.
    Some(if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(said)
    })
}

/// [`promtool_check`] for tests: panics with promtool's findings; without
/// promtool, says so and returns, unless `RAVEN_REQUIRE_TOOLS` is set (CI),
/// then panics.
pub fn assert_promtool_clean(text: &str) {
    match promtool_check(text) {
        Some(Ok(())) => {}
        Some(Err(e)) => panic!("promtool check metrics: {e}\n{text}"),
        None => {
            assert!(
                std::env::var_os("RAVEN_REQUIRE_TOOLS").is_none(),
                "promtool is required (RAVEN_REQUIRE_TOOLS is set) but not installed"
            );
            eprintln!("skipped the promtool check: promtool is not installed (.ci/run shows how)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn a_counter_is_named_with_its_total_suffix_in_help_and_type_lines_of_the_classic_format() {
        let mut r = Registry::with_prefix("raven_test");
        let c: Counter = Counter::default();
        c.inc_by(3);
        r.register("pushes", "Updates sent", c);
        register_build_info(&mut r, "1.2.3", "1.89");
        let (ct, text) = render(&r, None);
        assert_eq!(ct, PROMETHEUS_TEXT);
        assert_eq!(
            text,
            "# HELP raven_test_pushes_total Updates sent.\n# TYPE raven_test_pushes_total counter\nraven_test_pushes_total 3\n\
             # HELP raven_test_build_info Build of this binary (always 1; the labels carry the version).\n# TYPE raven_test_build_info gauge\n\
             raven_test_build_info{version=\"1.2.3\",rust_version=\"1.89\"} 1\n"
        );
        let (ct, om) = render(
            &r,
            Some("application/openmetrics-text; version=1.0.0,text/plain;q=0.5"),
        );
        assert_eq!(ct, OPENMETRICS);
        assert!(
            om.contains("# TYPE raven_test_pushes counter\nraven_test_pushes_total 3\n"),
            "{om}"
        );
        assert!(om.ends_with("# EOF\n"), "{om}");
    }
}
