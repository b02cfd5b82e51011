//! A full disk made from outside the node: a small tmpfs mounted over a
//! node's data dir, which a drill fills with a ballast file and frees
//! again. The node sees exactly what a real full disk does to it (writes
//! and fsyncs failing with `ENOSPC`) and nothing else.
//!
//! Mounting needs root (or `CAP_SYS_ADMIN`); [`SmallDisk::mount`] says so
//! in its error rather than letting a caller believe the disk is small. The
//! mount carries what the directory held onto the tmpfs, and is always
//! undone: by [`SmallDisk::unmount`], which can carry what the node wrote
//! back onto the directory underneath, or else when the value is dropped
//! (a lazy unmount, so a process still holding files there cannot keep it
//! mounted; what the tmpfs held is then gone).

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Name of the ballast file in the mounted directory.
const BALLAST: &str = "ballast";

/// Why a small disk could not be made, filled, freed or undone.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The tmpfs could not be mounted.
    #[error("mounting a {size_mib} MiB tmpfs on {}: {source}{hint}", at.display(), hint = if source.raw_os_error() == Some(libc::EPERM) { " (mounting needs root)" } else { "" })]
    Mount {
        /// The directory it was to cover.
        at: PathBuf,
        /// Its size, MiB.
        size_mib: u64,
        /// Cause.
        source: std::io::Error,
    },
    /// A file operation on or around the small disk failed.
    #[error("{what} {}: {source}", at.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path involved.
        at: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// A tmpfs mounted over a directory; unmounted on drop.
#[derive(Debug)]
pub struct SmallDisk {
    at: PathBuf,
    mounted: bool,
}

fn c_path(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
}

impl SmallDisk {
    /// Mounts a tmpfs of `size_mib` MiB over `at` (created if missing) and
    /// moves what `at` held onto it, so a stopped node's data dir can be
    /// put on a small disk in place.
    pub fn mount(at: &Path, size_mib: u64) -> Result<SmallDisk, DiskError> {
        let failed = |source| DiskError::Mount {
            at: at.to_owned(),
            size_mib,
            source,
        };
        std::fs::create_dir_all(at).map_err(failed)?;
        let held = !read_dir(at)?.is_empty();
        let aside = aside(at);
        if held {
            rename(at, &aside)?;
            std::fs::create_dir(at).map_err(failed)?;
        }
        let mut disk = SmallDisk {
            at: at.to_owned(),
            mounted: false,
        };
        if let Err(e) = disk.attach(size_mib) {
            if held {
                std::fs::remove_dir(at).map_err(failed)?;
                rename(&aside, at)?;
            }
            return Err(failed(e));
        }
        if held {
            copy_dir(&aside, at)?;
            remove_tree(&aside)?;
        }
        Ok(disk)
    }

    fn attach(&mut self, size_mib: u64) -> std::io::Result<()> {
        let target = c_path(&self.at)?;
        let options = CString::new(format!("size={size_mib}m,mode=0700"))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: every pointer is to a NUL-terminated string that outlives
        // the call; tmpfs reads its options as such a string.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                options.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.mounted = true;
        Ok(())
    }

