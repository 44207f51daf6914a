//! Lineages: which history each side of a pair holds, so that two sides that both took
//! writes after they parted (split brain) are told apart from a failback, and never merged.
//!
//! A lineage is a chain of [`Generation`]s, root first. A `protect` of a new volume starts
//! the root; `promote` starts a child of the generation it promoted, branching at the
//! promoted seq; a source that goes on writing after losing its target stays in its
//! generation (its seqs go on). Each side also says how far into its current generation
//! its data goes (`head`) and whether it may hold writes that no seq counts (`dirty`: a
//! promoted image used live, an image written while nothing captured it).
//!
//! The two lineages meet in the opening exchange (messages 12 and 13,
//! `docs/wire-protocol.md` 5.9 and 6.3); the target decides with [`decide`], the same pure
//! function the source runs to report the outcome:
//!
//! | target's lineage vs the source's | verdict |
//! |---|---|
//! | empty (a blank target) | [`Verdict::Adopt`] |
//! | same current generation | [`Verdict::Same`] |
//! | an ancestor of it, target's head at or before the branch, not dirty | [`Verdict::Resync`] (failback) |
//! | an ancestor of it, target wrote past the branch (head or dirty) | split brain |
//! | a descendant of it (the target was promoted), source wrote past the branch | split brain |
//! | a descendant of it, source did not write past the branch | the source is stale |
//! | branched from a common generation on both sides | split brain |
//! | no common root, target not dirty (a plain replica of another history) | [`Verdict::Adopt`] |
//! | no common root, target dirty | unrelated |
//!
//! A conflict becomes [`Verdict::Resync`] when the operator chose the source as the winner
//! (`source_wins` from either side). A `Resync` needs a source that compares the whole
//! volume (`full_resync`); without it the verdict is a conflict too. The target adopts the
//! source's lineage (durably, before `Resume`) on `Adopt` and `Resync`.
//!
//! The lineage file (`docs/failover.md`, "The lineage file") keeps a side's lineage across
//! restarts: written to a temporary file, synced, renamed over the old one, the directory
//! synced; a BLAKE3 checksum covers it; a versioned magic starts it.

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tidemark_journal::Seq;

use crate::wire::codec::{GENERATION_LEN, check_generations};
use crate::wire::{Generation, LineageInfo, MAX_GENERATIONS, RefuseReason};

/// What the target does with a source, given both lineages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Both sides are in the same generation: resume as usual.
    Same,
    /// The target holds no lineage of its own to keep (blank, or a plain replica of another
    /// history): it takes the source's; the pair's usual rules (initial sync, resync) apply.
    Adopt,
    /// The target holds an older or losing state of the volume: it takes the source's
    /// lineage and the source's whole-volume fast resync overwrites what differs.
    Resync {
        /// Why, for the logs: "failback", or the conflict the operator resolved.
        why: String,
    },
    /// Refused until the operator chooses.
    Conflict(Conflict),
}

impl Verdict {
    /// One word for status documents: `same`, `adopt`, `resync` or `conflict`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Same => "same",
            Self::Adopt => "adopt",
            Self::Resync { .. } => "resync",
            Self::Conflict(_) => "conflict",
        }
    }
}

/// Why two lineages cannot be reconciled without the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConflictKind {
    /// Both sides took writes after they branched.
    SplitBrain,
    /// The target's generation is newer than the source's (it was promoted), and the source
    /// took no writes after the branch: replicate the other way.
    StaleSource,
    /// No common root, and the target holds writes of its own.
    Unrelated,
    /// A failback resync is due, but the source does not compare the whole volume.
    NeedsFullResync,
}

/// A refused pairing of lineages, with what an operator needs to choose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// What kind.
    pub kind: ConflictKind,
    /// The source's current generation.
    pub source_generation: u64,
    /// The target's current generation (0 if none).
    pub target_generation: u64,
    /// The last generation both share (0 if none).
    pub common_generation: u64,
    /// Where each side left the common generation: the source's branch seq (or its head,
    /// if it is still in it) and the target's.
    pub source_branch: Seq,
    /// See `source_branch`.
    pub target_branch: Seq,
    /// The source may hold writes no seq counts (written around the tap).
    pub source_dirty: bool,
    /// The target may hold writes no seq counts.
    pub target_dirty: bool,
}

