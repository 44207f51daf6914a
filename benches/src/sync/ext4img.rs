//! The realistic image of the initial-sync and stream figures: an ext4 filesystem built with
//! `mkfs.ext4 -d` from a mixed tree of this machine's files (`/usr/share/doc`: text and
//! gzipped changelogs; `/usr/include`: C headers; `/usr/lib/x86_64-linux-gnu`: shared
//! libraries and data; `/usr/bin` if more is needed), taken in sorted path order until the
//! tree holds the wanted bytes. `mkfs.ext4 -d` leaves all-zero blocks of the files out (as
//! holes), so the filesystem uses somewhat less than the tree plus its metadata.
//!
//! The tree is staged with hard links where the run's directory shares a filesystem with
//! `/usr` (copies otherwise); removing the staging directory only removes those links.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::Scale;
use crate::journal::size;
use crate::sys;

/// Where the files come from, in order.
const SOURCES: [&str; 4] =
    ["/usr/share/doc", "/usr/include", "/usr/lib/x86_64-linux-gnu", "/usr/bin"];

/// The image and what went into it.
#[derive(Debug, Clone)]
pub struct Image {
    /// The image file.
    pub path: PathBuf,
    /// Its length.
    pub len: u64,
    /// What the tree holds, for notes.
    pub describe: String,
}

/// Regular files under `dir` (symbolic links not followed), sorted by path.
fn walk(dir: &Path, out: &mut Vec<(PathBuf, u64)>) -> Result<()> {
    let mut entries: Vec<_> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok()).collect(),
        // Unreadable directories are left out, as any backup tool would.
        Err(_) => return Ok(()),
    };
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let Ok(t) = e.file_type() else { continue };
        if t.is_dir() {
            walk(&e.path(), out)?;
        } else if t.is_file() {
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            out.push((e.path(), len));
        }
    }
    Ok(())
}

/// What [`stage`] put in the tree.
#[derive(Debug, Default)]
struct Staged {
    bytes: u64,
    files: u64,
    /// The source directories files were taken from.
    from: Vec<&'static str>,
}

/// Stages about `want` bytes of files from [`SOURCES`] under `tree`.
fn stage(tree: &Path, want: u64) -> Result<Staged> {
    let mut staged = Staged::default();
    for src in SOURCES {
        if staged.bytes >= want {
            break;
        }
        staged.from.push(src);
        let mut list = Vec::new();
        walk(Path::new(src), &mut list)?;
        let name = Path::new(src).file_name().expect("an absolute source directory");
        for (path, len) in list {
            if staged.bytes >= want {
                break;
            }
            let rel = path.strip_prefix(src).expect("walked under src");
            let to = tree.join(name).join(rel);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            if std::fs::hard_link(&path, &to).is_err() {
                std::fs::copy(&path, &to)
                    .with_context(|| format!("copying {} to {}", path.display(), to.display()))?;
            }
            staged.bytes += len;
            staged.files += 1;
        }
    }
    if staged.bytes < want / 2 {
        bail!("only {} of files under {SOURCES:?}; {} wanted", size(staged.bytes), size(want));
    }
    Ok(staged)
}

/// Builds `dir/fs.img` (4 KiB blocks) holding about `scale.ext4_tree_bytes` of files.
pub fn build(dir: &Path, scale: Scale) -> Result<Image> {
    let tree = dir.join("tree");
    eprintln!("[sync] ext4: staging {} of files", size(scale.ext4_tree_bytes));
    let staged = stage(&tree, scale.ext4_tree_bytes)?;
    let (tree_bytes, files) = (staged.bytes, staged.files);
    let path = dir.join("fs.img");
    eprintln!("[sync] ext4: mkfs.ext4 -d ({files} files, {})", size(tree_bytes));
    sys::run_command(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096", "-d"])
            .arg(&tree)
            .arg(&path)
            .arg(format!("{}k", scale.ext4_image / 1024)),
    )?;
    std::fs::remove_dir_all(&tree).with_context(|| format!("removing {}", tree.display()))?;
    std::fs::File::open(&path)?.sync_all()?;
    let len = std::fs::metadata(&path)?.len();
    if len != scale.ext4_image {
        bail!("{} holds {len} bytes, {} asked", path.display(), scale.ext4_image);
    }
    let describe = format!(
        "ext4 (mkfs.ext4 -d, 4 KiB blocks) of {} holding {files} files, {} from {}",
        size(len),
        size(tree_bytes),
        staged.from.join(" + ")
    );
    Ok(Image { path, len, describe })
}
