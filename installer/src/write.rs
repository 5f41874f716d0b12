//! Writing an image to a disk the way coreos-installer does: the first MiB (protective
//! MBR, primary GPT) is held back in memory while the rest streams to the disk, and is
//! written only after the streamed bytes' sha256 matched the signed one. The disk's old
//! partition tables are wiped first, so a disk interrupted at any point does not boot.
//! Afterwards the written range is read back (page cache dropped) and hashed again.
//!
//! Owns the write order, block sizes, fsyncs and both hash comparisons. It never decides
//! *whether* a target may be written (that is [`crate::target`]) and never writes the
//! first MiB of an image whose hash did not match.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;

use sha2::{Digest, Sha256};

use crate::MIB;

/// Bytes per read and write: large and a multiple of every sector and page size, so a
/// device (or O_DIRECT) sees aligned, sequential 4 MiB requests.
pub const BLOCK: usize = 4 << 20;

/// The part of the image written last.
pub const HEAD: u64 = MIB;

/// What the progress callback is told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Bytes of the image written so far.
    Write,
    /// Bytes read back and hashed so far.
    ReadBack,
}

/// Why writing stopped. The first MiB was written only for `ReadBackMismatch`.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("the image is {actual} bytes, expected {expected}")]
    Length { expected: u64, actual: u64 },
    #[error("the streamed image has sha256 {actual}, the signed one is {expected}; its partition table was not written, so the disk will not boot")]
    HashMismatch { expected: String, actual: String },
    #[error("read back from the disk, the image has sha256 {actual}, expected {expected}: the disk or its controller corrupted the data")]
    ReadBackMismatch { expected: String, actual: String },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> WriteError {
    move |source| WriteError::Io { what, source }
}

