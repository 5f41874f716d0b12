//! `imgkubetest`: a real Kubernetes control plane for tests.
//!
//! [`ControlPlane::start`] runs Debian's etcd and the kube-apiserver built by
//! `scripts/build-k8s` (plus kube-controller-manager and kube-scheduler when asked, for
//! PodDisruptionBudget status and scheduling), all on 127.0.0.1 with free ports, bearer
//! token auth from a `tokens.csv`, and a kubeconfig for kubectl. Keys, tokens and data
//! live in a temporary directory created per control plane; dropping the
//! [`ControlPlane`] kills every process and removes the directory. It owns nothing
//! outside that directory and never listens on anything but 127.0.0.1.
//!
//! Missing binaries are an error ("run scripts/build-k8s"), never a silent skip.

pub mod etcd;
pub use etcd::Etcd;

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where `scripts/build-k8s` puts its results unless `IMGBUILD_K8S_CACHE` says otherwise.
pub const DEFAULT_CACHE: &str = "/var/cache/imgbuild/k8s";

/// Why a control plane could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error("{binary} not found (looked in {looked}): run scripts/build-k8s")]
    MissingBinary { binary: String, looked: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed: {message}")]
    Command { command: String, message: String },
    #[error("{component} did not become ready within {seconds} s; last lines of its log:\n{log}")]
    NotReady {
        component: String,
        seconds: u64,
        log: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ControlPlaneError {
    let what = what.into();
    move |source| ControlPlaneError::Io { what, source }
}

/// What to start.
#[derive(Debug, Clone, Default)]
pub struct ControlPlaneOptions {
    /// Also run kube-controller-manager (disruption controller: PDB status, garbage
    /// collector, ...) and kube-scheduler.
    pub pdb_controller: bool,
    /// Directory with kube-apiserver etc.; default `$IMGBUILD_K8S_CACHE/bin`.
    pub bin_dir: Option<PathBuf>,
    /// Address the API server listens on; default 127.0.0.1.
    pub bind_address: Option<String>,
}

/// A running control plane. Dropping it stops everything and removes its files.
#[derive(Debug)]
pub struct ControlPlane {
    /// `https://127.0.0.1:PORT`.
    pub server: String,
    /// Bearer token of a `system:masters` user.
    pub token: String,
    /// PEM of the API server's self-signed CA and certificate (trust these as roots).
    pub ca_pem: Vec<u8>,
    /// A kubeconfig for kubectl.
    pub kubeconfig: PathBuf,
    /// The API server's port.
    pub port: u16,
    /// Time from `start` to ready.
    pub startup: Duration,
    bin_dir: PathBuf,
    children: Vec<(String, Child)>,
    dir: tempfile::TempDir,
}

/// The cache directory of `scripts/build-k8s`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("IMGBUILD_K8S_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE))
}

/// Path of a binary built by `scripts/build-k8s` (kubelet, kube-apiserver, ...).
pub fn k8s_binary(bin_dir: &Path, name: &str) -> Result<PathBuf, ControlPlaneError> {
    let p = bin_dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(ControlPlaneError::MissingBinary {
            binary: name.to_string(),
            looked: bin_dir.display().to_string(),
        })
    }
}

