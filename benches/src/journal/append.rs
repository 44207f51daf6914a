//! Spool append throughput against fio (figure 1) and CPU per GiB appended (figure 2).
//!
//! Each case appends `Event::Write` records of one size through [`Spool::append`] into a
//! fresh spool and group-commits with [`Spool::sync`] on a cadence: when 1 ms has passed
//! since the previous sync completed, or when 1 MiB of payload was appended since it. fio
//! then writes the same bytes in the same block size to a new file on the same filesystem,
//! with fdatasync after as many writes as we appended per sync. Ours and fio alternate for
//! a few repetitions and the medians are compared, because a shared disk's fdatasync latency
//! drifts from one second to the next. The commit-every-1-MiB cases also run with the
//! fdatasync on a commit thread ([`Spool::begin_sync`]), as an extra figure without a goal.

use std::path::Path;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tidemark_journal::log::SyncTicket;
use tidemark_journal::{Event, FsDir, JournalKey, Seq, Spool, SpoolConfig, SystemClock, VolumeId};

use super::{Env, GIB, MIB, mb_per_s, median, runs, size};
use crate::figure::{Figure, Goal};
use crate::fio::{self, SeqWrite};
use crate::sys;

/// When to group-commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Commit {
    /// 1 ms after the previous sync completed.
    EveryMs,
    /// After 1 MiB of payload.
    EveryMib,
}

impl Commit {
    fn slug(self) -> &'static str {
        match self {
            Commit::EveryMs => "1ms",
            Commit::EveryMib => "1mib",
        }
    }
}

/// What one spool run measured.
#[derive(Debug, Clone, Copy)]
struct SpoolRun {
    records: u64,
    payload_bytes: u64,
    syncs: u64,
    elapsed: Duration,
    /// CPU time of the loop minus the CPU time spent inside `Spool::sync`.
    cpu_outside_sync: Duration,
}

impl SpoolRun {
    fn mb_per_s(&self) -> f64 {
        mb_per_s(self.payload_bytes, self.elapsed)
    }

    fn records_per_sync(&self) -> f64 {
        self.records as f64 / self.syncs as f64
    }

    fn cpu_s_per_gib(&self) -> f64 {
        self.cpu_outside_sync.as_secs_f64() / (self.payload_bytes as f64 / GIB as f64)
    }
}

/// Where a due group commit waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// [`Spool::sync`] in the appending thread.
    Inline,
    /// [`Spool::begin_sync`] in the appending thread, the fdatasync on a commit thread,
    /// appends going on meanwhile; at most one sync in flight.
    CommitThread,
}

/// A commit thread fed with sync tickets, at most one in flight.
struct Committer {
    tickets: mpsc::Sender<SyncTicket>,
    done: mpsc::Receiver<tidemark_journal::Result<Seq>>,
    in_flight: bool,
}

impl Committer {
    fn spawn<'s>(scope: &'s std::thread::Scope<'s, '_>) -> Self {
        let (tickets, todo) = mpsc::channel::<SyncTicket>();
        let (report, done) = mpsc::channel();
        scope.spawn(move || {
            for ticket in todo {
                if report.send(ticket.wait()).is_err() {
                    break;
                }
            }
        });
        Self { tickets, done, in_flight: false }
    }

    /// Waits for the sync in flight, if any, and records its outcome.
    fn settle(&mut self, spool: &mut Spool) -> Result<()> {
        if std::mem::take(&mut self.in_flight) {
            let outcome = self.done.recv().context("the commit thread stopped")?;
            spool.end_sync(outcome)?;
        }
        Ok(())
    }

    /// Starts a group commit of everything appended so far.
    fn commit(&mut self, spool: &mut Spool) -> Result<()> {
        self.settle(spool)?;
        let ticket = spool.begin_sync()?;
        self.tickets.send(ticket).ok().context("the commit thread stopped")?;
        self.in_flight = true;
        Ok(())
    }
}

