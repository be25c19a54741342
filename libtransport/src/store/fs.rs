//! Opening files so that a request can never leave its dataset.
//!
//! Paths inside a dataset are resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`
//! relative to the dataset's directory: `..`, absolute paths and symlinks that point outside
//! fail in the kernel, without a window between check and use. Where `openat2` is missing
//! (old kernels, some sandboxes) we walk the path one component at a time with `O_NOFOLLOW`,
//! which refuses every symlink: stricter, never looser.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;

use rustix::fs::{Mode, OFlags, ResolveFlags};

use crate::proto::ObjectPath;

/// Opens the regular file at `path` beneath `dir` for reading.
pub(crate) fn open_file_beneath(dir: &File, path: &ObjectPath) -> io::Result<File> {
    let file = open_beneath(dir, path.as_str(), OFlags::RDONLY)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::from(io::ErrorKind::NotFound));
    }
    Ok(file)
}

/// Opens (creating as needed) the directory holding `path`, beneath `dir`.
///
/// Each directory created is made durable by syncing its parent.
pub(crate) fn create_parent_beneath(dir: &File, path: &ObjectPath) -> io::Result<File> {
    let segments: Vec<&str> = path.segments().collect();
    let mut current = dir.try_clone()?;
    for segment in &segments[..segments.len().saturating_sub(1)] {
        match open_beneath(&current, segment, OFlags::RDONLY | OFlags::DIRECTORY) {
            Ok(next) => current = next,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match rustix::fs::mkdirat(current.as_fd(), *segment, Mode::from_raw_mode(0o755)) {
                    Ok(()) => {}
                    // Another writer made it first: fine.
                    Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                current.sync_all()?;
                current = open_beneath(&current, segment, OFlags::RDONLY | OFlags::DIRECTORY)?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(current)
}

/// Opens `path` beneath `dir`; escaping `dir` in any way fails with `NotFound`.
pub(crate) fn open_beneath(dir: &File, path: &str, flags: OFlags) -> io::Result<File> {
    let flags = flags | OFlags::CLOEXEC | OFlags::NOCTTY;
    match rustix::fs::openat2(
        dir.as_fd(),
        path,
        flags,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    ) {
        Ok(fd) => Ok(File::from(fd)),
        // EXDEV: resolution tried to leave `dir`. ELOOP: too many or refused links.
        Err(rustix::io::Errno::XDEV | rustix::io::Errno::LOOP) => Err(io::Error::new(
            io::ErrorKind::NotFound,
            "path leaves the dataset",
        )),
        Err(rustix::io::Errno::NOSYS | rustix::io::Errno::PERM) => walk_nofollow(dir, path, flags),
        Err(e) => Err(e.into()),
    }
}

/// Fallback without `openat2`: one component at a time, refusing every symlink.
fn walk_nofollow(dir: &File, path: &str, flags: OFlags) -> io::Result<File> {
    let segments: Vec<&str> = path.split('/').collect();
    let mut current = dir.try_clone()?;
    for (i, segment) in segments.iter().enumerate() {
        if segment.is_empty() || *segment == "." || *segment == ".." {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "path leaves the dataset",
            ));
        }
        let last = i + 1 == segments.len();
        let f = if last {
            flags | OFlags::NOFOLLOW
        } else {
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
        };
        let fd = rustix::fs::openat(current.as_fd(), *segment, f, Mode::empty()).map_err(|e| {
            if e == rustix::io::Errno::LOOP || e == rustix::io::Errno::NOTDIR {
                io::Error::new(io::ErrorKind::NotFound, "path leaves the dataset")
            } else {
                io::Error::from(e)
            }
        })?;
        current = File::from(fd);
    }
    Ok(current)
}

/// Creates (or reopens) a file named `name` directly in `dir`, for writing in place.
pub(crate) fn create_in(dir: &File, name: &str) -> io::Result<File> {
    let fd = rustix::fs::openat(
        dir.as_fd(),
        name,
        OFlags::RDWR | OFlags::CREATE | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::from_raw_mode(0o644),
    )?;
    Ok(File::from(fd))
}

/// Atomically renames `from` to `to`, both in `dir`, then makes the rename durable.
pub(crate) fn rename_in(dir: &File, from: &str, to: &str) -> io::Result<()> {
    rustix::fs::renameat(dir.as_fd(), from, dir.as_fd(), to)?;
    dir.sync_all()
}

/// Removes the file `name` in `dir`; a missing file is not an error.
pub(crate) fn remove_in(dir: &File, name: &str) -> io::Result<()> {
    match rustix::fs::unlinkat(dir.as_fd(), name, rustix::fs::AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Opens a directory by path (the dataset root or a dataset).
pub(crate) fn open_dir(path: &std::path::Path) -> io::Result<File> {
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    Ok(File::from(fd))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn tree() -> (tempfile::TempDir, File) {
        let tmp = tempfile::tempdir().unwrap();
        let ds = tmp.path().join("ds");
        std::fs::create_dir_all(ds.join("sub")).unwrap();
        std::fs::write(ds.join("sub/a.bin"), b"inside").unwrap();
        std::fs::write(tmp.path().join("secret.txt"), b"outside").unwrap();
        symlink("../secret.txt", ds.join("escape")).unwrap();
        symlink("/etc/hostname", ds.join("absolute")).unwrap();
        symlink("sub/a.bin", ds.join("inner")).unwrap();
        symlink("..", ds.join("up")).unwrap();
        let dir = open_dir(&ds).unwrap();
        (tmp, dir)
    }

    fn read(dir: &File, p: &str) -> io::Result<Vec<u8>> {
        use std::io::Read;
        let mut f = open_file_beneath(dir, &ObjectPath::new(p).unwrap())?;
        let mut v = Vec::new();
        f.read_to_end(&mut v)?;
        Ok(v)
    }

    #[test]
    fn symlinks_out_of_the_dataset_are_refused() {
        let (_tmp, dir) = tree();
        assert_eq!(read(&dir, "sub/a.bin").unwrap(), b"inside");
        assert_eq!(read(&dir, "inner").unwrap(), b"inside");
        for p in ["escape", "absolute", "up/secret.txt"] {
            let e = read(&dir, p).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::NotFound, "{p}: {e}");
        }
        // Raw strings that ObjectPath would refuse are refused here too.
        assert!(open_beneath(&dir, "../secret.txt", OFlags::RDONLY).is_err());
        assert!(open_beneath(&dir, "/etc/hostname", OFlags::RDONLY).is_err());
    }

    #[test]
    fn fallback_walk_refuses_every_symlink() {
        let (_tmp, dir) = tree();
        assert!(walk_nofollow(&dir, "sub/a.bin", OFlags::RDONLY).is_ok());
        for p in ["escape", "inner", "up/secret.txt", "../secret.txt"] {
            assert!(walk_nofollow(&dir, p, OFlags::RDONLY).is_err(), "{p}");
        }
    }

    #[test]
    fn directories_are_not_objects() {
        let (_tmp, dir) = tree();
        assert_eq!(
            read(&dir, "sub").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn parents_are_created_beneath_only() {
        let (tmp, dir) = tree();
        let p = ObjectPath::new("new/deeper/x.bin").unwrap();
        create_parent_beneath(&dir, &p).unwrap();
        assert!(tmp.path().join("ds/new/deeper").is_dir());
        // A parent that is a symlink out of the dataset is refused.
        let bad = ObjectPath::new("up/evil.bin").unwrap();
        assert!(create_parent_beneath(&dir, &bad).is_err());
    }
}
