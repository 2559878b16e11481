//! Output of the status commands, as kubectl does it: a table by default,
//! `-o wide` for more columns, `-o json` and `-o yaml` for the whole
//! document (the same fields in both).
//!
//! The YAML is written here from the JSON value (block style, strings
//! double-quoted as JSON writes them, which YAML reads the same), so neither
//! binary needs a YAML library.

use serde_json::Value;

/// `-o`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns.
    #[default]
    Table,
    /// The table with more columns.
    Wide,
    /// The whole document as JSON.
    Json,
    /// The whole document as YAML.
    Yaml,
}

/// Columns aligned kubectl-style: upper-case headers, three spaces between
/// columns, no trailing spaces; an empty cell is `-`.
#[derive(Debug, Clone, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| h.to_uppercase()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let cell = |c: &str| {
            if c.is_empty() {
                "-".to_owned()
            } else {
                c.to_owned()
            }
        };
        let rows: Vec<Vec<String>> = std::iter::once(self.header.clone())
            .chain(
                self.rows
                    .iter()
                    .map(|r| r.iter().map(|c| cell(c)).collect()),
            )
            .collect();
        let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..cols)
            .map(|i| {
                rows.iter()
                    .filter_map(|r| r.get(i))
                    .map(|c| c.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for r in &rows {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate() {
                line.push_str(c);
                if i + 1 < r.len() {
                    let pad = widths[i] - c.chars().count() + 3;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `v` as YAML (block style), ending with a newline.
pub fn to_yaml(v: &Value) -> String {
    let mut out = String::new();
    match v {
        Value::Object(m) if !m.is_empty() => yaml_map(m, 0, &mut out),
        Value::Array(a) if !a.is_empty() => yaml_seq(a, 0, &mut out),
        scalar => {
            out.push_str(&yaml_scalar(scalar));
            out.push('\n');
        }
    }
    out
}

fn yaml_scalar(v: &Value) -> String {
    match v {
        Value::Null => "null".to_owned(),
        Value::Object(_) => "{}".to_owned(),
        Value::Array(_) => "[]".to_owned(),
        // Numbers and booleans as JSON writes them; strings JSON-quoted,
        // which YAML reads as the same string.
        other => other.to_string(),
    }
}

fn is_block(v: &Value) -> bool {
    match v {
        Value::Object(m) => !m.is_empty(),
        Value::Array(a) => !a.is_empty(),
        _ => false,
    }
}

fn key(k: &str) -> String {
    let plain = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'))
        && !matches!(
            k,
            "true" | "false" | "null" | "yes" | "no" | "on" | "off" | "y" | "n"
        )
        && !k.starts_with(|c: char| c.is_ascii_digit() || c == '-');
    if plain {
        k.to_owned()
    } else {
        Value::String(k.to_owned()).to_string()
    }
}

fn yaml_map(m: &serde_json::Map<String, Value>, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    for (k, v) in m {
        out.push_str(&pad);
        out.push_str(&key(k));
        out.push(':');
        match v {
            Value::Object(inner) if !inner.is_empty() => {
                out.push('\n');
                yaml_map(inner, indent + 2, out);
            }
            Value::Array(inner) if !inner.is_empty() => {
                out.push('\n');
                yaml_seq(inner, indent, out);
            }
            scalar => {
                out.push(' ');
                out.push_str(&yaml_scalar(scalar));
                out.push('\n');
            }
        }
    }
}

fn yaml_seq(a: &[Value], indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    for v in a {
        out.push_str(&pad);
        out.push('-');
        match v {
            Value::Object(inner) if !inner.is_empty() => {
                // The first key on the dash's line, the rest below it.
                let mut first = String::new();
                yaml_map(inner, indent + 2, &mut first);
                out.push(' ');
                out.push_str(first.trim_start());
            }
            inner if is_block(inner) => {
                out.push('\n');
                if let Value::Array(items) = inner {
                    yaml_seq(items, indent + 2, out);
                }
            }
            scalar => {
                out.push(' ');
                out.push_str(&yaml_scalar(scalar));
                out.push('\n');
            }
        }
    }
}

/// Seconds as `4s`, `3m12s`, `2h5m`, `3d4h` (kubectl's AGE style).
pub fn age(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

/// Bytes as `512B`, `1.5KiB`, `3.2MiB`, `1.1GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1}{unit}")
}

/// Compares `got` with the golden file at `path` (the status views'
/// golden tests); with `UPDATE_GOLDEN` set, rewrites the file instead.
/// Panics with both texts when they differ.
pub fn check_golden(path: &std::path::Path, got: &str) {
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = std::fs::write(path, got) {
            panic!("write {}: {e}", path.display());
        }
        return;
    }
    let want = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e} (UPDATE_GOLDEN=1 creates it)", path.display()));
    assert!(
        want == got,
        "{} differs (UPDATE_GOLDEN=1 rewrites it after an intended change)\n--- want\n{want}\n--- got\n{got}",
        path.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_table_aligns_its_columns_and_marks_empty_cells() {
        let mut t = Table::new(&["node", "gateway", "connected"]);
        t.row(vec!["h1".into(), "gw-hangzhou".into(), "yes".into()]);
        t.row(vec!["edge-long-name".into(), String::new(), "no".into()]);
        assert_eq!(
            t.render(),
            "NODE             GATEWAY       CONNECTED\n\
             h1               gw-hangzhou   yes\n\
             edge-long-name   -             no\n"
        );
    }

    #[test]
    fn yaml_is_block_style_and_quotes_what_yaml_would_read_otherwise() {
        let v = json!({
            "node": "h1",
            "peers": [{"peer": "q1", "bytes": 12, "relayed": true}, {"peer": "c1", "tags": ["a", "b"]}],
            "empty": [],
            "none": null,
            "nested": {"x": {"y": "z: w"}},
            "true": "yes"
        });
        assert_eq!(
            to_yaml(&v),
            "empty: []\nnested:\n  x:\n    \"y\": \"z: w\"\nnode: \"h1\"\nnone: null\npeers:\n- bytes: 12\n  peer: \"q1\"\n  relayed: true\n- peer: \"c1\"\n  tags:\n  - \"a\"\n  - \"b\"\n\"true\": \"yes\"\n"
        );
    }

    #[test]
    fn ages_and_byte_counts_read_like_kubectl() {
        assert_eq!(age(4), "4s");
        assert_eq!(age(192), "3m12s");
        assert_eq!(age(7500), "2h5m");
        assert_eq!(age(273_600), "3d4h");
        assert_eq!(bytes(512), "512B");
        assert_eq!(bytes(1536), "1.5KiB");
        assert_eq!(bytes(3 * 1024 * 1024 + 200_000), "3.2MiB");
    }
}
