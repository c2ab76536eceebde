//! What a step can reach of its worker's secrets, and what the worker does about it.
//!
//! A step without `run_as` runs as the worker's own user. Processes of one user may read
//! each other's `/proc/PID/environ`, `mem`, `maps` and `fd/`, and attach with ptrace: a
//! step could read the worker's settings (`JOBZ_*`, whatever its environment holds) and
//! its memory, the node key included. [`forbid_inspection`] makes the worker
//! non-dumpable (`PR_SET_DUMPABLE` 0) before it reads anything secret: its `/proc/PID/*`
//! then belongs to root, and only a process with `CAP_SYS_PTRACE` may read it or attach.
//! The price: the worker leaves no core dump.
//!
//! `execve` makes a process dumpable again when it runs a binary its user may read with
//! its own credentials, so every command of a step is an ordinary, inspectable process
//! holding nothing of the worker's. The step supervisor, which passes every step's
//! variables, makes itself non-dumpable too and starts with an empty environment.
//!
//! What a step running as the worker's user still reaches: every file that user may
//! read (the `--key` file, the spool, the logs, `jobs.d`) and signals to the worker. Only
//! another user closes that (`--default-run-as`, `run_as`, with a root worker); the worker
//! warns at start when the steps' default user can read its key
//! ([`steps_can_read_key`]).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::Context;

/// Makes this process non-dumpable: same-user processes can no longer read its
/// `/proc/PID/environ`, `mem`, `maps`, `fd/` nor ptrace it.
pub fn forbid_inspection() -> anyhow::Result<()> {
    // SAFETY: prctl(PR_SET_DUMPABLE) takes integers only and changes a flag of this
    // process; it has no memory effects.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong, 0, 0, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("making the worker non-dumpable (prctl PR_SET_DUMPABLE)");
    }
    Ok(())
}

/// Whether this process is dumpable (`PR_GET_DUMPABLE`).
pub fn is_dumpable() -> bool {
    // SAFETY: prctl(PR_GET_DUMPABLE) takes integers only and returns a flag.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
    rc > 0
}

/// The owner and permission bits of a file, as far as reading it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileAccess {
    /// Owner uid.
    pub uid: u32,
    /// Owner gid.
    pub gid: u32,
    /// Permission bits.
    pub mode: u32,
}

impl FileAccess {
    /// The owner and mode of `path`.
    pub fn of(path: &Path) -> std::io::Result<FileAccess> {
        let meta = std::fs::metadata(path)?;
        Ok(FileAccess {
            uid: meta.uid(),
            gid: meta.gid(),
            mode: meta.mode() & 0o7777,
        })
    }

    /// Whether a process of `uid` with groups `groups` may read the file (root may read
    /// anything; directories on the way are not looked at).
    pub fn readable_by(&self, uid: u32, groups: &[u32]) -> bool {
        if uid == 0 {
            true
        } else if uid == self.uid {
            self.mode & 0o400 != 0
        } else if groups.contains(&self.gid) {
            self.mode & 0o040 != 0
        } else {
            self.mode & 0o004 != 0
        }
    }
}

/// Why steps without `run_as` could read the key file `key`, if they could: they run as
/// `--default-run-as` (`default_run_as`), else as the worker's own user.
pub fn steps_can_read_key(key: &Path, default_run_as: Option<&str>) -> Option<String> {
    let access = FileAccess::of(key).ok()?;
    let (name, uid, groups) = match default_run_as {
        Some(name) => {
            let user = crate::runner::lookup_user(name).ok()??;
            let groups = crate::runner::group_list(&user).unwrap_or_else(|_| vec![user.gid]);
            (
                format!("--default-run-as {name} (uid {})", user.uid),
                user.uid,
                groups,
            )
        }
        None => {
            // SAFETY: geteuid and getegid take nothing, cannot fail, no memory effects.
            #[allow(unsafe_code)]
            let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
            (format!("the worker's own user (uid {uid})"), uid, vec![gid])
        }
    };
    access.readable_by(uid, &groups).then(|| {
        format!(
            "steps without run_as run as {name}, which can read the key file {}: set \
             --default-run-as to a user that cannot (README: \"Step hygiene\")",
            key.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worker_can_make_itself_non_dumpable() {
        // This test process is not the worker: only /proc of this process changes owner.
        forbid_inspection().unwrap();
        assert!(!is_dumpable());
    }

    #[test]
    fn a_key_file_is_readable_by_its_owner_and_root_only_when_0600() {
        let key = FileAccess {
            uid: 1000,
            gid: 1000,
            mode: 0o600,
        };
        assert!(key.readable_by(1000, &[1000]), "its owner");
        assert!(key.readable_by(0, &[0]), "root");
        assert!(!key.readable_by(1001, &[1000]), "its group");
        assert!(!key.readable_by(65534, &[65534]), "anyone else");
        let loose = FileAccess { mode: 0o640, ..key };
        assert!(loose.readable_by(1001, &[5, 1000]), "its group, 0640");
        assert!(!loose.readable_by(1001, &[5]));
        let unreadable = FileAccess { mode: 0o200, ..key };
        assert!(!unreadable.readable_by(1000, &[1000]));
    }

    #[test]
    fn steps_of_the_workers_own_user_can_read_its_key_and_are_told_so() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("worker.key");
        std::fs::write(&key, "secret").unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let why = steps_can_read_key(&key, None).expect("the worker's own user reads its key");
        assert!(why.contains("--default-run-as"), "{why}");
        assert!(why.contains(&key.display().to_string()), "{why}");
        // A default user that is not the file's owner cannot (nobody, when the test is
        // not run as nobody).
        // SAFETY: geteuid takes nothing and cannot fail.
        #[allow(unsafe_code)]
        let euid = unsafe { libc::geteuid() };
        if let Ok(Some(nobody)) = crate::runner::lookup_user("nobody") {
            if nobody.uid != euid {
                assert_eq!(steps_can_read_key(&key, Some("nobody")), None);
            }
        }
        assert_eq!(steps_can_read_key(&dir.path().join("missing"), None), None);
    }
}
