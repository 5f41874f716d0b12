//! One running QEMU process: start, serial console, shutdown, cleanup.
//!
//! Owns the QEMU child process, its work directory (private OVMF vars copy, QMP socket,
//! stderr) and the thread that pumps the serial console into the log file and memory.
//! It must never leave a QEMU process behind: `Drop` kills it, and the kernel kills it
//! (`PR_SET_PDEATHSIG`) if this process dies without running `Drop`. It must never write
//! to the system OVMF vars template or, with `snapshot`, to the image it boots.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::config::Accel;
use crate::config::{
    display_command, qemu_args, DiskFormat, Firmware, VmConfig, WorkPaths, ACCEL_ENV,
};
use crate::firmware::find_qemu;
use crate::qmp::Qmp;

/// How many serial lines an error carries.
pub const TAIL_LINES: usize = 40;

/// Unix socket paths are limited to 108 bytes including the NUL (`sun_path`).
const MAX_SOCKET_PATH: usize = 107;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in the pump thread leaves the buffer consistent (append-only), so a poisoned
    // lock is still safe to read.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug, Default)]
struct SerialState {
    buf: Vec<u8>,
    /// QEMU closed its end of the console: it has exited (or is exiting).
    closed: bool,
}

#[derive(Debug, Default)]
struct Serial {
    state: Mutex<SerialState>,
    changed: Condvar,
}

/// Where a pattern was found on the serial console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialMatch {
    /// Byte offset of the first byte of the match in the serial log.
    pub start: usize,
    /// Byte offset just after the match: pass it to [`Vm::wait_for_serial_from`] to wait
    /// for the next occurrence.
    pub end: usize,
    /// The whole line containing the match (lossy UTF-8, without the line ending).
    pub line: String,
}

/// Why [`Vm::wait_for_serial`] gave up. Both variants carry the end of the serial log
/// (and QEMU's stderr) so a CI failure can be diagnosed from the error alone.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WaitError {
    #[error(
        "VM {vm}: {pattern:?} did not appear on the serial console within {waited:?}\n\
         --- last {TAIL_LINES} serial lines ---\n{tail}"
    )]
    Timeout {
        vm: String,
        pattern: String,
        waited: Duration,
        tail: String,
    },
    #[error(
        "VM {vm}: QEMU exited ({status}) before {pattern:?} appeared on the serial console\n\
         --- last {TAIL_LINES} serial lines ---\n{tail}\n--- QEMU stderr ---\n{stderr}"
    )]
    Exited {
        vm: String,
        pattern: String,
        status: String,
        tail: String,
        stderr: String,
    },
}

/// How [`Vm::shutdown`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// QEMU was already gone before we asked.
    AlreadyExited(ExitStatus),
    /// The guest honoured the ACPI power button and QEMU exited.
    PoweredOff(ExitStatus),
    /// The guest did not power off in time; QEMU was killed.
    Killed,
}

/// A handle that writes to the guest's serial console; cheap to clone and send to a
/// thread (e.g. one forwarding the terminal's input).
#[derive(Debug, Clone)]
pub struct SerialWriter {
    stdin: Arc<Mutex<Option<ChildStdin>>>,
}

impl SerialWriter {
    pub fn send(&self, bytes: &[u8]) -> Result<()> {
        let mut guard = lock(&self.stdin);
        let stdin = guard
            .as_mut()
            .context("the serial console input is closed (QEMU has exited)")?;
        stdin
            .write_all(bytes)
            .and_then(|()| stdin.flush())
            .context("writing to the serial console (QEMU's stdin)")
    }
}

/// A running QEMU guest. Dropping it kills QEMU and removes its work directory.
#[derive(Debug)]
pub struct Vm {
    name: String,
    child: Mutex<Child>,
    input: SerialWriter,
    serial: Arc<Serial>,
    pump: Option<JoinHandle<()>>,
    work: WorkPaths,
    /// `None` when the work directory is kept.
    work_dir: Option<tempfile::TempDir>,
    serial_log_path: PathBuf,
    stderr_path: PathBuf,
    command_line: String,
}