fn spool_run(
    dir: &Path,
    env: &Env<'_>,
    record: u64,
    commit: Commit,
    wait: Wait,
    key: Option<JournalKey>,
) -> Result<SpoolRun> {
    let total = env.scale.append_bytes;
    let cfg = SpoolConfig { capacity_bytes: 2 * total + GIB, segment_bytes: 64 * MIB, key };
    std::fs::create_dir_all(dir)?;
    let (mut spool, _) = Spool::open(Arc::new(FsDir::new(dir)?), cfg, Arc::new(SystemClock))?;
    let records = total / record;
    sys::settle(dir)?;
    let mut syncs = 0;
    let mut sync_cpu = Duration::ZERO;
    let mut since_sync = 0;
    let cpu_start = sys::cpu_time();
    let start = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        let mut committer = (wait == Wait::CommitThread).then(|| Committer::spawn(scope));
        let mut last_sync = start;
        for i in 0..records {
            let data = env.pool.get(i, record as usize);
            spool.append(&Event::Write { volume: VolumeId(0), offset: i * record, data })?;
            since_sync += record;
            let due = match commit {
                Commit::EveryMs => last_sync.elapsed() >= Duration::from_millis(1),
                Commit::EveryMib => since_sync >= MIB,
            };
            if due || i + 1 == records {
                let c = sys::cpu_time();
                match committer.as_mut() {
                    None => {
                        spool.sync()?;
                    }
                    Some(committer) => committer.commit(&mut spool)?,
                }
                sync_cpu += sys::cpu_time() - c;
                syncs += 1;
                since_sync = 0;
                last_sync = Instant::now();
            }
        }
        if let Some(committer) = committer.as_mut() {
            committer.settle(&mut spool)?;
        }
        Ok(())
    })?;
    let elapsed = start.elapsed();
    let cpu = sys::cpu_time() - cpu_start;
    drop(spool);
    std::fs::remove_dir_all(dir)?;
    Ok(SpoolRun {
        records,
        payload_bytes: records * record,
        syncs,
        elapsed,
        cpu_outside_sync: cpu.saturating_sub(sync_cpu),
    })
}

/// fio's equivalent of our run: the same bytes, block size and writes per fdatasync.
fn fio_run(env: &Env<'_>, record: u64, fdatasync_every: u64, ours: &SpoolRun) -> Result<f64> {
    let file = env.ctx.dir.join(format!("fio-{record}"));
    let job = SeqWrite {
        file: &file,
        block_size: record,
        total_bytes: ours.payload_bytes,
        fdatasync_every,
    };
    sys::settle(&env.ctx.dir)?;
    let r = fio::seq_write(&job)?;
    // fio skips the fdatasync that would coincide with its final fsync.
    let expected = ours.payload_bytes / record / fdatasync_every;
    if r.syncs + 1 < expected {
        bail!(
            "fio made {} fdatasyncs, {expected} expected: the comparison would be unfair",
            r.syncs
        );
    }
    Ok(r.bytes_per_sec / 1e6)
}

/// Repetitions of one case, ours and fio alternating.
#[derive(Debug, Default)]
struct Case {
    ours: Vec<SpoolRun>,
    /// The same with the fdatasync on a commit thread (commit every 1 MiB only).
    pipelined: Vec<SpoolRun>,
    fio_mb: Vec<f64>,
    fio_every: Vec<u64>,
}

impl Case {
    fn mb_per_s(&self) -> f64 {
        median(self.ours.iter().map(SpoolRun::mb_per_s))
    }

    fn pipelined_mb_per_s(&self) -> f64 {
        median(self.pipelined.iter().map(SpoolRun::mb_per_s))
    }

    fn fio_mb_per_s(&self) -> Option<f64> {
        (!self.fio_mb.is_empty()).then(|| median(self.fio_mb.iter().copied()))
    }

