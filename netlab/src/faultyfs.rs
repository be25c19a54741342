//! A disk that fails or stops answering on demand: a FUSE filesystem that passes every
//! operation through to a backing directory, with a switch. [`Mode::Fail`] makes every
//! operation that changes the disk (write, fsync, create, rename, truncate, mkdir, unlink)
//! return EIO, as a dying disk does; [`Mode::Hang`] makes them block until the switch is
//! thrown back, as a disk (or a network filesystem) that stops answering does. Reads and
//! lookups always pass. Processes that write there see real system calls fail or hang: no
//! mock in between.
//!
//! Mounted with the `fuser` crate's own mount(2) (root, `/dev/fuse`; no libfuse, no
//! `fusermount`), served by a thread of the test process; [`FaultyFs`] unmounts when
//! dropped, after switching back to pass-through so that nothing stays blocked.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyWrite, Request, WriteFlags,
};

/// What the disk does with operations that change it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Passes them through.
    Pass,
    /// Fails them with EIO.
    Fail,
    /// Blocks them until the mode changes.
    Hang,
}

/// A mounted faulty filesystem; see the module's documentation.
#[derive(Debug)]
pub struct FaultyFs {
    switch: Arc<Switch>,
    mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl FaultyFs {
    /// Mounts at `mountpoint` (an empty directory) a filesystem passing through to
    /// `backing`. Needs root and `/dev/fuse`.
    pub fn mount(backing: &Path, mountpoint: &Path) -> std::io::Result<Self> {
        let switch = Arc::new(Switch::default());
        let fs = Passthrough {
            switch: switch.clone(),
            inodes: Mutex::new(Inodes::new(backing.to_path_buf())),
            files: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        };
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("netlab-faultyfs".into()),
            fuser::MountOption::DefaultPermissions,
        ];
        let session = fuser::spawn_mount(fs, mountpoint, &config)?;
        Ok(Self {
            switch,
            mountpoint: mountpoint.to_path_buf(),
            session: Some(session),
        })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// Sets what the disk does from now on; operations blocked by [`Mode::Hang`] go on.
    pub fn set(&self, mode: Mode) {
        *self
            .switch
            .mode
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = mode;
        self.switch.changed.notify_all();
    }
}

impl Drop for FaultyFs {
    fn drop(&mut self) {
        self.set(Mode::Pass);
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
    }
}

#[derive(Debug)]
struct Switch {
    mode: Mutex<Mode>,
    changed: Condvar,
}

impl Default for Switch {
    fn default() -> Self {
        Self {
            mode: Mutex::new(Mode::Pass),
            changed: Condvar::new(),
        }
    }
}

impl Switch {
    /// Passes, fails, or blocks until the mode is not [`Mode::Hang`].
    fn gate(&self) -> Result<(), Errno> {
        let mut m = self.mode.lock().unwrap_or_else(PoisonError::into_inner);
        while *m == Mode::Hang {
            m = self.changed.wait(m).unwrap_or_else(PoisonError::into_inner);
        }
        if *m == Mode::Fail {
            return Err(Errno::EIO);
        }
        Ok(())
    }
}

/// Inode numbers for backing paths, handed out as the kernel looks them up.
struct Inodes {
    paths: HashMap<u64, PathBuf>,
    by_path: HashMap<PathBuf, u64>,
    next: u64,
}

impl Inodes {
    fn new(root: PathBuf) -> Self {
        let mut i = Self {
            paths: HashMap::new(),
            by_path: HashMap::new(),
            next: 2,
        };
        i.paths.insert(1, root.clone());
        i.by_path.insert(root, 1);
        i
    }

    fn ino(&mut self, path: &Path) -> u64 {
        if let Some(&i) = self.by_path.get(path) {
            return i;
        }
        let i = self.next;
        self.next += 1;
        self.paths.insert(i, path.to_path_buf());
        self.by_path.insert(path.to_path_buf(), i);
        i
    }

