//! The standalone source's change path: one manifest file changed → a new
//! revision published, in process (no agents), at G gateways × N nodes,
//! one file per gateway (the fan-out benchmark's cluster generator).
//!
//! ```text
//! cargo bench -p raven-hub --bench manifest -- [--gateways G] [--nodes N] [--changes C]
//! ```
//!
//! Each change rewrites one gateway's file (write + rename, a member's pod
//! CIDR moved) and times, in the hub's own order: the source's poll (`stat`
//! the directory, read and parse the changed file, merge its objects), the
//! index update, and the pipeline's recompile (compile, revision fsync,
//! encoding, delta) until the new revision is published. Baselines in the
//! same run: reading and parsing that one file alone, and the full re-parse
//! the source did before (every file read and parsed, every object reset
//! into the index). Prints medians and ratios; never asserts a time.

#[allow(dead_code)] // shared with the fan-out benchmark, which uses all of it
#[path = "../fanout/cluster.rs"]
mod cluster;
#[path = "../common/flags.rs"]
mod flags;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use cluster::Shape;
use raven_hub::index::{Index, IndexHandle};
use raven_hub::pipeline::{Debounce, Pipeline};
use raven_hub::sources::manifests::{DirSource, Limits};

struct Opts {
    shape: Shape,
    changes: usize,
}

fn opts() -> Opts {
    let mut o = Opts {
        shape: Shape {
            gateways: 1000,
            nodes: 10,
        },
        changes: 20,
    };
    flags::parse(|flag, num| match flag {
        "--gateways" => o.shape.gateways = num().max(1),
        "--nodes" => o.shape.nodes = num(),
        "--changes" => o.changes = num().max(1),
        _ => {}
    });
    o
}

/// Backdates every file out of the source's racy window, as files written
/// long ago are (a file written within 2 s of its read is read again on
/// every poll, which would time the generator, not a change).
fn age_all(dir: &Path) {
    for e in std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(Result::ok)
    {
        age(&e.path());
    }
}