    fn cpu_s_per_gib(&self) -> f64 {
        median(self.ours.iter().map(SpoolRun::cpu_s_per_gib))
    }

    fn spread(values: impl Iterator<Item = f64>) -> String {
        values.map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(", ")
    }
}

fn run_case(
    env: &Env<'_>,
    record: u64,
    commit: Commit,
    key: Option<JournalKey>,
    with_fio: bool,
) -> Result<Case> {
    let dir = env.ctx.dir.join(format!("spool-{record}-{}", commit.slug()));
    let mut case = Case::default();
    for _ in 0..env.scale.reps {
        let ours = spool_run(&dir, env, record, commit, Wait::Inline, key.clone())?;
        if with_fio && commit == Commit::EveryMib {
            case.pipelined.push(spool_run(
                &dir,
                env,
                record,
                commit,
                Wait::CommitThread,
                key.clone(),
            )?);
        }
        if with_fio && env.fio {
            let every = match commit {
                Commit::EveryMib => MIB / record,
                Commit::EveryMs => ours.records_per_sync().round().max(1.0) as u64,
            };
            case.fio_mb.push(fio_run(env, record, every, &ours)?);
            case.fio_every.push(every);
        }
        case.ours.push(ours);
    }
    Ok(case)
}

/// The reference string of a case: what fio ran and what it measured.
fn reference(env: &Env<'_>, record: u64, commit: Commit, case: &Case) -> String {
    let ours = &case.ours[0];
    let cadence = match commit {
        Commit::EveryMib => format!("--fdatasync={} (= every 1 MiB)", MIB / record),
        Commit::EveryMs => {
            let per_mib: Vec<String> = case
                .ours
                .iter()
                .map(|r| format!("{:.2}", r.syncs as f64 / (r.payload_bytes as f64 / MIB as f64)))
                .collect();
            format!(
                "--fdatasync=N with N = the records per sync of our run just before it ({}; \
                 our syncs per MiB: {}; we sync 1 ms after the previous sync completed)",
                if case.fio_every.is_empty() {
                    "not run".to_owned()
                } else {
                    case.fio_every.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
                },
                per_mib.join(", ")
            )
        }
    };
    let what = format!(
        "fio sequential {} writes, {} to a new file on the same {} filesystem, {cadence}; \
         options {} (the job's open creates the file, nothing is preallocated or laid out, \
         every write extends the file as our segment appends do)",
        size(record),
        size(ours.payload_bytes),
        env.ctx.fs_type,
        fio::APPEND_LIKE_OPTIONS.join(" ")
    );
    match case.fio_mb_per_s() {
        None => format!("SKIPPED: fio not installed ({what})"),
        Some(m) => format!(
            "{what}: {m:.1} MB/s, {} ({} MB/s)",
            runs(case.fio_mb.len()),
            Case::spread(case.fio_mb.iter().copied())
        ),
    }
}

fn throughput_note(case: &Case, encrypted: bool) -> String {
    let r = &case.ours[0];
    format!(
        "{} ({} MB/s), alternating with fio; {} records per run through \
         Spool::append + Spool::sync{}, 64 MiB segments; MB/s of payload (10^6 B/s; each \
         record adds a 48-byte header{}); {} syncs per run",
        runs(case.ours.len()),
        Case::spread(case.ours.iter().map(SpoolRun::mb_per_s)),
        r.records,
        if encrypted { " with encryption at rest (AES-256-GCM)" } else { "" },
        if encrypted { " and a 16-byte tag" } else { "" },
        Case::spread(case.ours.iter().map(|r| r.syncs as f64))
    )
}

