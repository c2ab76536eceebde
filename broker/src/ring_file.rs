//! The mesh keys kept across broker restarts, in `DIR/mesh-keys` of the key directory.
//!
//! A broker that comes back with the mesh key it used before is read at once by every node;
//! with a new key, each node first meets frames it cannot read and must greet the broker
//! for the key (see [`jobz::client`]). The file is a secret (it reads the group frames
//! sealed under its keys, for at most a key lifetime plus an announcement); it sits beside
//! `broker.key`, which reads and forges far more, with the same protection: mode 0600,
//! written to a temporary file and renamed, never read if group or others may read it.
//! Anything wrong with it costs the mesh one hello per node, never the start: the broker
//! starts a new ring and writes the file afresh.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use jobz::seal::{MeshRing, RestoredRing};
use tracing::{info, warn};
use zeroize::Zeroizing;

/// Name of the file in the key directory.
pub const RING_FILE_NAME: &str = "mesh-keys";

/// Larger than any ring the broker writes (a few hundred bytes).
const MAX_RING_FILE_BYTES: u64 = 64 * 1024;

/// Where the broker keeps its mesh keys between runs.
#[derive(Debug, Clone)]
pub struct RingFile {
    path: PathBuf,
}

impl RingFile {
    /// The ring file of a key directory.
    pub fn in_dir(keys_dir: &Path) -> RingFile {
        RingFile {
            path: keys_dir.join(RING_FILE_NAME),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The ring to start with at `now_ms`: the saved one if it is fit to keep (see
    /// [`MeshRing::restore`]), else a new one. Never fails: a missing, unreadable or
    /// damaged file is logged and replaced at the next [`RingFile::save`].
    pub fn load(&self, now_ms: i64, max_in_use_ms: i64) -> MeshRing {
        let text = match self.read() {
            Ok(Some(text)) => text,
            Ok(None) => {
                info!(file = %self.path.display(), "no mesh keys kept from an earlier run: a new mesh key");
                return MeshRing::new(now_ms);
            }
            Err(e) => {
                warn!(error = %format!("{e:#}"), "the kept mesh keys are not used: a new mesh key (each node fetches it with one hello)");
                return MeshRing::new(now_ms);
            }
        };
        match MeshRing::restore(&text, now_ms, max_in_use_ms) {
            Ok(RestoredRing {
                ring,
                kept: Some(kept),
                announced,
            }) => {
                info!(
                    kept_epoch = kept,
                    announced_epoch = announced.unwrap_or_default(),
                    "mesh key of the last run kept: nodes read on at once; a new key is announced as after a revocation"
                );
                ring
            }
            Ok(RestoredRing { ring, .. }) => {
                info!("the mesh keys of the last run have expired: a new mesh key");
                ring
            }
            Err(e) => {
                warn!(file = %self.path.display(), error = %e, "the kept mesh keys are damaged and not used: a new mesh key");
                MeshRing::new(now_ms)
            }
        }
    }

    /// The file's text, `None` if there is no file. Refuses a file others may have read.
    fn read(&self) -> anyhow::Result<Option<Zeroizing<String>>> {
        let path = &self.path;
        let meta = match fs::symlink_metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        if !meta.is_file() {
            bail!("{} is not a regular file", path.display());
        }
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            bail!(
                "{} has mode {:o}: group or others may have read the keys in it",
                path.display(),
                mode & 0o777
            );
        }
        let mut text = Zeroizing::new(String::new());
        fs::File::open(path)
            .and_then(|f| f.take(MAX_RING_FILE_BYTES + 1).read_to_string(&mut text))
            .with_context(|| format!("reading {}", path.display()))?;
        if text.len() as u64 > MAX_RING_FILE_BYTES {
            bail!(
                "{} is larger than {MAX_RING_FILE_BYTES} bytes",
                path.display()
            );
        }
        Ok(Some(text))
    }

    /// Writes the ring: a new 0600 file renamed over the old one, so a crash leaves either
    /// the old ring or the new one, never half of one.
    pub fn save(&self, ring_text: &str) -> anyhow::Result<()> {
        let path = &self.path;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        // A leftover of a crashed process with our pid: created afresh, so its mode and
        // owner are ours, never an old file's.
        let _ = fs::remove_file(&tmp);
        let written = (|| {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(ring_text.as_bytes())?;
            file.sync_all()?;
            fs::rename(&tmp, path)?;
            // The rename is durable once the directory is.
            if let Some(dir) = path.parent() {
                fs::File::open(dir)?.sync_all()?;
            }
            Ok::<(), std::io::Error>(())
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written.with_context(|| format!("writing the mesh keys to {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;
    const MAX_IN_USE: i64 = 3_600_000 + jobz::seal::MESH_KEY_ANNOUNCE_MS;

    #[test]
    fn a_saved_ring_is_private_and_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let file = RingFile::in_dir(dir.path());
        let mut ring = MeshRing::new(NOW);
        let in_use = ring.current(NOW).epoch;
        file.save(&ring.to_text()).unwrap();
        let mode = fs::metadata(file.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let mut back = file.load(NOW + 1000, MAX_IN_USE);
        assert_eq!(back.current(NOW + 1000).epoch, in_use);
        assert_eq!(
            back.distributable(NOW + 1000)[0].epoch,
            ring.distributable(NOW + 1000)[0].epoch
        );
        // Saving again replaces the file and leaves no temporary file behind.
        file.save(&back.to_text()).unwrap();
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![RING_FILE_NAME]);
    }

    #[test]
    fn a_missing_readable_or_damaged_file_gives_a_new_ring_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = RingFile::in_dir(dir.path());
        let ring = MeshRing::new(NOW);
        let old = ring.current(NOW).epoch;
        // Missing: a new ring, and nothing written until asked.
        file.load(NOW + 1000, MAX_IN_USE);
        assert!(!file.path().exists());
        // Readable by others: its keys may have leaked, so they are not used.
        file.save(&ring.to_text()).unwrap();
        fs::set_permissions(file.path(), fs::Permissions::from_mode(0o640)).unwrap();
        let later = NOW + 2000;
        assert_ne!(file.load(later, MAX_IN_USE).current(later).epoch, old);
        // Damaged.
        fs::write(file.path(), "jobz-mesh-ring v1 last_epoch=1\nkey garbage\n").unwrap();
        fs::set_permissions(file.path(), fs::Permissions::from_mode(0o600)).unwrap();
        assert_ne!(file.load(later, MAX_IN_USE).current(later).epoch, old);
        // Too large to be ours.
        fs::write(file.path(), vec![b'#'; 100_000]).unwrap();
        assert_ne!(file.load(later, MAX_IN_USE).current(later).epoch, old);
        // A directory where the file should be.
        fs::remove_file(file.path()).unwrap();
        fs::create_dir(file.path()).unwrap();
        assert_ne!(file.load(later, MAX_IN_USE).current(later).epoch, old);
        // ... which a save cannot replace: an error to log, not a panic.
        assert!(file.save(&ring.to_text()).is_err());
    }
}