impl Conflict {
    /// The `Refuse` reason for it.
    pub fn reason(&self) -> RefuseReason {
        match self.kind {
            ConflictKind::SplitBrain => RefuseReason::SPLIT_BRAIN,
            _ => RefuseReason::LINEAGE,
        }
    }
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (s, t, c) = (
            GenId(self.source_generation),
            GenId(self.target_generation),
            GenId(self.common_generation),
        );
        let (sb, tb) = (self.source_branch, self.target_branch);
        let around = |dirty: bool| if dirty { " and writes around the tap" } else { "" };
        let (sd, td) = (around(self.source_dirty), around(self.target_dirty));
        match self.kind {
            ConflictKind::SplitBrain => write!(
                f,
                "split brain: the source (generation {s}) and this target (generation {t}) both \
                 took writes after they branched from generation {c} (source at seq {sb}{sd}, \
                 target at seq {tb}{td}). Nothing applied, never merged. Choose the winner: the \
                 source (`receive --discard-local-changes` here, or `protect \
                 --discard-target-changes` there, with `--failback`), or this side (protect it \
                 to the other instead)"
            ),
            ConflictKind::StaleSource => write!(
                f,
                "stale source: this target's generation {t} branched from the source's \
                 generation {c} at seq {tb} and is newer (it was promoted); the source has \
                 nothing after seq {sb}. Replicate the other way (fail back from this side), \
                 or overwrite this side's writes with `protect --failback \
                 --discard-target-changes`"
            ),
            ConflictKind::Unrelated => write!(
                f,
                "unrelated lineages: this target holds generation {t} with writes of its own, \
                 the source generation {s}, with no common root. Use another replica, or \
                 overwrite it with `protect --failback --discard-target-changes` (or `receive \
                 --discard-local-changes` here)"
            ),
            ConflictKind::NeedsFullResync => write!(
                f,
                "this target holds another state of the volume (generation {t}, the source \
                 generation {s}, common generation {c}, target at seq {tb}): the source must \
                 compare the whole volume: restart it with `protect --failback`"
            ),
        }
    }
}

/// A generation id as the operator sees it: 16 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenId(pub u64);

impl fmt::Display for GenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A new generation id: random, never 0.
pub fn new_generation_id() -> u64 {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return id;
        }
    }
}

/// A chain of generations from `(id, branch seq)` links, root first: each link's parent is
/// the one before it (the root's branch seq is taken as 0).
pub fn chain(links: &[(u64, u64)]) -> Vec<Generation> {
    let mut out: Vec<Generation> = Vec::with_capacity(links.len());
    for &(id, branch) in links {
        let parent = out.last().map_or(0, |g| g.id);
        let branch_seq = if out.is_empty() { Seq::ZERO } else { Seq(branch) };
        out.push(Generation { id, parent, branch_seq });
    }
    out
}

/// The root of a new lineage (a new protection).
pub fn new_root() -> Generation {
    Generation { id: new_generation_id(), parent: 0, branch_seq: Seq::ZERO }
}

/// The decision table of the module docs. Pure: the target and the source (and the tests)
/// run the same function on the same two lineages.
pub fn decide(source: &LineageInfo, target: &LineageInfo) -> Verdict {
    let verdict = classify(source, target);
    let Verdict::Conflict(c) = &verdict else {
        return match verdict {
            Verdict::Resync { .. } if !source.full_resync => {
                Verdict::Conflict(conflict(source, target, ConflictKind::NeedsFullResync))
            }
            v => v,
        };
    };
    if !(source.source_wins || target.source_wins) {
        return verdict;
    }
    if !source.full_resync {
        return Verdict::Conflict(Conflict { kind: ConflictKind::NeedsFullResync, ..c.clone() });
    }
    Verdict::Resync { why: format!("resolved for the source: {c}") }
}

