//! The fuzz corpora as plain tests.
//!
//! Every committed seed input in `fuzz/corpus/<target>/`, and every minimized crash input kept
//! in `fuzz/regressions/<target>/`, is fed to the same function its cargo-fuzz target calls.
//! This runs on stable without cargo-fuzz, so the parsers stay covered even where fuzzing
//! itself cannot run, and a crash once found by the fuzzer stays fixed.
//!
//! A target whose seed corpus is empty (apart from `.gitkeep`) fails: a fuzz target without
//! seeds would make this test vacuous.

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// What a fuzz target calls with the fuzzer's bytes; must never panic.
type FuzzFn = fn(&[u8]);

/// Every fuzz target in `fuzz/fuzz_targets/`, by name, with the function it calls.
const TARGETS: &[(&str, FuzzFn)] = &[
    ("journal_segment", tidemark_journal::format::fuzz_segment),
    ("journal_manifest", tidemark_journal::format::fuzz_manifest),
    ("dmlog", tidemark_tap::dmlog::fuzz_dmlog),
    ("intent_map", tidemark_tap::intent::fuzz_intent_map),
    ("wire_frame", tidemark_sync::wire::codec::fuzz_frame),
    ("handshake", tidemark_sync::secure::fuzz_handshake),
    ("ext4_view", tidemark_sync::resync::ext4::fuzz_ext4_view),
    ("config", tidemark::config::fuzz_config),
];

/// The `fuzz/` directory of the workspace.
fn fuzz_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    dir.canonicalize().unwrap_or(dir)
}

/// The input files in `dir`, sorted; none if `dir` does not exist. Hidden files (`.gitkeep`,
/// scratch directories) are not inputs.
fn inputs_in(dir: &Path) -> Vec<PathBuf> {
    if !dir.exists() {
        return Vec::new();
    }
    let mut inputs: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.is_file())
        .filter(|path| {
            !path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
        })
        .collect();
    inputs.sort();
    inputs
}

/// Feeds the seed corpus and the regression inputs of `target` to `fuzz`, reporting every
/// input that panics.
fn run_corpus(target: &str) {
    let fuzz = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, f)| *f)
        .unwrap_or_else(|| panic!("`{target}` is not in TARGETS"));
    let corpus_dir = fuzz_dir().join("corpus").join(target);
    let regressions_dir = fuzz_dir().join("regressions").join(target);

    let seeds = inputs_in(&corpus_dir);
    assert!(
        !seeds.is_empty(),
        "the seed corpus of fuzz target `{target}` is missing: {} holds no input files \
         (only .gitkeep, or nothing). Generate the seed files and commit them.",
        corpus_dir.display()
    );
    let regressions = inputs_in(&regressions_dir);

    let mut panicked = Vec::new();
    for path in seeds.iter().chain(&regressions) {
        let data = fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        if panic::catch_unwind(AssertUnwindSafe(|| fuzz(&data))).is_err() {
            panicked.push(path.display().to_string());
        }
    }
    println!(
        "fuzz target `{target}`: ran {} inputs ({} seeds, {} regressions)",
        seeds.len() + regressions.len(),
        seeds.len(),
        regressions.len()
    );
    tidemark_tests::figures::report("bad_inputs_tried", (seeds.len() + regressions.len()) as u64);
    assert!(
        panicked.is_empty(),
        "fuzz target `{target}` panicked on {} input(s):\n  {}",
        panicked.len(),
        panicked.join("\n  ")
    );
}

#[test]
fn journal_segment_corpus() {
    run_corpus("journal_segment");
}

#[test]
fn journal_manifest_corpus() {
    run_corpus("journal_manifest");
}

#[test]
fn dmlog_corpus() {
    run_corpus("dmlog");
}

#[test]
fn intent_map_corpus() {
    run_corpus("intent_map");
}

#[test]
fn wire_frame_corpus() {
    run_corpus("wire_frame");
}

#[test]
fn handshake_corpus() {
    run_corpus("handshake");
}

/// Keeps [`TARGETS`] in step with `fuzz/fuzz_targets/`: a new fuzz target must get its corpus
/// run here too.
#[test]
fn every_fuzz_target_is_covered() {
    let targets_dir = fuzz_dir().join("fuzz_targets");
    let mut on_disk: Vec<String> = fs::read_dir(&targets_dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", targets_dir.display()))
        .filter_map(|entry| {
            let path = entry.expect("directory entry").path();
            (path.extension()? == "rs").then(|| path.file_stem()?.to_str().map(str::to_owned))?
        })
        .collect();
    on_disk.sort();
    let mut covered: Vec<String> = TARGETS.iter().map(|(name, _)| (*name).to_owned()).collect();
    covered.sort();
    assert_eq!(
        on_disk,
        covered,
        "fuzz targets in {} and TARGETS in tests/tests/fuzz_corpus.rs differ",
        targets_dir.display()
    );
}

#[test]
fn ext4_view_corpus() {
    run_corpus("ext4_view");
}

#[test]
fn config_corpus() {
    run_corpus("config");
}