    /// Writes a ballast file until the filesystem is full; the bytes
    /// written. Blocks (a tmpfs fills at memory speed).
    pub fn fill(&self) -> Result<u64, DiskError> {
        let path = self.at.join(BALLAST);
        let io = |what| {
            let at = path.clone();
            move |source| DiskError::Io { what, at, source }
        };
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io("creating the ballast"))?;
        let mut written = 0u64;
        // Big blocks first, then small ones for what is left of the last.
        for size in [1 << 20, 4096] {
            let block = vec![0u8; size];
            while file.write_all(&block).is_ok() {
                written += size as u64;
            }
        }
        let _ = file.flush();
        Ok(written)
    }

    /// Removes the ballast, if any.
    pub fn free(&self) -> Result<(), DiskError> {
        let path = self.at.join(BALLAST);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(DiskError::Io {
                what: "removing the ballast",
                at: path,
                source: e,
            }),
            _ => Ok(()),
        }
    }

    /// Unmounts it. With `keep`, what it holds (the ballast apart) is
    /// moved onto the directory underneath, so the files outlive the mount;
    /// without, they are gone.
    pub fn unmount(mut self, keep: bool) -> Result<(), DiskError> {
        if !keep {
            return self.detach();
        }
        self.free()?;
        let aside = aside(&self.at);
        copy_dir(&self.at, &aside)?;
        self.detach()?;
        remove_tree(&self.at)?;
        rename(&aside, &self.at)
    }

    /// Lazy unmount (`MNT_DETACH`): a process still holding files in it
    /// cannot keep it mounted.
    fn detach(&mut self) -> Result<(), DiskError> {
        if !self.mounted {
            return Ok(());
        }
        self.mounted = false;
        let failed = |source| DiskError::Io {
            what: "unmounting",
            at: self.at.clone(),
            source,
        };
        let target = c_path(&self.at).map_err(failed)?;
        // SAFETY: a NUL-terminated path that outlives the call.
        if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(failed(std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        if let Err(e) = self.detach() {
            tracing::error!(error = %e, "a small disk could not be unmounted");
        }
    }
}

/// Where a directory's contents wait while a mount goes on or off: a
/// hidden sibling.
fn aside(at: &Path) -> PathBuf {
    let name = at.file_name().unwrap_or_default().to_string_lossy();
    at.with_file_name(format!(".{name}.moving"))
}

fn rename(from: &Path, to: &Path) -> Result<(), DiskError> {
    std::fs::rename(from, to).map_err(|source| DiskError::Io {
        what: "renaming to",
        at: to.to_owned(),
        source,
    })
}

fn remove_tree(dir: &Path) -> Result<(), DiskError> {
    std::fs::remove_dir_all(dir).map_err(|source| DiskError::Io {
        what: "removing",
        at: dir.to_owned(),
        source,
    })
}

fn read_dir(dir: &Path) -> Result<Vec<std::fs::DirEntry>, DiskError> {
    let failed = |source| DiskError::Io {
        what: "listing",
        at: dir.to_owned(),
        source,
    };
    std::fs::read_dir(dir)
        .map_err(failed)?
        .map(|e| e.map_err(failed))
        .collect()
}

/// Copies the tree `from` into `to` (created).
fn copy_dir(from: &Path, to: &Path) -> Result<(), DiskError> {
    std::fs::create_dir_all(to).map_err(|source| DiskError::Io {
        what: "creating",
        at: to.to_owned(),
        source,
    })?;
    for entry in read_dir(from)? {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target).map_err(|source| DiskError::Io {
                what: "copying to",
                at: target,
                source,
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs root, as the chaos runner's full disk and tests/full_disk.rs
    /// do (CI runs as root); without it the test fails saying so.
    #[test]
    fn a_small_disk_fills_frees_and_keeps_its_files_past_the_unmount() {
        let root = tempfile::tempdir().unwrap();
        let at = root.path().join("data");
        std::fs::create_dir_all(at.join("sub")).unwrap();
        std::fs::write(at.join("sub/before"), b"carried over").unwrap();
        let disk = SmallDisk::mount(&at, 4)
            .unwrap_or_else(|e| panic!("this test mounts a tmpfs and needs root: {e}"));
        assert_eq!(
            std::fs::read(at.join("sub/before")).unwrap(),
            b"carried over"
        );
        std::fs::write(at.join("sub/kept"), b"acknowledged").unwrap();
        let written = disk.fill().unwrap();
        assert!(
            (3 << 20..=4 << 20).contains(&written),
            "{written} bytes of ballast on a 4 MiB disk"
        );
        assert!(
            std::fs::write(at.join("more"), [0u8; 8192]).is_err(),
            "not full"
        );
        disk.free().unwrap();
        std::fs::write(at.join("more"), [0u8; 8192]).unwrap();
        disk.unmount(true).unwrap();
        assert_eq!(std::fs::read(at.join("sub/kept")).unwrap(), b"acknowledged");
        assert!(!at.join(BALLAST).exists());
        // Past the unmount: the directory is a plain one again, not 4 MiB.
        std::fs::write(at.join("big"), vec![0u8; 5 << 20]).unwrap();

        std::fs::remove_file(at.join("big")).unwrap();

        let dropped = SmallDisk::mount(&at, 4).unwrap();
        std::fs::write(at.join("gone"), b"x").unwrap();
        drop(dropped);
        assert!(!at.join("gone").exists(), "still mounted after the drop");
    }
}