fn classify(source: &LineageInfo, target: &LineageInfo) -> Verdict {
    let (s, t) = (&source.generations, &target.generations);
    if t.is_empty() {
        return Verdict::Adopt;
    }
    if s.last().map(|g| g.id) == t.last().map(|g| g.id) {
        return Verdict::Same;
    }
    let common = s.iter().zip(t.iter()).take_while(|(a, b)| a.id == b.id).count();
    if common == 0 {
        return if target.dirty {
            Verdict::Conflict(conflict(source, target, ConflictKind::Unrelated))
        } else {
            Verdict::Adopt
        };
    }
    if common == t.len() {
        // The target's generation is an ancestor of the source's: a failback, unless the
        // target took writes after the source's branch.
        let branch = s[common].branch_seq;
        return if target.head <= branch && !target.dirty {
            Verdict::Resync { why: "failback".to_owned() }
        } else {
            Verdict::Conflict(conflict(source, target, ConflictKind::SplitBrain))
        };
    }
    if common == s.len() {
        // The target is newer (promoted, so live): the source is stale, or both wrote.
        let branch = t[common].branch_seq;
        let kind = if source.head > branch || source.dirty {
            ConflictKind::SplitBrain
        } else {
            ConflictKind::StaleSource
        };
        return Verdict::Conflict(conflict(source, target, kind));
    }
    Verdict::Conflict(conflict(source, target, ConflictKind::SplitBrain))
}

/// Where `side` left generation number `common - 1` of its chain: the branch seq of its
/// next generation, or its head if it is still in it.
fn left_at(side: &LineageInfo, common: usize) -> Seq {
    side.generations.get(common).map_or(side.head, |g| g.branch_seq)
}

fn conflict(source: &LineageInfo, target: &LineageInfo, kind: ConflictKind) -> Conflict {
    let (s, t) = (&source.generations, &target.generations);
    let common = s.iter().zip(t.iter()).take_while(|(a, b)| a.id == b.id).count();
    let id = |g: Option<&Generation>| g.map_or(0, |g| g.id);
    Conflict {
        kind,
        source_generation: id(s.last()),
        target_generation: id(t.last()),
        common_generation: if common == 0 { 0 } else { s[common - 1].id },
        source_branch: if common == 0 { source.head } else { left_at(source, common) },
        target_branch: if common == 0 { target.head } else { left_at(target, common) },
        source_dirty: source.dirty,
        target_dirty: target.dirty,
    }
}

// ---- The lineage file ----

/// Magic at the start of a lineage file.
pub const FILE_MAGIC: [u8; 8] = *b"TDMLINEA";
/// The lineage file's format version.
pub const FILE_VERSION: u16 = 1;
/// Length of the fixed part of a lineage file.
pub const FILE_FIXED_LEN: usize = 56;
/// Length of the checksum at the end.
const CHECKSUM_LEN: usize = 32;
/// The file's name in a state or receive directory.
pub const FILE_NAME: &str = "lineage";

const FILE_DIRTY: u8 = 1;
const FILE_SEALED: u8 = 2;

/// A side's lineage as its directory keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LineageFile {
    /// Root first, current last (at least one in a file).
    pub generations: Vec<Generation>,
    /// The highest seq of the current generation the side's data includes, when the file
    /// says so (a clean stop of `protect`, a failback target's old source); 0 otherwise.
    pub head: Seq,
    /// The data may hold writes of the current generation that `head` does not count.
    pub dirty: bool,
    /// A clean stop of `protect` recorded the image's fingerprint ([`image_fingerprint`]):
    /// if the image still has it, nothing wrote to it since `head`.
    pub seal: Option<[u8; 32]>,
}

/// A lineage file that cannot be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LineageError {
    /// Reading or writing it failed.
    #[error("lineage file {path}: {op}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Its bytes are not a valid lineage file.
    #[error("lineage file {path}: {what}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was found and expected.
        what: String,
    },
}

impl LineageFile {
    /// A new lineage: one root generation.
    pub fn new_root() -> Self {
        Self { generations: vec![new_root()], ..Self::default() }
    }