/// Debian's etcd: the installed one, else the one `scripts/build-k8s` extracted.
pub fn etcd_binary() -> Result<PathBuf, ControlPlaneError> {
    let candidates = [
        PathBuf::from("/usr/bin/etcd"),
        cache_dir().join("root/usr/bin/etcd"),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| ControlPlaneError::MissingBinary {
            binary: "etcd".into(),
            looked: candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> Result<u16, ControlPlaneError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
    Ok(l.local_addr().map_err(io("finding a free port"))?.port())
}

fn random_hex(bytes: usize) -> Result<String, ControlPlaneError> {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(io("reading /dev/urandom"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn run(cmd: &mut Command) -> Result<(), ControlPlaneError> {
    let out = cmd.output().map_err(io(format!("running {cmd:?}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ControlPlaneError::Command {
            command: format!("{cmd:?}"),
            message: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl ControlPlane {
    /// Start etcd and kube-apiserver (and more, see [`ControlPlaneOptions`]) and wait
    /// until the API server's `/readyz` says ok.
    pub async fn start(opts: ControlPlaneOptions) -> Result<ControlPlane, ControlPlaneError> {
        let t0 = Instant::now();
        let bin_dir = opts
            .bin_dir
            .clone()
            .unwrap_or_else(|| cache_dir().join("bin"));
        let apiserver = k8s_binary(&bin_dir, "kube-apiserver")?;
        let etcd = etcd_binary()?;
        let (kcm, sched) = if opts.pdb_controller {
            (
                Some(k8s_binary(&bin_dir, "kube-controller-manager")?),
                Some(k8s_binary(&bin_dir, "kube-scheduler")?),
            )
        } else {
            (None, None)
        };
        let dir = tempfile::Builder::new()
            .prefix("imgkubetest-")
            .tempdir()
            .map_err(io("creating the control plane directory"))?;
        let d = dir.path().to_path_buf();
        let bind = opts
            .bind_address
            .clone()
            .unwrap_or_else(|| "127.0.0.1".into());

        let token = random_hex(24)?;
        fs::write(
            d.join("tokens.csv"),
            format!("{token},admin,admin,system:masters\n"),
        )
        .map_err(io("writing tokens.csv"))?;
        run(Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(d.join("sa.key"))
            .arg("2048")
            .stderr(Stdio::piped()))?;
        run(Command::new("openssl")
            .args(["rsa", "-pubout", "-in"])
            .arg(d.join("sa.key"))
            .arg("-out")
            .arg(d.join("sa.pub"))
            .stderr(Stdio::piped()))?;

        let mut cp = ControlPlane {
            server: String::new(),
            token,
            ca_pem: Vec::new(),
            kubeconfig: d.join("kubeconfig"),
            port: 0,
            startup: Duration::ZERO,
            bin_dir,
            children: Vec::new(),
            dir,
        };

        // etcd
        let client_port = free_port()?;
        let peer_port = free_port()?;
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut cmd = Command::new(&etcd);
        cmd.args(["--name", "test", "--data-dir"])
            .arg(d.join("etcd"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("test={peer_url}")])
            .args(["--unsafe-no-fsync"]);
        cp.spawn("etcd", &mut cmd)?;

        // kube-apiserver
        let port = free_port()?;
        cp.port = port;
        cp.server = format!("https://127.0.0.1:{port}");
        let certs = d.join("certs");
        let mut cmd = Command::new(&apiserver);
        cmd.arg(format!("--etcd-servers={client_url}"))
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--bind-address={bind}"))
            .arg(format!("--secure-port={port}"))
            .arg("--insecure-port=0")
            .arg(format!("--cert-dir={}", certs.display()))
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(format!(
                "--service-account-key-file={}",
                d.join("sa.pub").display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                d.join("sa.key").display()
            ))
            .arg(format!(
                "--token-auth-file={}",
                d.join("tokens.csv").display()
            ))
            .arg("--authorization-mode=RBAC")
            .arg("--allow-privileged=true")
            .arg("--disable-admission-plugins=ServiceAccount");
        cp.spawn("kube-apiserver", &mut cmd)?;

        // The API server writes its self-signed certificate before it listens.
        let cert = certs.join("apiserver.crt");
        let deadline = Instant::now() + Duration::from_secs(90);
        while !cert.is_file() {
            cp.check_alive()?;
            if Instant::now() > deadline {
                return Err(cp.not_ready("kube-apiserver", 90));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        cp.ca_pem = fs::read(&cert).map_err(io(format!("reading {}", cert.display())))?;
        cp.write_kubeconfig(&cert)?;
        cp.wait_ready(deadline).await?;

        if let (Some(kcm), Some(sched)) = (kcm, sched) {
            let mut cmd = Command::new(kcm);
            cmd.arg(format!("--kubeconfig={}", cp.kubeconfig.display()))
                .arg("--bind-address=127.0.0.1")
                .arg("--port=0")
                .arg(format!("--secure-port={}", free_port()?))
                .arg("--leader-elect=false")
                .arg(format!(
                    "--service-account-private-key-file={}",
                    d.join("sa.key").display()
                ))
                .arg("--controllers=*,-serviceaccount-token");
            cp.spawn("kube-controller-manager", &mut cmd)?;
            let mut cmd = Command::new(sched);
            cmd.arg(format!("--kubeconfig={}", cp.kubeconfig.display()))
                .arg("--bind-address=127.0.0.1")
                .arg("--port=0")
                .arg(format!("--secure-port={}", free_port()?))
                .arg("--leader-elect=false");
            cp.spawn("kube-scheduler", &mut cmd)?;
        }
        cp.startup = t0.elapsed();
        Ok(cp)
    }

    fn spawn(&mut self, name: &str, cmd: &mut Command) -> Result<(), ControlPlaneError> {
        let log_path = self.dir.path().join(format!("{name}.log"));
        let log = fs::File::create(&log_path).map_err(io(format!("creating {name}.log")))?;
        let log2 = log
            .try_clone()
            .map_err(io(format!("creating {name}.log")))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .current_dir(self.dir.path())
            .spawn()
            .map_err(io(format!("starting {name}")))?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    fn check_alive(&mut self) -> Result<(), ControlPlaneError> {
        for (name, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(ControlPlaneError::Command {
                    command: name.clone(),
                    message: format!(
                        "exited with {status}; last lines of its log:\n{}",
                        tail(&self.dir.path().join(format!("{name}.log")), 20)
                    ),
                });
            }
        }
        Ok(())
    }

    fn not_ready(&self, component: &str, seconds: u64) -> ControlPlaneError {
        ControlPlaneError::NotReady {
            component: component.to_string(),
            seconds,
            log: tail(&self.dir.path().join(format!("{component}.log")), 20),
        }
    }

    async fn wait_ready(&mut self, deadline: Instant) -> Result<(), ControlPlaneError> {
        let certs = reqwest::Certificate::from_pem_bundle(&self.ca_pem).map_err(|e| {
            ControlPlaneError::Command {
                command: "reading the API server certificate".into(),
                message: e.to_string(),
            }
        })?;
        let http = reqwest::Client::builder()
            .tls_certs_only(certs)
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| ControlPlaneError::Command {
                command: "building an HTTP client".into(),
                message: e.to_string(),
            })?;
        let url = format!("{}/readyz", self.server);
        loop {
            self.check_alive()?;
            let ok = match http.get(&url).bearer_auth(&self.token).send().await {
                Ok(r) => r.status().is_success(),
                Err(_) => false,
            };
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.not_ready("kube-apiserver", 90));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn write_kubeconfig(&self, ca: &Path) -> Result<(), ControlPlaneError> {
        // Paths and the token are ours (temp dir, hex), never user input.
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: admin\n  user:\n    token: {}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\ncurrent-context: test\n",
            self.server,
            ca.display(),
            self.token
        );
        fs::write(&self.kubeconfig, text).map_err(io("writing the kubeconfig"))
    }

    /// Write a kubeconfig for a client that reaches the API server at `server` (e.g.
    /// `https://10.0.2.2:PORT`, QEMU user networking's address of the host's loopback)
    /// with the CA embedded, checking the certificate against the DNS name `kubernetes`
    /// (the self-signed certificate carries it, and 127.0.0.1; a DNS name is what
    /// clients that cannot check an IP other than the one they dial, like imgupdate,
    /// accept as `tls-server-name`).
    pub fn write_kubeconfig_for(&self, server: &str, path: &Path) -> Result<(), ControlPlaneError> {
        use base64::Engine as _;
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    tls-server-name: kubernetes\n    certificate-authority-data: {ca}\nusers:\n- name: admin\n  user:\n    token: {}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\ncurrent-context: test\n",
            self.token
        );
        fs::write(path, text).map_err(io(format!("writing {}", path.display())))
    }

    /// The temporary directory holding keys, certificates, logs and etcd data.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A `kubectl` command already pointed at this control plane.
    pub fn kubectl(&self) -> Result<Command, ControlPlaneError> {
        let mut cmd = Command::new(k8s_binary(&self.bin_dir, "kubectl")?);
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()));
        Ok(cmd)
    }

    /// Last lines of a component's log (`etcd`, `kube-apiserver`, ...), for test failures.
    pub fn log_tail(&self, component: &str, lines: usize) -> String {
        tail(&self.dir.path().join(format!("{component}.log")), lines)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // Clients first, etcd last.
        for (_, child) in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binaries_say_how_to_build_them() {
        let dir = tempfile::tempdir().unwrap();
        let e = k8s_binary(dir.path(), "kube-apiserver").unwrap_err();
        assert!(e.to_string().contains("run scripts/build-k8s"), "{e}");
        assert!(e.to_string().contains("kube-apiserver"), "{e}");
    }

    #[tokio::test]
    async fn start_fails_without_binaries() {
        let dir = tempfile::tempdir().unwrap();
        let e = ControlPlane::start(ControlPlaneOptions {
            bin_dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        })
        .await
        .unwrap_err();
        assert!(matches!(e, ControlPlaneError::MissingBinary { .. }), "{e}");
    }

    #[test]
    fn free_ports_are_distinct_and_nonzero() {
        let a = free_port().unwrap();
        assert_ne!(a, 0);
    }
}