    fn rename(&mut self, from: &Path, to: &Path) {
        if let Some(i) = self.by_path.remove(from) {
            if let Some(old) = self.by_path.insert(to.to_path_buf(), i) {
                self.paths.remove(&old);
            }
            self.paths.insert(i, to.to_path_buf());
        }
    }
}

struct Passthrough {
    switch: Arc<Switch>,
    inodes: Mutex<Inodes>,
    files: Mutex<HashMap<u64, Arc<File>>>,
    next_fh: AtomicU64,
}

const TTL: Duration = Duration::ZERO;

fn errno(e: std::io::Error) -> Errno {
    Errno::from(e)
}

fn attr(ino: u64, m: &std::fs::Metadata) -> FileAttr {
    let t = |secs: i64, nsecs: i64| {
        UNIX_EPOCH
            + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
            + Duration::from_nanos(u64::try_from(nsecs).unwrap_or(0))
    };
    FileAttr {
        ino: INodeNo(ino),
        size: m.len(),
        blocks: m.blocks(),
        atime: t(m.atime(), m.atime_nsec()),
        mtime: t(m.mtime(), m.mtime_nsec()),
        ctime: t(m.ctime(), m.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind: if m.is_dir() {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: u16::try_from(m.mode() & 0o7777).unwrap_or(0o600),
        nlink: u32::try_from(m.nlink()).unwrap_or(1),
        uid: m.uid(),
        gid: m.gid(),
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl Passthrough {
    fn path(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        self.lock_inodes()
            .paths
            .get(&ino.0)
            .cloned()
            .ok_or(Errno::ENOENT)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(self.path(parent)?.join(name))
    }

    fn lock_inodes(&self) -> std::sync::MutexGuard<'_, Inodes> {
        self.inodes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn entry(&self, path: &Path) -> Result<FileAttr, Errno> {
        let m = std::fs::symlink_metadata(path).map_err(errno)?;
        let ino = self.lock_inodes().ino(path);
        Ok(attr(ino, &m))
    }

    fn file(&self, fh: FileHandle) -> Result<Arc<File>, Errno> {
        self.files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&fh.0)
            .cloned()
            .ok_or(Errno::EBADF)
    }

    fn keep(&self, f: File) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(fh, Arc::new(f));
        FileHandle(fh)
    }
}

/// Opens the backing file with the access mode asked for; `O_APPEND` is left to the
/// kernel, which sends each write with its offset.
fn open_backing(path: &Path, flags: i32, create: Option<u32>) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    match flags & libc_o_accmode() {
        0 => o.read(true),
        1 => o.write(true),
        _ => o.read(true).write(true),
    };
    if let Some(mode) = create {
        use std::os::unix::fs::OpenOptionsExt;
        o.create(true).write(true).mode(mode);
    }
    o.open(path)
}

const fn libc_o_accmode() -> i32 {
    0o3
}

impl fuser::Filesystem for Passthrough {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.child(parent, name).and_then(|p| self.entry(&p)) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.path(ino).and_then(|p| self.entry(&p)) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = (|| {
            let path = self.path(ino)?;
            if let Some(size) = size {
                self.switch.gate()?;
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(size))
                    .map_err(errno)?;
            }
            if let Some(mode) = mode {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(errno)?;
            }
            self.entry(&path)
        })();
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let r = (|| {
            self.switch.gate()?;
            let path = self.child(parent, name)?;
            std::fs::create_dir(&path).map_err(errno)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))
                .map_err(errno)?;
            self.entry(&path)
        })();
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = (|| {
            self.switch.gate()?;
            let path = self.child(parent, name)?;
            std::fs::remove_file(&path).map_err(errno)?;
            let mut i = self.lock_inodes();
            if let Some(ino) = i.by_path.remove(&path) {
                i.paths.remove(&ino);
            }
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = (|| {
            self.switch.gate()?;
            let from = self.child(parent, name)?;
            let to = self.child(newparent, newname)?;
            std::fs::rename(&from, &to).map_err(errno)?;
            self.lock_inodes().rename(&from, &to);
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self
            .path(ino)
            .and_then(|p| open_backing(&p, flags.0, None).map_err(errno))
        {
            Ok(f) => reply.opened(self.keep(f), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = (|| {
            self.switch.gate()?;
            let path = self.child(parent, name)?;
            let f = open_backing(&path, flags, Some(mode & 0o7777)).map_err(errno)?;
            Ok((self.entry(&path)?, self.keep(f)))
        })();
        match r {
            Ok((a, fh)) => reply.created(&TTL, &a, Generation(0), fh, FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let r = self.file(fh).and_then(|f| {
            let mut buf = vec![0; size as usize];
            let n = f.read_at(&mut buf, offset).map_err(errno)?;
            buf.truncate(n);
            Ok(buf)
        });
        match r {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let r = self.switch.gate().and_then(|()| {
            let f = self.file(fh)?;
            f.write_all_at(data, offset).map_err(errno)?;
            Ok(u32::try_from(data.len()).unwrap_or(u32::MAX))
        });
        match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self
            .switch
            .gate()
            .and_then(|()| self.file(fh)?.sync_data().map_err(errno));
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = (|| {
            let dir = self.path(ino)?;
            let mut entries = Vec::new();
            for e in std::fs::read_dir(&dir).map_err(errno)? {
                let e = e.map_err(errno)?;
                let kind = if e.file_type().map_err(errno)?.is_dir() {
                    FileType::Directory
                } else {
                    FileType::RegularFile
                };
                let ino = self.lock_inodes().ino(&e.path());
                entries.push((ino, kind, e.file_name()));
            }
            Ok(entries)
        })();
        match r {
            Ok(entries) => {
                for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self.switch.gate().and_then(|()| {
            File::open(self.path(ino)?)
                .and_then(|d| d.sync_all())
                .map_err(errno)
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    #[ignore = "needs root (FUSE): run with --ignored"]
    fn writes_pass_fail_with_eio_or_hang_until_switched_back() {
        let tmp = std::env::temp_dir().join(format!("faultyfs-{}", std::process::id()));
        let (backing, mnt) = (tmp.join("backing"), tmp.join("mnt"));
        std::fs::create_dir_all(&backing).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        let fs = FaultyFs::mount(&backing, &mnt).unwrap();
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(mnt.join("log"))
            .unwrap();
        f.write_all(b"one\n").unwrap();
        f.sync_data().unwrap();
        assert_eq!(std::fs::read(backing.join("log")).unwrap(), b"one\n");

        fs.set(Mode::Fail);
        let e = f.write_all(b"two\n").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(5), "{e}");
        assert_eq!(f.sync_data().unwrap_err().raw_os_error(), Some(5));

        fs.set(Mode::Hang);
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = std::thread::spawn(move || {
            let r = f.write_all(b"three\n");
            tx.send(()).unwrap();
            r
        });
        // Still blocked well after the write was issued (the control for the wait below).
        assert!(rx.recv_timeout(Duration::from_millis(500)).is_err());
        fs.set(Mode::Pass);
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        writer.join().unwrap().unwrap();
        assert_eq!(std::fs::read(backing.join("log")).unwrap(), b"one\nthree\n");
        drop(fs);
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