    /// The lineage as message 12 or 13 carries it, with `head` and the flags given.
    pub fn info(&self, head: Seq, dirty: bool) -> LineageInfo {
        LineageInfo { generations: self.generations.clone(), head, dirty, ..Default::default() }
    }

    /// Appends a child of the current generation, branching at `seq` (a promotion).
    pub fn branch(&mut self, id: u64, seq: Seq) {
        let parent = self.generations.last().map_or(0, |g| g.id);
        self.generations.push(Generation { id, parent, branch_seq: seq });
    }

    /// The file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            FILE_FIXED_LEN + GENERATION_LEN * self.generations.len() + CHECKSUM_LEN,
        );
        out.extend_from_slice(&FILE_MAGIC);
        out.extend_from_slice(&FILE_VERSION.to_le_bytes());
        let mut flags = 0;
        if self.dirty {
            flags |= FILE_DIRTY;
        }
        if self.seal.is_some() {
            flags |= FILE_SEALED;
        }
        out.push(flags);
        out.push(0);
        out.extend_from_slice(&(self.generations.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.head.0.to_le_bytes());
        out.extend_from_slice(&self.seal.unwrap_or([0; 32]));
        for g in &self.generations {
            out.extend_from_slice(&g.id.to_le_bytes());
            out.extend_from_slice(&g.parent.to_le_bytes());
            out.extend_from_slice(&g.branch_seq.0.to_le_bytes());
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Parses a file's bytes; the error says what was found and expected.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8"));
        if bytes.len() < FILE_FIXED_LEN + CHECKSUM_LEN {
            return Err(format!(
                "{} bytes, expected at least {}",
                bytes.len(),
                FILE_FIXED_LEN + CHECKSUM_LEN
            ));
        }
        if bytes[0..8] != FILE_MAGIC {
            return Err(format!("magic {:02x?}, expected \"TDMLINEA\"", &bytes[0..8]));
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version != FILE_VERSION {
            return Err(format!("format version {version}, this build reads {FILE_VERSION}"));
        }
        let count = u32::from_le_bytes(bytes[12..16].try_into().expect("4")) as usize;
        if count == 0 || count > MAX_GENERATIONS {
            return Err(format!("{count} generations, expected 1 to {MAX_GENERATIONS}"));
        }
        let len = FILE_FIXED_LEN + GENERATION_LEN * count + CHECKSUM_LEN;
        if bytes.len() != len {
            return Err(format!("{} bytes, expected {len} for {count} generations", bytes.len()));
        }
        let body = &bytes[..len - CHECKSUM_LEN];
        if blake3::hash(body).as_bytes() != &bytes[len - CHECKSUM_LEN..] {
            return Err("checksum mismatch (torn or damaged)".to_owned());
        }
        let flags = bytes[10];
        if flags & !(FILE_DIRTY | FILE_SEALED) != 0 || bytes[11] != 0 {
            return Err(format!("flags {flags:#04x} / reserved {:#04x}: unknown bits", bytes[11]));
        }
        let mut seal = [0; 32];
        seal.copy_from_slice(&bytes[24..56]);
        if flags & FILE_SEALED == 0 && seal != [0; 32] {
            return Err("a seal without the sealed flag".to_owned());
        }
        let generations: Vec<Generation> = (0..count)
            .map(|i| {
                let at = FILE_FIXED_LEN + i * GENERATION_LEN;
                Generation {
                    id: u64_at(at),
                    parent: u64_at(at + 8),
                    branch_seq: Seq(u64_at(at + 16)),
                }
            })
            .collect();
        check_generations("lineage file", &generations, 1).map_err(|e| e.to_string())?;
        Ok(Self {
            generations,
            head: Seq(u64_at(16)),
            dirty: flags & FILE_DIRTY != 0,
            seal: (flags & FILE_SEALED != 0).then_some(seal),
        })
    }

    /// Reads `path`; `None` if there is no such file.
    pub fn load(path: &Path) -> Result<Option<Self>, LineageError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(LineageError::Io { path: path.to_owned(), op: "read", source });
            }
        };
        Self::decode(&bytes)
            .map(Some)
            .map_err(|what| LineageError::Corrupt { path: path.to_owned(), what })
    }

    /// Replaces `path` with this lineage, crash-safe: a temporary file beside it, synced,
    /// renamed over it, the directory synced. A crash leaves the old file or the new one.
    pub fn store(&self, path: &Path) -> Result<(), LineageError> {
        let io = |op| move |source| LineageError::Io { path: path.to_owned(), op, source };
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io("create the temporary file"))?;
        f.write_all(&self.encode()).map_err(io("write the temporary file"))?;
        f.sync_all().map_err(io("sync the temporary file"))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io("rename the temporary file over it"))?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io("sync its directory"))
    }
}