fn age(path: &Path) {
    let past = SystemTime::now() - Duration::from_secs(600);
    let f = std::fs::File::options()
        .write(true)
        .open(path)
        .expect("open");
    f.set_modified(past).expect("set mtime");
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn ratio(a: Duration, b: Duration) -> String {
    if b.is_zero() {
        return "—".to_owned();
    }
    format!("{:.3}×", a.as_secs_f64() / b.as_secs_f64())
}

/// The source before: every file read and parsed into one load, and every
/// object reset into the index.
fn full_reparse(dir: &Path, index: &mut Index) {
    let mut files: Vec<(String, String)> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .map(|n| {
            let text = std::fs::read_to_string(dir.join(&n)).expect("read");
            (n, text)
        })
        .collect();
    files.sort();
    let loaded = raven_core::manifest::load(&files);
    index.reset_admitted_gateways(loaded.inputs.gateways, loaded.inputs.rejected);
    index.reset_cluster_nodes(loaded.inputs.nodes.into_values());
    index.set_raven_config(loaded.inputs.config);
    index.set_source_problems(loaded.problems);
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let o = opts();
    let shape = o.shape;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("manifests");
    let setup = Instant::now();
    cluster::write(&dir, shape).expect("write cluster");
    age_all(&dir);
    let generated = setup.elapsed();
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    println!(
        "raven manifest change: {} gateways × {} nodes ({} nodes, {} files), {} changes; {cpus} CPUs; cluster written in {}",
        shape.gateways,
        shape.nodes,
        shape.gateways * shape.nodes,
        shape.gateways + 1,
        o.changes,
        ms(generated)
    );

    let mut source = DirSource::new(dir.clone(), Limits::default());
    let index = IndexHandle::default();
    let started = Instant::now();
    let first = source.load().expect("load");
    index.update(|i| {
        i.apply_manifest_change(first);
        for k in raven_hub::index::Kind::SOURCES {
            i.mark_synced(k);
        }
    });
    let first_load = started.elapsed();
    let revisions =
        raven_hub::revision::Revisions::open(&tmp.path().join("data"), None).expect("revisions");
    let (mut pipeline, published) = Pipeline::new(
        index.clone(),
        revisions,
        Debounce::default(),
        Duration::from_secs(30),
    );
    let started = Instant::now();
    pipeline.recompile().expect("first compile");
    let first_compile = started.elapsed();
    println!(
        "first read of the directory: {} ({} files parsed); first compile: {} ({} resources)",
        ms(first_load),
        source.work().parses,
        ms(first_compile),
        published.borrow().topology.resources.len()
    );

    let (mut poll, mut apply, mut recompile, mut total) = (vec![], vec![], vec![], vec![]);
    let (mut compile_only, mut one_file, mut full) = (vec![], vec![], vec![]);
    let mut work_per_change = Vec::new();
    let mut phases = Vec::new();
    for c in 0..o.changes {
        let g = (c * 7919) % shape.gateways;
        let alt = (c / shape.gateways).is_multiple_of(2);
        cluster::rewrite(&dir, shape, g, alt.then_some(shape.nodes.saturating_sub(1)))
            .expect("rewrite");
        let before_rev = published.borrow().revision;
        let before = source.work();

        let t0 = Instant::now();
        let change = source.poll().expect("poll").expect("the change is seen");
        let t1 = Instant::now();
        index.update(|i| i.apply_manifest_change(change));
        let t2 = Instant::now();
        assert!(pipeline.recompile().expect("recompile"), "published");
        let t3 = Instant::now();
        phases.push(pipeline.phases());
        assert!(published.borrow().revision > before_rev, "a new revision");
        poll.push(t1 - t0);
        apply.push(t2 - t1);
        recompile.push(t3 - t2);
        total.push(t3 - t0);
        let after = source.work();
        work_per_change.push((after.reads - before.reads, after.parses - before.parses));

        // Baselines, same files, same run.
        let path = cluster::gateway_path(&dir, g);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let t = Instant::now();
        let text = std::fs::read_to_string(&path).expect("read");
        let parsed = raven_core::manifest::parse_file(&name, &text, Default::default());
        one_file.push(t.elapsed());
        assert!(!parsed.objects.is_empty());
        let (inputs, _) = index.read(Index::inputs);
        let t = Instant::now();
        let compiled = raven_core::compile(&inputs);
        compile_only.push(t.elapsed());
        assert!(!compiled.topology.resources.is_empty());
        if c < 5 {
            // The full re-parse is slow: a few rounds are enough.
            let mut scratch = index.read(Clone::clone);
            let t = Instant::now();
            full_reparse(&dir, &mut scratch);
            full.push(t.elapsed());
        }
        // Out of the racy window before the next change (a later poll would
        // otherwise read this file again).
        age(&path);
        source.poll().expect("poll");
    }
    let reads = work_per_change.iter().map(|w| w.0).max().unwrap_or(0);
    let parses = work_per_change.iter().map(|w| w.1).max().unwrap_or(0);
    let (poll, apply, recompile, total) = (
        median(poll),
        median(apply),
        median(recompile),
        median(total),
    );
    let (compile_only, one_file, full) = (median(compile_only), median(one_file), median(full));
    println!(
        "| one file changed → new revision published (median of {}) | time | ÷ read+parse one file |",
        o.changes
    );
    println!("|---|---|---|");
    println!(
        "| source poll: stat {} files, read {reads}, parse {parses}, merge | {} | {} |",
        shape.gateways + 1,
        ms(poll),
        ratio(poll, one_file)
    );
    println!(
        "| index update (the changed file's objects) | {} | {} |",
        ms(apply),
        ratio(apply, one_file)
    );
    println!(
        "| pipeline recompile (compile, revision fsync, encode, delta) | {} | {} |",
        ms(recompile),
        ratio(recompile, one_file)
    );
    println!(
        "| **total: change → published** | **{}** | {} |",
        ms(total),
        ratio(total, one_file)
    );
    type Phase = fn(&raven_hub::pipeline::Phases) -> Duration;
    let rows: [(&str, Phase); 6] = [
        ("read the index (inputs, stream liveness)", |p| p.inputs),
        ("observed gateways, last election, held subnets", |p| {
            p.prepare
        }),
        ("incremental compile + election log", |p| p.compile),
        ("advance + persist the revision", |p| p.revision),
        ("encode, deltas, interned names", |p| p.encode),
        ("compare with the last state, send", |p| p.publish),
    ];
    let sent = median(
        phases
            .iter()
            .map(|p| p.inputs + p.prepare + p.compile + p.revision + p.encode + p.publish)
            .collect(),
    );
    println!(
        "| of the recompile: until the new state is sent (freeing the old one follows on another thread) | {} | {} of the recompile |",
        ms(sent),
        ratio(sent, recompile)
    );
    for (what, phase) in rows {
        let d = median(phases.iter().map(phase).collect());
        println!(
            "| of the recompile: {what} | {} | {} of the recompile |",
            ms(d),
            ratio(d, recompile)
        );
    }
    println!("| baseline | time | source poll ÷ baseline |");
    println!("|---|---|---|");
    println!(
        "| read + parse the one changed file alone | {} | {} |",
        ms(one_file),
        ratio(poll, one_file)
    );
    println!(
        "| full re-parse, the source before (read + parse every file, reset the index) | {} | {} |",
        ms(full),
        ratio(poll + apply, full)
    );
    println!(
        "| of the recompile: `raven_core::compile` of the whole topology alone | {} | {} of the recompile |",
        ms(compile_only),
        ratio(compile_only, recompile)
    );
}