impl Vm {
    /// Starts QEMU for `cfg` and returns once the process runs (not once the guest boots).
    ///
    /// Any thread may call this and hand the `Vm` to another: QEMU is forked from one
    /// process-wide spawner thread, so it dies with this process, not with the caller.
    pub fn start(cfg: &VmConfig) -> Result<Vm> {
        cfg.validate()?;
        let accel = cfg
            .accel
            .resolve(std::env::var(ACCEL_ENV).ok().as_deref())
            .with_context(|| format!("reading {ACCEL_ENV}"))?;
        if accel == Accel::Kvm {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .context("KVM was requested but /dev/kvm cannot be opened read-write")?;
        }
        let qemu = match &cfg.qemu_binary {
            Some(p) => p.clone(),
            None => find_qemu()?,
        };
        let cfg = resolve_formats(cfg)?;
        if let Firmware::DirectKernel { kernel, initrd, .. } = &cfg.firmware {
            for p in std::iter::once(kernel).chain(initrd) {
                fs::metadata(p).with_context(|| format!("kernel or initrd {}", p.display()))?;
            }
        }

        let parent = match &cfg.work_parent {
            Some(p) => p.clone(),
            None => std::env::temp_dir(),
        };
        let tmp = tempfile::Builder::new()
            .prefix(&format!("imgqemu-{}-", cfg.name))
            .tempdir_in(&parent)
            .with_context(|| format!("creating a work directory in {}", parent.display()))?;
        let mut work = WorkPaths::new(tmp.path());
        if let Some(p) = &cfg.vars_file {
            work.vars = p.clone();
        }
        if work.qmp_socket.as_os_str().len() > MAX_SOCKET_PATH {
            bail!(
                "QMP socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter work_parent",
                work.qmp_socket.display()
            );
        }
        let keep_vars = cfg.vars_file.as_ref().is_some_and(|p| p.exists());
        if let (Firmware::Uefi(ovmf), false) = (&cfg.firmware, keep_vars) {
            // A private copy: OVMF writes its variables (boot entries, BootOrder) here.
            fs::copy(&ovmf.vars_template, &work.vars).with_context(|| {
                format!(
                    "copying OVMF vars template {} to {}",
                    ovmf.vars_template.display(),
                    work.vars.display()
                )
            })?;
            fs::set_permissions(&work.vars, fs::Permissions::from_mode(0o600))
                .with_context(|| format!("making {} writable", work.vars.display()))?;
        }

        let args = qemu_args(&cfg, accel, &work);
        let command_line = display_command(&qemu, &args);
        let serial_log_path = cfg
            .serial_log
            .clone()
            .unwrap_or_else(|| work.dir.join("serial.log"));
        let mut log = File::create(&serial_log_path)
            .with_context(|| format!("creating serial log {}", serial_log_path.display()))?;
        writeln!(log, "# imgqemu {}: {command_line}", cfg.name)
            .with_context(|| format!("writing serial log {}", serial_log_path.display()))?;
        let stderr_path = work.dir.join("qemu.stderr");
        let stderr = File::create(&stderr_path)
            .with_context(|| format!("creating {}", stderr_path.display()))?;
        tracing::info!(vm = %cfg.name, "starting {command_line}");

        let mut cmd = Command::new(&qemu);
        cmd.args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            // Own process group: a terminal's Ctrl-C reaches us, and we shut the guest
            // down cleanly instead of QEMU dying mid-write.
            .process_group(0);
        die_with_parent(&mut cmd);
        let mut child =
            spawn_from_spawner(cmd).with_context(|| format!("starting {}", qemu.display()))?;
        let (Some(stdout), stdin) = (child.stdout.take(), child.stdin.take()) else {
            // Unreachable with Stdio::piped(); never leave the child running regardless.
            let _ = child.kill();
            let _ = child.wait();
            bail!("QEMU's stdout was not captured");
        };

        let serial = Arc::new(Serial::default());
        let pump = {
            let serial = Arc::clone(&serial);
            let echo = cfg.echo_serial;
            let path = serial_log_path.clone();
            std::thread::Builder::new()
                .name(format!("serial-{}", cfg.name))
                .spawn(move || pump_serial(stdout, log, &path, echo, &serial))
        };
        let pump = match pump {
            Ok(p) => p,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e).context("starting the serial pump thread");
            }
        };

        let work_dir = if cfg.keep_work_dir {
            let kept = tmp.keep();
            tracing::info!(vm = %cfg.name, "keeping work directory {}", kept.display());
            None
        } else {
            Some(tmp)
        };
        Ok(Vm {
            name: cfg.name.clone(),
            child: Mutex::new(child),
            input: SerialWriter {
                stdin: Arc::new(Mutex::new(stdin)),
            },
            serial,
            pump: Some(pump),
            work,
            work_dir,
            serial_log_path,
            stderr_path,
            command_line,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        lock(&self.child).id()
    }

    /// The command line QEMU was started with, for humans.
    pub fn command_line(&self) -> &str {
        &self.command_line
    }

    pub fn work_dir(&self) -> &Path {
        &self.work.dir
    }

    pub fn qmp_socket(&self) -> &Path {
        &self.work.qmp_socket
    }

    /// The private copy of the OVMF variable store (exists for UEFI guests only).
    pub fn vars_path(&self) -> &Path {
        &self.work.vars
    }

    pub fn serial_log_path(&self) -> &Path {
        &self.serial_log_path
    }

    /// Everything the guest wrote to its serial console so far (lossy UTF-8).
    pub fn serial_log(&self) -> String {
        String::from_utf8_lossy(&lock(&self.serial.state).buf).into_owned()
    }

    /// The current length of the serial log, to wait for output that comes after now.
    pub fn serial_mark(&self) -> usize {
        lock(&self.serial.state).buf.len()
    }

    /// Waits until `pattern` (a plain substring) appears anywhere on the serial console.
    pub fn wait_for_serial(
        &self,
        pattern: &str,
        timeout: Duration,
    ) -> Result<SerialMatch, WaitError> {
        self.wait_for_serial_from(0, pattern, timeout)
    }

    /// Waits until `pattern` appears at or after byte offset `from` of the serial log
    /// (see [`SerialMatch::end`] and [`Vm::serial_mark`]).
    pub fn wait_for_serial_from(
        &self,
        from: usize,
        pattern: &str,
        timeout: Duration,
    ) -> Result<SerialMatch, WaitError> {
        let started = Instant::now();
        let deadline = started + timeout;
        let needle = pattern.as_bytes();
        let mut scanned = from;
        let mut st = lock(&self.serial.state);
        loop {
            // Re-scan the last len-1 bytes: a match may straddle two chunks.
            let start = scanned
                .saturating_sub(needle.len().saturating_sub(1))
                .max(from)
                .min(st.buf.len());
            if let Some(i) = find(&st.buf[start..], needle) {
                let at = start + i;
                return Ok(SerialMatch {
                    start: at,
                    end: at + needle.len(),
                    line: line_around(&st.buf, at),
                });
            }
            scanned = st.buf.len();
            if st.closed {
                drop(st);
                let status = match self.wait_exit(Duration::from_secs(2)) {
                    Some(s) => s.to_string(),
                    None => "still running, console closed".to_owned(),
                };
                return Err(WaitError::Exited {
                    vm: self.name.clone(),
                    pattern: pattern.to_owned(),
                    status,
                    tail: self.serial_tail(TAIL_LINES),
                    stderr: self.stderr_tail(TAIL_LINES),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                drop(st);
                return Err(WaitError::Timeout {
                    vm: self.name.clone(),
                    pattern: pattern.to_owned(),
                    waited: now - started,
                    tail: self.serial_tail(TAIL_LINES),
                });
            }
            st = self
                .serial
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The last `n` lines of the serial log, with terminal escape sequences removed.
    pub fn serial_tail(&self, n: usize) -> String {
        let text = strip_ansi(&self.serial_log());
        last_lines(&text, n)
    }

    fn stderr_tail(&self, n: usize) -> String {
        match fs::read(&self.stderr_path) {
            Ok(b) => last_lines(&String::from_utf8_lossy(&b), n),
            Err(e) => format!("(cannot read {}: {e})", self.stderr_path.display()),
        }
    }

    /// Types `text` on the guest's serial console.
    pub fn send_serial(&self, text: &str) -> Result<()> {
        self.input.send(text.as_bytes())
    }

    /// A cloneable handle to the serial console input.
    pub fn serial_writer(&self) -> SerialWriter {
        self.input.clone()
    }

    /// `Some(status)` once QEMU has exited.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>> {
        lock(&self.child)
            .try_wait()
            .with_context(|| format!("checking whether QEMU ({}) exited", self.name))
    }

    /// Polls for QEMU's exit for up to `timeout`.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.try_wait() {
                Ok(Some(s)) => return Some(s),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Ok(None) => return None,
                Err(e) => {
                    tracing::warn!("{e:#}");
                    return None;
                }
            }
        }
    }

    /// Presses the ACPI power button (QMP `system_powerdown`) and returns at once.
    pub fn powerdown(&self) -> Result<()> {
        let mut qmp = Qmp::connect(&self.work.qmp_socket, Duration::from_secs(3))?;
        qmp.execute("system_powerdown")?;
        Ok(())
    }

    /// Asks the guest to power off and waits up to `timeout`; kills QEMU if it does not.
    pub fn shutdown(&self, timeout: Duration) -> Result<Shutdown> {
        if let Some(s) = self.try_wait()? {
            return Ok(Shutdown::AlreadyExited(s));
        }
        if let Err(e) = self.powerdown() {
            tracing::warn!(vm = %self.name, "power button failed, killing QEMU: {e:#}");
        } else if let Some(s) = self.wait_exit(timeout) {
            return Ok(Shutdown::PoweredOff(s));
        }
        self.kill()?;
        Ok(Shutdown::Killed)
    }

    /// Kills QEMU (SIGKILL) and reaps it. Harmless if it already exited.
    pub fn kill(&self) -> Result<()> {
        let mut child = lock(&self.child);
        if child.try_wait().ok().flatten().is_none() {
            child
                .kill()
                .with_context(|| format!("killing QEMU ({}, pid {})", self.name, child.id()))?;
        }
        child
            .wait()
            .with_context(|| format!("reaping QEMU ({}, pid {})", self.name, child.id()))?;
        Ok(())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            tracing::error!(vm = %self.name, "{e:#}");
        }
        // Closing stdin and joining the pump: QEMU is gone, so its stdout is at EOF.
        lock(&self.input.stdin).take();
        if let Some(p) = self.pump.take() {
            let _ = p.join();
        }
        if let Some(dir) = self.work_dir.take() {
            let path = dir.path().to_owned();
            if let Err(e) = dir.close() {
                tracing::warn!("removing work directory {}: {e}", path.display());
            }
        }
    }
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` from a thread that lives as long as the process.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the
/// process. Forking every QEMU from this one never-ending thread makes the signal mean
/// "this process died", whichever thread started or owns the `Vm`.
fn spawn_from_spawner(cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        let started = std::thread::Builder::new()
            .name("imgqemu-spawner".into())
            .spawn(move || {
                // Never returns: the static sender keeps the channel open.
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            });
        if let Err(e) = started {
            tracing::error!("starting the QEMU spawner thread: {e}");
        }
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    lock(spawner)
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("the QEMU spawner thread is not running"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("the QEMU spawner thread did not answer"))?
}

/// Makes the kernel SIGKILL QEMU when the thread that forks it dies (see
/// [`spawn_from_spawner`]), so a crashed or killed `imgbuild` never leaves a guest running.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec. It only calls prctl(2)
    // and getppid(2), which are async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl; then nobody would kill us.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Fills in disk formats left as `None` from the images' headers.
fn resolve_formats(cfg: &VmConfig) -> Result<VmConfig> {
    let mut cfg = cfg.clone();
    if let Some(disk) = &cfg.disk {
        cfg.disk_format = Some(match cfg.disk_format {
            Some(f) => check_disk(disk).map(|()| f)?,
            None => detect_format(disk)?,
        });
    }
    for d in &mut cfg.extra_disks {
        d.format = Some(match d.format {
            Some(f) => check_disk(&d.path).map(|()| f)?,
            None => detect_format(&d.path)?,
        });
    }
    Ok(cfg)
}

/// Fails early, naming the path, rather than letting QEMU fail after it started.
fn check_disk(path: &Path) -> Result<()> {
    fs::metadata(path).with_context(|| format!("disk image {}", path.display()))?;
    Ok(())
}

/// Reads the first bytes of a disk image to tell qcow2 from raw.
pub fn detect_format(path: &Path) -> Result<DiskFormat> {
    let mut f =
        File::open(path).with_context(|| format!("opening disk image {}", path.display()))?;
    let mut head = [0u8; 4];
    let mut got = 0;
    while got < head.len() {
        let n = f
            .read(&mut head[got..])
            .with_context(|| format!("reading the header of {}", path.display()))?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(DiskFormat::from_magic(&head[..got]))
}

fn pump_serial(mut out: ChildStdout, mut log: File, log_path: &Path, echo: bool, serial: &Serial) {
    let mut buf = [0u8; 8192];
    let mut log_ok = true;
    loop {
        let n = match out.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!("reading the serial console: {e}");
                break;
            }
        };
        let chunk = &buf[..n];
        if log_ok {
            if let Err(e) = log.write_all(chunk) {
                tracing::warn!(
                    "writing serial log {}: {e}; no longer logging",
                    log_path.display()
                );
                log_ok = false;
            }
        }
        if echo {
            let mut so = io::stdout().lock();
            // The terminal going away must not stop the log or the waiters.
            let _ = so.write_all(chunk).and_then(|()| so.flush());
        }
        lock(&serial.state).buf.extend_from_slice(chunk);
        serial.changed.notify_all();
    }
    lock(&serial.state).closed = true;
    serial.changed.notify_all();
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

fn line_around(buf: &[u8], at: usize) -> String {
    let start = buf[..at]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let end = buf[at..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(buf.len(), |i| at + i);
    strip_ansi(&String::from_utf8_lossy(&buf[start..end]))
        .trim_end_matches('\r')
        .to_owned()
}

fn last_lines(text: &str, n: usize) -> String {
    // Screen-painting firmware rewrites lines with a bare CR: treat it as a line break.
    let lines: Vec<&str> = text
        .split(['\n', '\r'])
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Removes CSI escape sequences (`ESC [ ... final-byte`) that firmware and consoles use
/// to paint screens; they make CI logs unreadable.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if ('\u{40}'..='\u{7e}').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_substring() {
        assert_eq!(find(b"hello world", b"o w"), Some(4));
        assert_eq!(find(b"hello", b"xyz"), None);
        assert_eq!(find(b"ab", b"abc"), None);
        assert_eq!(find(b"ab", b""), Some(0));
    }

    #[test]
    fn line_around_a_match() {
        let buf = b"first\r\nsecond Linux version 6\r\nthird";
        let at = find(buf, b"Linux").expect("present");
        assert_eq!(line_around(buf, at), "second Linux version 6");
        assert_eq!(line_around(buf, 0), "first");
    }

    #[test]
    fn tail_keeps_the_last_non_empty_lines() {
        let text = (1..=50)
            .map(|i| format!("line {i}\r\n\n"))
            .collect::<String>();
        let tail = last_lines(&text, 3);
        assert_eq!(tail, "line 48\nline 49\nline 50");
    }

    #[test]
    fn ansi_sequences_are_removed() {
        let s = "\u{1b}[2J\u{1b}[01;01HBdsDxe: failed\r\u{1b}[1m\u{1b}[33mShell> \u{1b}[0m";
        assert_eq!(strip_ansi(s), "BdsDxe: failed\rShell> ");
        assert_eq!(last_lines(&strip_ansi(s), 1), "Shell> ");
    }

    #[test]
    fn format_detection_reads_the_header() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = dir.path().join("a.qcow2");
        fs::write(&q, b"QFI\xfb\0\0\0\x03rest").expect("write");
        assert_eq!(detect_format(&q).expect("detect"), DiskFormat::Qcow2);
        let r = dir.path().join("a.raw");
        fs::write(&r, [0u8; 10]).expect("write");
        assert_eq!(detect_format(&r).expect("detect"), DiskFormat::Raw);
        let e = dir.path().join("empty");
        fs::write(&e, b"").expect("write");
        assert_eq!(detect_format(&e).expect("detect"), DiskFormat::Raw);
        let err = detect_format(&dir.path().join("missing")).expect_err("missing");
        assert!(format!("{err:#}").contains("missing"));
    }

    #[test]
    fn start_names_a_missing_disk_before_spawning_anything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope.raw");
        let ovmf = crate::Ovmf {
            code: dir.path().join("CODE.fd"),
            vars_template: dir.path().join("VARS.fd"),
        };
        for format in [None, Some(DiskFormat::Raw)] {
            let mut cfg = VmConfig::uefi("missing", ovmf.clone(), &missing);
            cfg.disk_format = format;
            cfg.accel = Accel::Tcg;
            cfg.qemu_binary = Some(PathBuf::from("/bin/false"));
            cfg.work_parent = Some(dir.path().to_owned());
            let err = Vm::start(&cfg).expect_err("missing disk");
            assert!(format!("{err:#}").contains("nope.raw"), "{err:#}");
        }
        // No work directory was left behind.
        let left: Vec<_> = fs::read_dir(dir.path())
            .expect("read_dir")
            .filter_map(|e| e.ok())
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