/// Fuzz entry point (a case of `fuzz/fuzz_targets/wire_frame.rs`): parses arbitrary bytes
/// as a lineage file. Never panics; whatever parses re-encodes to the same bytes.
pub fn fuzz_file(data: &[u8]) {
    if let Ok(file) = LineageFile::decode(data) {
        assert_eq!(file.encode(), data, "a lineage file re-encoded to other bytes");
    }
}

/// A cheap fingerprint of the volume image at `path`, to tell whether anything wrote to it
/// since a clean stop: for a regular file its device, inode, size, modification and change
/// times (a write changes both times; the change time cannot be set back); for a block
/// device its number, the boot and the kernel's count of sectors written to it (which a
/// reboot resets: an unknown state then). `None` when there is none to take.
pub fn image_fingerprint(path: &Path) -> Option<[u8; 32]> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    let m = std::fs::metadata(path).ok()?;
    let mut h = blake3::Hasher::new_derive_key("tidemark 2026-12 image fingerprint v1");
    if m.file_type().is_file() {
        h.update(b"file");
        for v in [m.dev(), m.ino(), m.size()] {
            h.update(&v.to_le_bytes());
        }
        for (s, ns) in [(m.mtime(), m.mtime_nsec()), (m.ctime(), m.ctime_nsec())] {
            h.update(&s.to_le_bytes());
            h.update(&ns.to_le_bytes());
        }
    } else if m.file_type().is_block_device() {
        let rdev = m.rdev();
        let (major, minor) = (libc::major(rdev), libc::minor(rdev));
        let stat = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat")).ok()?;
        // Field 7: sectors written since boot.
        let written = stat.split_whitespace().nth(6)?;
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        h.update(b"block");
        h.update(&rdev.to_le_bytes());
        h.update(boot.trim().as_bytes());
        h.update(written.as_bytes());
    } else {
        return None;
    }
    Some(*h.finalize().as_bytes())
}

/// The target's lineage, in memory and (when it has a path) in its lineage file. A
/// receiver with no file (tests, embedders) keeps it in memory only.
#[derive(Debug, Default)]
pub struct LineageStore {
    path: Option<PathBuf>,
    file: Mutex<Option<LineageFile>>,
}

impl LineageStore {
    /// A store in memory only, starting empty (a blank target).
    pub fn memory() -> Self {
        Self::default()
    }

    /// The store kept in `path` (read now; a missing file is an empty lineage).
    pub fn open(path: PathBuf) -> Result<Self, LineageError> {
        let file = LineageFile::load(&path)?;
        Ok(Self { path: Some(path), file: Mutex::new(file) })
    }

