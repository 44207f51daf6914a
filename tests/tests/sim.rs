//! The deterministic fault simulation (`tidemark_tests::sim`) as tests: a fixed budget of
//! seeds with every fault on, reproducibility of a seed, and planted bugs that the checks
//! must catch (so the simulation is known to be able to fail).
//!
//! `cargo xtask sim --seeds N` runs more seeds and `cargo xtask sim --seed S` replays one,
//! through the environment variables read by `sim_seed_budget`.

use tidemark_tests::figures::report;
use tidemark_tests::sim::{self, PlantedBug, SimConfig, SimReport};

/// Seeds run in CI (about 8 s here, well under 30 s on a loaded 2-core machine).
const CI_SEEDS: u64 = 150;
/// First seed of the CI budget.
const CI_FIRST_SEED: u64 = 1;

fn seeds_from_env() -> (Vec<u64>, bool) {
    if let Ok(s) = std::env::var("TIDEMARK_SIM_SEED") {
        let seed = s.parse().expect("TIDEMARK_SIM_SEED is a number");
        return (vec![seed], true);
    }
    let n = std::env::var("TIDEMARK_SIM_SEEDS")
        .ok()
        .map(|s| s.parse::<u64>().expect("TIDEMARK_SIM_SEEDS is a number"))
        .unwrap_or(CI_SEEDS);
    let first = std::env::var("TIDEMARK_SIM_FIRST_SEED")
        .ok()
        .map(|s| s.parse::<u64>().expect("TIDEMARK_SIM_FIRST_SEED is a number"))
        .unwrap_or(CI_FIRST_SEED);
    ((first..first + n).collect(), false)
}

fn print_report(r: &SimReport, verbose: bool) {
    if verbose || !r.passed() {
        println!(
            "sim seed {}: {} trace {} steps {} faults {} app writes {} acked {} points {} resyncs {} refused batches {} acks {} duplicates {}",
            r.seed,
            if r.passed() { "ok" } else { "FAILED" },
            r.trace_hash,
            r.steps,
            r.faults.total(),
            r.app_writes,
            r.acked_events,
            r.points_checked,
            r.resyncs,
            r.batches_refused,
            r.acks_refused,
            r.duplicates_dropped,
        );
        if verbose {
            println!("  faults: {:?}", r.faults);
        }
    }
    for f in &r.failures {
        println!("  FAILURE {f}");
        println!("  replay with: {}", r.replay_command());
    }
}

#[test]
fn sim_seed_budget() {
    let (seeds, single) = seeds_from_env();
    let started = std::time::Instant::now();
    let reports = sim::run_seeds(seeds, None);
    let mut failed = Vec::new();
    for r in &reports {
        print_report(r, single);
        if !r.passed() {
            failed.push(r.seed);
        }
    }
    let faults: u64 = reports.iter().map(|r| r.faults.total()).sum();
    let lost: u64 = reports.iter().map(|r| r.acked_writes_lost).sum();
    let points: u64 = reports.iter().map(|r| r.points_checked).sum();
    let acked: u64 = reports.iter().map(|r| r.acked_events).sum();
    // Summed by `cargo xtask reliability` with the other tests' figures; the lost writes
    // join the other scenarios' `acknowledged_writes_lost`, whose goal is 0.
    report("sim.seeds_simulated", reports.len() as u64);
    report("sim.faults_injected", faults);
    report("sim.recovery_points_checked", points);
    report("sim.acked_events", acked);
    report("acknowledged_writes_lost", lost);
    report("sim.failed_seeds", failed.len() as u64);
    let grows: u64 = reports.iter().map(|r| r.faults.grows).sum();
    report("sim.disk_grows", grows);
    println!("sim: {} seeds in {:.1?}", reports.len(), started.elapsed());
    assert!(
        failed.is_empty(),
        "simulation failed for seed(s) {failed:?}; replay one with `{}`",
        sim::replay_command(failed[0])
    );
    assert_eq!(lost, 0, "acknowledged writes lost");
    assert!(faults > 0, "the runs injected no fault at all");
    assert!(reports.len() < 20 || grows > 0, "no run grew its volume (the disk-resize fault)");
}

#[test]
fn same_seed_same_trace() {
    let cfg = SimConfig { steps: 250, ..SimConfig::new(42) };
    let a = sim::run(&cfg);
    let b = sim::run(&cfg);
    assert_eq!(a.trace_hash, b.trace_hash, "seed 42 ran two different ways");
    assert_eq!(a.faults, b.faults);
    let other = sim::run(&SimConfig { seed: 43, ..cfg });
    assert_ne!(a.trace_hash, other.trace_hash, "seeds 42 and 43 gave the same trace");
}

/// Runs seeds with `bug` planted until one where it took effect; that run must fail, name
/// its seed and print the replay command.
fn planted_bug_is_caught(bug: PlantedBug, max_seeds: u64) -> SimReport {
    for seed in 1..=max_seeds {
        let r = sim::run(&SimConfig { planted_bug: Some(bug), ..SimConfig::new(seed) });
        if !r.planted_fired {
            continue;
        }
        if r.passed() {
            // A dropped write can be overwritten and a lost ack never crashed over: the bug
            // must show in some seed, not in every one.
            continue;
        }
        print_report(&r, false);
        let f = &r.failures[0];
        assert!(f.contains(&format!("seed {seed}")), "failure does not name its seed: {f}");
        assert!(f.contains(&sim::replay_command(seed)), "failure has no replay command: {f}");
        return r;
    }
    panic!("{bug:?} planted in seeds 1..={max_seeds} was never caught by the checks");
}

#[test]
fn planted_dropped_write_is_caught() {
    let r = planted_bug_is_caught(PlantedBug::DropWrite, 40);
    assert!(r.failures[0].contains("differs"), "expected a content mismatch, got {:?}", r.failures);
}

#[test]
fn planted_ack_before_sync_is_caught() {
    let r = planted_bug_is_caught(PlantedBug::AckBeforeSync, 40);
    assert!(r.acked_writes_lost > 0 || r.failures[0].contains("acknowledg"), "{:?}", r.failures);
}