/// The commit-every-1-MiB case with the fdatasync on a commit thread: not the goal figure
/// (which uses the blocking [`Spool::sync`]), but what the split group commit buys.
fn pipelined_figure(env: &Env<'_>, record: u64, case: &Case) -> Figure {
    let k = record / 1024;
    let mb = case.pipelined_mb_per_s();
    eprintln!("[journal] append {k} KiB, commit every 1mib on a commit thread: {mb:.1} MB/s");
    Figure::new(format!("append_{k}k_commit_1mib_pipelined"), mb, "MB/s")
        .compared(
            format!(
                "the fio runs of append_{k}k_commit_1mib: {}",
                reference(env, record, Commit::EveryMib, case)
            ),
            case.fio_mb_per_s().map(|f| mb / f),
        )
        .note(format!(
            "as append_{k}k_commit_1mib, but each group commit is Spool::begin_sync in the \
             appending thread, SyncTicket::wait (the fdatasync) on a commit thread and \
             Spool::end_sync before the next begin_sync, so appends go on during the \
             fdatasync (at most one in flight); {} ({} MB/s)",
            runs(case.pipelined.len()),
            Case::spread(case.pipelined.iter().map(SpoolRun::mb_per_s))
        ))
}

fn cpu_figure(k: u64, case: &Case, encrypted: bool) -> Figure {
    let name = format!("append_cpu_{k}k{}", if encrypted { "_encrypted" } else { "" });
    Figure::new(name, case.cpu_s_per_gib(), "CPU s/GiB").note(format!(
        "{}; user+sys (getrusage RUSAGE_SELF) of the append loop with commit \
         every 1 MiB, minus the user+sys measured around each Spool::sync call; includes the \
         buffered pwrite of each full 1 MiB write buffer, excludes kernel writeback threads",
        runs(case.ours.len())
    ))
}

pub fn run(env: &Env<'_>) -> Result<Vec<Figure>> {
    let mut figures = Vec::new();
    let mut cpu_figures = Vec::new();
    let mut pipelined_figures = Vec::new();
    let mut plain_mib = Vec::new();
    for record in [4096, 64 * 1024] {
        let k = record / 1024;
        for commit in [Commit::EveryMs, Commit::EveryMib] {
            let case = run_case(env, record, commit, None, true)?;
            let fio_mb = case.fio_mb_per_s();
            eprintln!(
                "[journal] append {k} KiB, commit every {}: {:.1} MB/s (fio {})",
                commit.slug(),
                case.mb_per_s(),
                fio_mb.map(|m| format!("{m:.1} MB/s")).unwrap_or_else(|| "skipped".into())
            );
            figures.push(
                Figure::new(
                    format!("append_{k}k_commit_{}", commit.slug()),
                    case.mb_per_s(),
                    "MB/s",
                )
                .compared(
                    reference(env, record, commit, &case),
                    fio_mb.map(|f| case.mb_per_s() / f),
                )
                .goal(Goal::AtLeast(0.9))
                .note(throughput_note(&case, false)),
            );
            if commit == Commit::EveryMib {
                cpu_figures.push(cpu_figure(k, &case, false));
                pipelined_figures.push(pipelined_figure(env, record, &case));
                plain_mib.push((record, case));
            }
        }
    }
    for (record, plain) in plain_mib {
        let k = record / 1024;
        let key = JournalKey::from_bytes([0x5a; 32]);
        let case = run_case(env, record, Commit::EveryMib, Some(key), false)?;
        eprintln!(
            "[journal] append {k} KiB encrypted, commit every 1mib: {:.1} MB/s",
            case.mb_per_s()
        );
        let fio_mb = plain.fio_mb_per_s();
        figures.push(
            Figure::new(format!("append_{k}k_commit_1mib_encrypted"), case.mb_per_s(), "MB/s")
                .compared(
                    format!(
                        "the fio runs of append_{k}k_commit_1mib: {}",
                        reference(env, record, Commit::EveryMib, &plain)
                    ),
                    fio_mb.map(|f| case.mb_per_s() / f),
                )
                .note(throughput_note(&case, true)),
        );
        cpu_figures.push(cpu_figure(k, &case, true));
    }
    figures.extend(pipelined_figures);
    figures.extend(cpu_figures);
    Ok(figures)
}