    /// The lineage now, with `head` raised to at least `journal_head` (what the target's
    /// journal holds of the current generation).
    pub fn info(&self, journal_head: Seq) -> LineageInfo {
        match &*self.file.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(f) => f.info(f.head.max(journal_head), f.dirty),
            None => LineageInfo { head: journal_head, ..Default::default() },
        }
    }

    /// Takes `generations` (the source's) as this target's lineage, durably before it
    /// returns: the target's data is now that history's (or becomes it by the source's
    /// resync), counted by the journal from here.
    pub fn adopt(&self, generations: &[Generation]) -> Result<(), LineageError> {
        let file = LineageFile { generations: generations.to_vec(), ..Default::default() };
        let mut current = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(path) = &self.path {
            file.store(path)?;
        }
        *current = Some(file);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(gens: &[(u64, u64)], head: u64, dirty: bool) -> LineageInfo {
        LineageInfo {
            generations: chain(gens),
            head: Seq(head),
            dirty,
            source_wins: false,
            full_resync: true,
        }
    }

    fn kind(v: &Verdict) -> Option<ConflictKind> {
        match v {
            Verdict::Conflict(c) => Some(c.kind),
            _ => None,
        }
    }

    #[test]
    fn blank_target_adopts() {
        assert_eq!(decide(&side(&[(1, 0)], 9, false), &side(&[], 0, false)), Verdict::Adopt);
    }

    #[test]
    fn same_generation_resumes() {
        assert_eq!(decide(&side(&[(1, 0)], 9, false), &side(&[(1, 0)], 5, false)), Verdict::Same);
        let promoted = [(1, 0), (2, 40)];
        assert_eq!(decide(&side(&promoted, 3, true), &side(&promoted, 3, false)), Verdict::Same);
    }

    #[test]
    fn failback_target_at_or_before_the_branch_resyncs() {
        let b = side(&[(1, 0), (2, 40)], 7, true);
        for head in [0, 39, 40] {
            let v = decide(&b, &side(&[(1, 0)], head, false));
            assert!(matches!(v, Verdict::Resync { .. }), "head {head}: {v:?}");
        }
    }

    #[test]
    fn failback_target_written_past_the_branch_is_split_brain() {
        let b = side(&[(1, 0), (2, 40)], 7, true);
        let v = decide(&b, &side(&[(1, 0)], 41, false));
        assert_eq!(kind(&v), Some(ConflictKind::SplitBrain));
        let Verdict::Conflict(c) = &v else { unreachable!() };
        assert_eq!((c.source_generation, c.target_generation, c.common_generation), (2, 1, 1));
        assert_eq!((c.source_branch, c.target_branch), (Seq(40), Seq(41)));
        let text = c.to_string();
        assert!(text.contains("split brain") && text.contains(&GenId(2).to_string()), "{text}");
        assert!(text.contains(&GenId(1).to_string()) && text.contains("seq 40"), "{text}");
        assert_eq!(c.reason(), RefuseReason::SPLIT_BRAIN);
        // Written around the tap (dirty) at its branch point: split brain too.
        let v = decide(&b, &side(&[(1, 0)], 40, true));
        assert_eq!(kind(&v), Some(ConflictKind::SplitBrain));
    }

    #[test]
    fn promoted_target_against_its_old_source() {
        let t = side(&[(1, 0), (2, 40)], 0, true);
        // The old source wrote past the branch: split brain.
        assert_eq!(kind(&decide(&side(&[(1, 0)], 45, false), &t)), Some(ConflictKind::SplitBrain));
        assert_eq!(kind(&decide(&side(&[(1, 0)], 40, true), &t)), Some(ConflictKind::SplitBrain));
        // It did not: it is stale, replicate the other way.
        let v = decide(&side(&[(1, 0)], 40, false), &t);
        assert_eq!(kind(&v), Some(ConflictKind::StaleSource));
        let Verdict::Conflict(c) = v else { unreachable!() };
        assert_eq!(c.reason(), RefuseReason::LINEAGE);
    }

    #[test]
    fn both_branched_is_split_brain() {
        let s = side(&[(1, 0), (2, 40)], 3, false);
        let t = side(&[(1, 0), (3, 35)], 0, false);
        let v = decide(&s, &t);
        let Verdict::Conflict(c) = v else { panic!("{v:?}") };
        assert_eq!(c.kind, ConflictKind::SplitBrain);
        assert_eq!((c.source_branch, c.target_branch, c.common_generation), (Seq(40), Seq(35), 1));
    }

    #[test]
    fn unrelated_lineages() {
        // A plain replica of another history: adopt (the pair's own rules compare it).
        assert_eq!(decide(&side(&[(1, 0)], 3, false), &side(&[(9, 0)], 5, false)), Verdict::Adopt);
        // A target with writes of its own: refused.
        let v = decide(&side(&[(1, 0)], 3, false), &side(&[(9, 0)], 5, true));
        assert_eq!(kind(&v), Some(ConflictKind::Unrelated));
    }

    #[test]
    fn the_operator_resolves_for_the_source_from_either_side() {
        let s = side(&[(1, 0), (2, 40)], 7, true);
        let t = side(&[(1, 0)], 45, false);
        let mut s_wins = s.clone();
        s_wins.source_wins = true;
        assert!(matches!(decide(&s_wins, &t), Verdict::Resync { .. }));
        let mut t_yields = t.clone();
        t_yields.source_wins = true;
        assert!(matches!(decide(&s, &t_yields), Verdict::Resync { .. }));
        // Every kind of conflict yields to the choice.
        let stale = side(&[(1, 0)], 40, false);
        let mut stale_wins = stale.clone();
        stale_wins.source_wins = true;
        assert!(matches!(
            decide(&stale_wins, &side(&[(1, 0), (2, 40)], 0, true)),
            Verdict::Resync { .. }
        ));
        assert!(matches!(decide(&s_wins, &side(&[(9, 0)], 5, true)), Verdict::Resync { .. }));
    }

    #[test]
    fn a_resync_needs_a_whole_volume_comparison() {
        let mut b = side(&[(1, 0), (2, 40)], 7, true);
        b.full_resync = false;
        assert_eq!(
            kind(&decide(&b, &side(&[(1, 0)], 40, false))),
            Some(ConflictKind::NeedsFullResync)
        );
        b.source_wins = true;
        assert_eq!(
            kind(&decide(&b, &side(&[(1, 0)], 45, false))),
            Some(ConflictKind::NeedsFullResync)
        );
        // Adopt and Same do not need one.
        assert_eq!(decide(&b, &side(&[], 0, false)), Verdict::Adopt);
        assert_eq!(decide(&b, &side(&[(1, 0), (2, 40)], 3, false)), Verdict::Same);
    }

    #[test]
    fn file_round_trips_and_refuses_damage() {
        let mut f = LineageFile::new_root();
        f.branch(new_generation_id(), Seq(77));
        f.head = Seq(12);
        f.dirty = true;
        f.seal = Some([7; 32]);
        let bytes = f.encode();
        assert_eq!(LineageFile::decode(&bytes).unwrap(), f);
        fuzz_file(&bytes);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(LineageFile::decode(&bad).is_err(), "a flip at byte {i} was accepted");
        }
        for cut in [0, 10, bytes.len() - 1] {
            assert!(LineageFile::decode(&bytes[..cut]).is_err());
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        assert_eq!(LineageFile::load(&path).unwrap(), None);
        f.store(&path).unwrap();
        assert_eq!(LineageFile::load(&path).unwrap(), Some(f.clone()));
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let e = LineageFile::load(&path).unwrap_err().to_string();
        assert!(e.contains("lineage file") && e.contains("bytes, expected"), "{e}");
    }

    #[test]
    fn store_adopts_durably() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let store = LineageStore::open(path.clone()).unwrap();
        assert!(store.info(Seq(5)).generations.is_empty());
        let gens = chain(&[(1, 0), (2, 40)]);
        store.adopt(&gens).unwrap();
        assert_eq!(store.info(Seq(3)).generations, gens);
        assert_eq!(store.info(Seq(3)).head, Seq(3));
        let again = LineageStore::open(path).unwrap();
        assert_eq!(again.info(Seq(0)).generations, gens);
    }

    #[test]
    fn fingerprint_sees_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let before = image_fingerprint(&path).unwrap();
        assert_eq!(image_fingerprint(&path), Some(before));
        // Not a synchronisation: file times advance by the kernel's clock tick, which the
        // write must fall after for its times to differ from the first ones.
        std::thread::sleep(std::time::Duration::from_millis(20));
        use std::os::unix::fs::FileExt as _;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"x", 100).unwrap();
        drop(f);
        assert_ne!(image_fingerprint(&path), Some(before), "a write left the fingerprint");
    }
}