/// Reads until `buf` is full or the source ends; returns the bytes read.
fn fill(src: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match src.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Drops cached pages of `f` so a read-back reaches the device (best effort: tmpfs and
/// some filesystems ignore it).
fn drop_cache(f: &File) {
    let _ = nix::fcntl::posix_fadvise(
        f.as_raw_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
}

/// Size of the target: the device's size, or a regular file's length.
pub fn target_len(target: &mut File) -> io::Result<u64> {
    let len = target.seek(SeekFrom::End(0))?;
    target.seek(SeekFrom::Start(0))?;
    Ok(len)
}

/// Writes exactly `image_len` bytes from `src` to `target`, whose signed sha256 is
/// `expected`: wipe old tables, stream from 1 MiB on, compare the hash, write the first
/// MiB, fsync, read back and compare again.
pub fn write_image(
    src: impl Read,
    target: &mut File,
    image_len: u64,
    expected: &str,
    progress: &mut dyn FnMut(Phase, u64),
) -> Result<(), WriteError> {
    write_image_with(src, target, image_len, expected, false, progress)
}

/// [`write_image`], optionally skipping blocks that are all zeros (`skip_zeros`): only
/// for a target known to read zeros where nothing was written, such as a fresh RAM disk
/// (`brd` allocates memory only for written pages).
pub fn write_image_with(
    mut src: impl Read,
    target: &mut File,
    image_len: u64,
    expected: &str,
    skip_zeros: bool,
    progress: &mut dyn FnMut(Phase, u64),
) -> Result<(), WriteError> {
    if image_len < HEAD {
        return Err(WriteError::Length {
            expected: HEAD,
            actual: image_len,
        });
    }
    let old_len = target_len(target).map_err(io_err("finding the target's size"))?;
    // Wipe the old primary table and, past the image's end, the old backup GPT: until the
    // new first MiB lands, nothing on this disk is bootable.
    let zeros = vec![0u8; HEAD as usize];
    target
        .write_all(&zeros)
        .map_err(io_err("wiping the target's first MiB"))?;
    if old_len >= image_len + HEAD {
        target
            .seek(SeekFrom::Start(old_len - HEAD))
            .and_then(|_| target.write_all(&zeros))
            .map_err(io_err("wiping the target's last MiB (old backup GPT)"))?;
    }
    target
        .sync_all()
        .map_err(io_err("syncing the wiped target"))?;

    let mut hash = Sha256::new();
    let mut head = vec![0u8; HEAD as usize];
    let n = fill(&mut src, &mut head).map_err(io_err("reading the image"))?;
    if (n as u64) < HEAD {
        return Err(WriteError::Length {
            expected: image_len,
            actual: n as u64,
        });
    }
    hash.update(&head);
    target
        .seek(SeekFrom::Start(HEAD))
        .map_err(io_err("seeking the target"))?;
    let mut buf = vec![0u8; BLOCK];
    let mut done = HEAD;
    loop {
        let n = fill(&mut src, &mut buf).map_err(io_err("reading the image"))?;
        if n == 0 {
            break;
        }
        done += n as u64;
        if done > image_len {
            return Err(WriteError::Length {
                expected: image_len,
                actual: done,
            });
        }
        hash.update(&buf[..n]);
        if skip_zeros && buf[..n].iter().all(|&b| b == 0) {
            target
                .seek(SeekFrom::Current(n as i64))
                .map_err(io_err("seeking the target"))?;
        } else {
            target
                .write_all(&buf[..n])
                .map_err(io_err("writing the target"))?;
        }
        progress(Phase::Write, done);
    }
    if done != image_len {
        return Err(WriteError::Length {
            expected: image_len,
            actual: done,
        });
    }
    let actual = hex::encode(hash.finalize());
    if !actual.eq_ignore_ascii_case(expected) {
        return Err(WriteError::HashMismatch {
            expected: expected.to_owned(),
            actual,
        });
    }
    target.sync_all().map_err(io_err("syncing the target"))?;
    target
        .seek(SeekFrom::Start(0))
        .and_then(|_| target.write_all(&head))
        .map_err(io_err("writing the first MiB (partition table)"))?;
    target
        .sync_all()
        .map_err(io_err("syncing the partition table"))?;
    progress(Phase::Write, image_len);

    drop_cache(target);
    let actual = read_back(target, image_len, progress).map_err(io_err("reading back"))?;
    if !actual.eq_ignore_ascii_case(expected) {
        return Err(WriteError::ReadBackMismatch {
            expected: expected.to_owned(),
            actual,
        });
    }
    Ok(())
}

/// sha256 of the first `len` bytes of `target`.
pub fn read_back(
    target: &mut File,
    len: u64,
    progress: &mut dyn FnMut(Phase, u64),
) -> io::Result<String> {
    target.seek(SeekFrom::Start(0))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; BLOCK];
    let mut done = 0u64;
    while done < len {
        let want = (len - done).min(BLOCK as u64) as usize;
        let n = fill(target, &mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the target ends after {done} of {len} bytes"),
            ));
        }
        hash.update(&buf[..n]);
        done += n as u64;
        progress(Phase::ReadBack, done);
    }
    Ok(hex::encode(hash.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn image(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn sha(b: &[u8]) -> String {
        hex::encode(Sha256::digest(b))
    }

    #[test]
    fn writes_everything_and_the_head_last() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(9 * MIB as usize + 123);
        let path = dir.path().join("disk");
        // an old disk, larger than the image, with an old "backup GPT" at its end
        fs::write(&path, vec![0xAAu8; 16 * MIB as usize]).unwrap();
        let mut t = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut seen = Vec::new();
        write_image(
            &img[..],
            &mut t,
            img.len() as u64,
            &sha(&img),
            &mut |p, n| seen.push((p, n)),
        )
        .unwrap();
        let out = fs::read(&path).unwrap();
        assert_eq!(&out[..img.len()], &img[..]);
        assert!(out[16 * MIB as usize - MIB as usize..]
            .iter()
            .all(|&b| b == 0));
        assert_eq!(seen.last(), Some(&(Phase::ReadBack, img.len() as u64)));
        let writes: Vec<u64> = seen
            .iter()
            .filter(|s| s.0 == Phase::Write)
            .map(|s| s.1)
            .collect();
        assert!(writes.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn skipping_zero_blocks_still_verifies_the_whole_image() {
        let dir = tempfile::tempdir().unwrap();
        let mut img = image(12 * MIB as usize);
        img[5 * MIB as usize..9 * MIB as usize].fill(0);
        let path = dir.path().join("ram");
        fs::write(&path, vec![0u8; 12 * MIB as usize]).unwrap();
        let mut t = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        write_image_with(
            &img[..],
            &mut t,
            img.len() as u64,
            &sha(&img),
            true,
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(fs::read(&path).unwrap(), img);
    }

    #[test]
    fn wrong_hash_leaves_no_partition_table() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(3 * MIB as usize);
        let path = dir.path().join("disk");
        fs::write(&path, vec![0xAAu8; 4 * MIB as usize]).unwrap();
        let mut t = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let err = write_image(
            &img[..],
            &mut t,
            img.len() as u64,
            &"0".repeat(64),
            &mut |_, _| {},
        )
        .unwrap_err();
        assert!(matches!(err, WriteError::HashMismatch { .. }), "{err}");
        let out = fs::read(&path).unwrap();
        assert!(
            out[..MIB as usize].iter().all(|&b| b == 0),
            "first MiB must stay wiped"
        );
    }

    #[test]
    fn short_and_long_images_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(2 * MIB as usize);
        let path = dir.path().join("disk");
        let mut t = fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let e = write_image(
            &img[..],
            &mut t,
            img.len() as u64 + 1,
            &sha(&img),
            &mut |_, _| {},
        );
        assert!(matches!(e, Err(WriteError::Length { .. })));
        let e = write_image(
            &img[..],
            &mut t,
            img.len() as u64 - 1,
            &sha(&img),
            &mut |_, _| {},
        );
        assert!(matches!(e, Err(WriteError::Length { .. })));
    }
}
