//! The store's advisory lock, `<store>/.lock` (`flock` on Unix, `LockFileEx` on Windows, via
//! the `fs4` crate).
//!
//! `extract` and `--gc` hold it exclusively for their whole run: one writer at a time, and
//! only they delete files. Readers (`train-head`, `predict`) hold it shared, so nothing is
//! deleted under them; shard writes are content-addressed atomic renames, so holders of the
//! shared lock may add shards too. A process that finds the lock taken says so and waits, at
//! most `[extract] lock_timeout` seconds when that is set. The lock dies with its process
//! (kill -9 included): there is no stale lock to clean up.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::LOCK;
use crate::error::{Error, Result};

/// Exclusive (writers that delete: extract, gc) or shared (readers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    Exclusive,
    Shared,
}

/// A held lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct StoreLock {
    file: File,
    path: PathBuf,
    kind: LockKind,
}

/// How often a waiter with a timeout tries again.
const POLL: Duration = Duration::from_millis(100);

impl StoreLock {
    /// Takes the lock on `dir/.lock`, creating the file when needed. When another process
    /// holds it, prints one line on behalf of `program` and waits: for ever when `timeout` is
    /// `None`, else at most `timeout`, then fails with [`Error::LockTimeout`].
    pub fn acquire(
        dir: &Path,
        kind: LockKind,
        timeout: Option<Duration>,
        program: &str,
    ) -> Result<Self> {
        let path = dir.join(LOCK);
        let file = open_lock_file(&path)?;
        let io = |e: std::io::Error| Error::Io {
            path: path.clone(),
            source: e,
        };
        let attempt = |file: &File| -> std::io::Result<bool> {
            let r = match kind {
                LockKind::Exclusive => fs4::FileExt::try_lock(file),
                LockKind::Shared => fs4::FileExt::try_lock_shared(file),
            };
            match r {
                Ok(()) => Ok(true),
                Err(fs4::TryLockError::WouldBlock) => Ok(false),
                Err(fs4::TryLockError::Error(e)) => Err(e),
            }
        };
        if !attempt(&file).map_err(io)? {
            let who = match kind {
                LockKind::Exclusive => {
                    "another extract is writing this store, or a train-head / predict is reading it"
                }
                LockKind::Shared => "an extract is writing this store",
            };
            match timeout {
                Some(t) => eprintln!(
                    "{program}: waiting for {} ({who}; giving up after {} s)",
                    path.display(),
                    t.as_secs()
                ),
                None => eprintln!("{program}: waiting for {} ({who})", path.display()),
            }
            match timeout {
                None => match kind {
                    LockKind::Exclusive => fs4::FileExt::lock(&file),
                    LockKind::Shared => fs4::FileExt::lock_shared(&file),
                }
                .map_err(io)?,
                Some(t) => {
                    let start = Instant::now();
                    loop {
                        if attempt(&file).map_err(io)? {
                            break;
                        }
                        if start.elapsed() >= t {
                            return Err(Error::LockTimeout {
                                path,
                                seconds: t.as_secs(),
                            });
                        }
                        std::thread::sleep(POLL.min(t.saturating_sub(start.elapsed())));
                    }
                }
            }
            eprintln!("{program}: got {}", path.display());
        }
        Ok(Self { file, path, kind })
    }

    /// Which lock is held.
    pub fn kind(&self) -> LockKind {
        self.kind
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StoreLock {
    fn drop(&mut self) {
        // Closing the file releases the lock too; unlocking first makes it immediate even
        // if a duplicate of the descriptor lived on.
        let _ = fs4::FileExt::unlock(&self.file);
    }
}

/// Opens (creating if needed) the lock file; a read-only store is locked through a read-only
/// descriptor, which `flock` accepts.
fn open_lock_file(path: &Path) -> Result<File> {
    match OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
    {
        Ok(f) => Ok(f),
        Err(first) => File::open(path).map_err(|_| Error::Io {
            path: path.to_owned(),
            source: first,
        }),
    }
}
