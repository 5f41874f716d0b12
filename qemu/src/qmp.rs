//! A minimal QMP (QEMU Machine Protocol) client over the VM's unix socket.
//!
//! Owns the handshake (`qmp_capabilities`) and one-command-at-a-time execution. It must
//! never block without a deadline: every read and connect is bounded, because it runs on
//! the shutdown path where a hung QEMU is exactly what we are dealing with.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to `socket`, retrying until `timeout` (QEMU creates it shortly after
    /// start), and leaves capabilities negotiation mode.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    tracing::trace!("QMP {}: {e}; retrying", socket.display());
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("connecting to QMP socket {}", socket.display()))
                }
            }
        };
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(500));
        stream
            .set_read_timeout(Some(left))
            .with_context(|| format!("setting a read timeout on {}", socket.display()))?;
        let writer = stream
            .try_clone()
            .with_context(|| format!("cloning QMP socket {}", socket.display()))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_message().context("reading the QMP greeting")?;
        if greeting.get("QMP").is_none() {
            bail!("unexpected QMP greeting: {greeting}");
        }
        qmp.execute("qmp_capabilities")?;
        Ok(qmp)
    }

    /// Runs `command` (no arguments) and returns its `return` value; asynchronous events
    /// that arrive in between are skipped.
    pub fn execute(&mut self, command: &str) -> Result<Value> {
        let request = serde_json::json!({ "execute": command });
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .with_context(|| format!("sending QMP command {command}"))?;
        loop {
            let msg = self
                .read_message()
                .with_context(|| format!("waiting for the reply to QMP command {command}"))?;
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                bail!("QMP command {command} failed: {err}");
            }
            // An event ({"event": ...}); keep reading.
        }
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .context("reading from QMP")?;
        if n == 0 {
            bail!("QMP connection closed by QEMU");
        }
        serde_json::from_str(&line).with_context(|| format!("parsing QMP message {line:?}"))
    }
}
