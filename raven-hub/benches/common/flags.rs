//! The benchmarks' command line: `--flag` words, some followed by a number.
//! Shared by every bench target (each includes this file with `#[path]`).

/// Walks the benchmark's arguments: calls `on` with each one and a way to
/// take the number that follows it (panics naming the flag when none does).
/// Arguments `on` does not know are to be ignored: cargo bench passes
/// `--bench`, and libtest-style filters mean nothing here.
pub fn parse(mut on: impl FnMut(&str, &mut dyn FnMut() -> usize)) {
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut number = || {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{flag} needs a number"))
        };
        on(&flag, &mut number);
    }
}
