//! A real etcd + kube-apiserver for tests, on loopback or inside a given network namespace.
//!
//! The binaries come from `cargo xtask testbed build` (pinned upstream versions, see
//! docs/testbed.md). [`ControlPlane::start`] generates what a cluster needs to authenticate and
//! authorize — a static admin token in `system:masters`, a service-account signing key, the
//! apiserver's self-signed serving certificate — with RBAC on, installs Kube-OVN's CRDs, and is
//! ready in seconds. Everything lives in one temp directory.
//!
//! Teardown on every exit path: `Drop` stops both servers (SIGTERM to their process group, SIGKILL
//! after a grace period) and removes the directory; each server is started with
//! `PR_SET_PDEATHSIG = SIGKILL`, so a test process killed by a signal takes them with it; and
//! [`ControlPlane::start`] removes directories that dead processes left behind. The death signal
//! fires when the *thread* that started a server exits: start (and restart) a control plane on a
//! thread that outlives it, e.g. the test's own or `main`.

use std::{
    ffi::OsString,
    fmt::Write as _,
    fs::{self, File, OpenOptions},
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

/// Prefix of every temp directory, followed by the owning pid (see [`remove_stale`]).
const DIR_PREFIX: &str = "kovn-cp-";
/// The cluster's DNS-style issuer; only compared, never resolved.
const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// How long a server gets to exit on SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "${var} is not set: run `cargo xtask testbed build` and export the paths it prints (docs/testbed.md)"
    )]
    MissingEnv { var: &'static str },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{command} failed ({status}):\n{stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{what} not ready after {waited:?}; last: {last}\n--- {log}:\n{tail}")]
    NotReady {
        what: &'static str,
        waited: Duration,
        last: String,
        log: PathBuf,
        tail: String,
    },
    #[error("{what}: unexpected answer: {answer}")]
    Protocol { what: &'static str, answer: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_error(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}

/// The upstream programs and manifests a control plane is made of.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub kube_apiserver: PathBuf,
    pub etcd: PathBuf,
    pub kubectl: PathBuf,
    /// Kube-OVN's CRD manifest (`charts/kube-ovn/templates/kube-ovn-crd.yaml` of the pinned
    /// release), with the Subnet CRD among them.
    pub kube_ovn_crds: PathBuf,
}

impl Binaries {
    /// `$KUBE_APISERVER` and `$ETCD` as printed by `cargo xtask testbed build`; `$KUBECTL` and
    /// `$KUBE_OVN_CRDS` default to their siblings in the same build directory.
    pub fn from_env() -> Result<Self> {
        let var = |var: &'static str| {
            std::env::var_os(var)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let kube_apiserver = var("KUBE_APISERVER").ok_or(Error::MissingEnv {
            var: "KUBE_APISERVER",
        })?;
        let etcd = var("ETCD").ok_or(Error::MissingEnv { var: "ETCD" })?;
        let dir = kube_apiserver
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        Ok(Self {
            kubectl: var("KUBECTL").unwrap_or_else(|| dir.join("kubectl")),
            kube_ovn_crds: var("KUBE_OVN_CRDS").unwrap_or_else(|| dir.join("kube-ovn-crd.yaml")),
            kube_apiserver,
            etcd,
        })
    }
}

/// What to start.
#[derive(Clone, Debug)]
pub struct Options {
    pub binaries: Binaries,
    /// Run both servers (and [`ControlPlane::kubectl`]) inside this named network namespace
    /// (`ip netns exec`), e.g. a test's node namespace, so an agent there reaches them on its
    /// loopback. `None`: the caller's namespace, on 127.0.0.1.
    pub netns: Option<String>,
    /// `--service-cluster-ip-range`: one CIDR per family, primary first.
    pub service_cidrs: Vec<String>,
    /// Install Kube-OVN's CRDs (and wait until they are established).
    pub install_kube_ovn_crds: bool,
    /// How long each server may take to become ready.
    pub ready_timeout: Duration,
}

impl Options {
    pub fn new(binaries: Binaries) -> Self {
        Self {
            binaries,
            netns: None,
            service_cidrs: vec!["10.96.0.0/16".into(), "fd00:10:96::/112".into()],
            install_kube_ovn_crds: true,
            ready_timeout: Duration::from_secs(90),
        }
    }
}

/// One running server: its process group and how to start it again.
struct Server {
    name: &'static str,
    program: PathBuf,
    args: Vec<OsString>,
    log: PathBuf,
    child: Option<Child>,
}

/// A running etcd + kube-apiserver. Dropping it stops both and removes its directory.
pub struct ControlPlane {
    options: Options,
    dir: PathBuf,
    etcd: Server,
    apiserver: Server,
    etcd_port: u16,
    apiserver_port: u16,
    ca_pem: String,
    admin_token: String,
    kubeconfig: PathBuf,
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver and waits until the API answers `/readyz`.
    pub fn start(options: Options) -> Result<Self> {
        remove_stale(&std::env::temp_dir());
        let dir = std::env::temp_dir().join(unique(DIR_PREFIX));
        fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        if let Some(ns) = &options.netns {
            // A new namespace's loopback is down; the servers listen on it.
            let mut up = Command::new("ip");
            up.args(["-n", ns, "link", "set", "lo", "up"]);
            let out = run_with_stdin(&mut up, None)?;
            if !out.status.success() {
                return Err(Error::Command {
                    command: format!("{up:?}"),
                    status: out.status.to_string(),
                    stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                });
            }
        }
        let ports = free_ports(options.netns.as_deref(), 3)?;
        let (etcd_port, peer_port, apiserver_port) = (ports[0], ports[1], ports[2]);
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd = Server {
            name: "etcd",
            program: options.binaries.etcd.clone(),
            args: os_args(&[
                "--name=testbed".into(),
                format!("--data-dir={}", dir.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=testbed={peer_url}"),
                // Throw-away data: durability only costs time.
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ]),
            log: dir.join("etcd.log"),
            child: None,
        };

        let admin_token = random_hex(16)?;
        let tokens = dir.join("tokens.csv");
        fs::write(
            &tokens,
            format!("{admin_token},testbed-admin,testbed-admin,system:masters\n"),
        )
        .map_err(io_error(&tokens))?;
        let (sa_key, sa_pub) = service_account_key(&dir)?;
        let cert_dir = dir.join("certs");
        let apiserver = Server {
            name: "kube-apiserver",
            program: options.binaries.kube_apiserver.clone(),
            args: os_args(&[
                format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                // The endpoint reconciler refuses a loopback address; nothing needs the
                // `kubernetes` Service's endpoints here.
                "--endpoint-reconciler-type=none".into(),
                format!("--secure-port={apiserver_port}"),
                // Self-signs a CA and a serving certificate for 127.0.0.1 on first start; restarts
                // reuse them, so clients keep trusting the server.
                format!("--cert-dir={}", cert_dir.display()),
                format!("--token-auth-file={}", tokens.display()),
                "--authorization-mode=Node,RBAC".into(),
                format!("--service-account-issuer={ISSUER}"),
                format!("--service-account-key-file={}", sa_pub.display()),
                format!("--service-account-signing-key-file={}", sa_key.display()),
                format!(
                    "--service-cluster-ip-range={}",
                    options.service_cidrs.join(",")
                ),
                // The DaemonSet is privileged; without this the API rejects it.
                "--allow-privileged=true".into(),
                // History is compacted only on request (`compact_etcd`), so tests decide when a
                // resourceVersion expires.
                "--etcd-compaction-interval=0".into(),
                "--profiling=false".into(),
            ]),
            log: dir.join("kube-apiserver.log"),
            child: None,
        };
        let mut plane = Self {
            kubeconfig: dir.join("admin.kubeconfig"),
            options,
            dir,
            etcd,
            apiserver,
            etcd_port,
            apiserver_port,
            ca_pem: String::new(),
            admin_token,
        };
        plane.spawn_etcd()?;
        plane.spawn_apiserver()?;
        if plane.options.install_kube_ovn_crds {
            let crds = plane.options.binaries.kube_ovn_crds.clone();
            plane.kubectl(&["apply".as_ref(), "-f".as_ref(), crds.as_os_str()])?;
            plane.kubectl(&[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/subnets.kubeovn.io",
            ])?;
        }
        Ok(plane)
    }

    /// The admin kubeconfig (a static token in `system:masters`).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:<port>` (in the control plane's namespace).
    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.apiserver_port)
    }

    /// The CA that signed the apiserver's serving certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The temp directory holding data, keys, kubeconfigs and the servers' logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The network namespace the servers run in, if any.
    pub fn netns(&self) -> Option<&str> {
        self.options.netns.as_deref()
    }

    /// A bound token of `namespace/name` from the `TokenRequest` API (`kubectl create token`).
    pub fn token_for_service_account(&self, namespace: &str, name: &str) -> Result<String> {
        let out = self.kubectl(&[
            "create",
            "token",
            name,
            "--namespace",
            namespace,
            "--duration=2h",
        ])?;
        Ok(out.trim().to_owned())
    }

    /// Writes a kubeconfig for this server that authenticates with `token`; returns its path.
    pub fn kubeconfig_with_token(&self, name: &str, token: &str) -> Result<PathBuf> {
        let path = self.dir.join(format!("{name}.kubeconfig"));
        self.write_kubeconfig(&path, token)?;
        Ok(path)
    }

    /// Runs kubectl with the admin kubeconfig (in the namespace, if any); returns stdout, or an
    /// error with stderr when it exits non-zero.
    pub fn kubectl<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Result<String> {
        let out = self.kubectl_output(args, None)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs kubectl with `stdin` (if any); returns stdout, or an error with stderr on failure.
    pub fn kubectl_stdin<S: AsRef<std::ffi::OsStr>>(
        &self,
        args: &[S],
        stdin: &str,
    ) -> Result<String> {
        let out = self.kubectl_output(args, Some(stdin))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs kubectl and returns its whole output, failing only when it cannot start or exits
    /// non-zero (use [`Self::kubectl_command`] to see failures as output).
    pub fn kubectl_output<S: AsRef<std::ffi::OsStr>>(
        &self,
        args: &[S],
        stdin: Option<&str>,
    ) -> Result<Output> {
        let mut command = self.kubectl_command(args);
        let out = run_with_stdin(&mut command, stdin)?;
        if !out.status.success() {
            return Err(Error::Command {
                command: format!("{command:?}"),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(out)
    }

    /// A kubectl command with the admin kubeconfig, to run as the caller likes.
    pub fn kubectl_command<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Command {
        self.kubectl_command_with(&self.kubeconfig, args)
    }

    /// A kubectl command with another kubeconfig (e.g. [`Self::kubeconfig_with_token`]'s).
    pub fn kubectl_command_with<S: AsRef<std::ffi::OsStr>>(
        &self,
        kubeconfig: &Path,
        args: &[S],
    ) -> Command {
        let mut command = command_in(
            self.options.netns.as_deref(),
            &self.options.binaries.kubectl,
        );
        command
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .env_remove("KUBECONFIG");
        command
    }

    /// Stops kube-apiserver (SIGTERM) and starts it again on the same port, certificate and
    /// etcd; returns once it is ready. Its watch cache starts anew from etcd.
    pub fn restart_apiserver(&mut self) -> Result<()> {
        stop(&mut self.apiserver);
        self.spawn_apiserver()
    }

    /// Stops kube-apiserver without starting it again (see [`Self::start_apiserver`]).
    pub fn stop_apiserver(&mut self) {
        stop(&mut self.apiserver);
    }

    /// Starts a stopped kube-apiserver; returns once it is ready.
    pub fn start_apiserver(&mut self) -> Result<()> {
        self.spawn_apiserver()
    }

    /// Stops etcd (SIGTERM) and starts it again on its data; returns once it is healthy and
    /// the apiserver is ready again.
    pub fn restart_etcd(&mut self) -> Result<()> {
        stop(&mut self.etcd);
        self.spawn_etcd()?;
        self.wait_apiserver_ready()
    }

    /// Compacts etcd's history up to its current revision through etcd's HTTP gateway
    /// (`/v3/kv/compaction`): every older resourceVersion is gone from storage. Returns the
    /// revision. A running apiserver's watch cache keeps serving the revisions it holds; clients
    /// see `410 Gone` for them once it reads etcd again (e.g. after [`Self::restart_apiserver`]).
    pub fn compact_etcd(&self) -> Result<u64> {
        // The range of key "\0" (base64 "AA==") only serves to read the header's revision.
        let answer = self.etcd_post("/v3/kv/range", r#"{"key":"AA=="}"#)?;
        let revision = serde_json::from_str::<serde_json::Value>(&answer)
            .ok()
            .and_then(|v| v["header"]["revision"].as_str()?.parse::<u64>().ok())
            .ok_or_else(|| Error::Protocol {
                what: "etcd range",
                answer: answer.clone(),
            })?;
        let answer = self.etcd_post(
            "/v3/kv/compaction",
            &format!(r#"{{"revision":"{revision}","physical":true}}"#),
        )?;
        if !answer.contains("\"header\"") {
            return Err(Error::Protocol {
                what: "etcd compaction",
                answer,
            });
        }
        Ok(revision)
    }

    /// Stops both servers and removes the directory (what `Drop` does, made explicit).
    pub fn stop(self) {}

    fn spawn_etcd(&mut self) -> Result<()> {
        spawn(self.options.netns.as_deref(), &mut self.etcd)?;
        let deadline = Instant::now() + self.options.ready_timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            exited(&mut self.etcd)?;
            match self.etcd_get("/health") {
                Ok(body) if body.contains(r#""health":"true""#) => return Ok(()),
                Ok(body) => last = body,
                Err(e) => last = e.to_string(),
            }
            thread::sleep(Duration::from_millis(100));
        }
        Err(not_ready(&self.etcd, self.options.ready_timeout, last))
    }

    fn spawn_apiserver(&mut self) -> Result<()> {
        spawn(self.options.netns.as_deref(), &mut self.apiserver)?;
        self.wait_apiserver_ready()
    }

    /// Waits for the self-signed certificate (first start), then for `/readyz`.
    fn wait_apiserver_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + self.options.ready_timeout;
        let cert = self.dir.join("certs/apiserver.crt");
        let mut last = String::new();
        while Instant::now() < deadline {
            exited(&mut self.apiserver)?;
            if self.ca_pem.is_empty() {
                let Some(ca) = fs::read_to_string(&cert).ok().and_then(|c| last_pem(&c)) else {
                    last = format!("no CA in {} yet", cert.display());
                    thread::sleep(Duration::from_millis(100));
                    continue;
                };
                let ca_file = self.dir.join("ca.crt");
                fs::write(&ca_file, &ca).map_err(io_error(&ca_file))?;
                self.ca_pem = ca;
                self.write_kubeconfig(&self.kubeconfig, &self.admin_token)?;
            }
            let out = run_with_stdin(
                &mut self.kubectl_command(&["get", "--raw=/readyz", "--request-timeout=5s"]),
                None,
            )?;
            if out.status.success() {
                return Ok(());
            }
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .clone_into(&mut last);
            thread::sleep(Duration::from_millis(200));
        }
        Err(not_ready(&self.apiserver, self.options.ready_timeout, last))
    }

    fn write_kubeconfig(&self, path: &Path, token: &str) -> Result<()> {
        // JSON is YAML: no YAML writer needed.
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "testbed", "cluster": {
                "server": self.server_url(),
                "certificate-authority": self.dir.join("ca.crt"),
            }}],
            "users": [{"name": "user", "user": {"token": token}}],
            "contexts": [{"name": "testbed", "context": {"cluster": "testbed", "user": "user"}}],
            "current-context": "testbed",
        });
        fs::write(path, config.to_string()).map_err(io_error(path))
    }

    fn etcd_get(&self, path: &str) -> Result<String> {
        self.etcd_http(&format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"))
    }

    fn etcd_post(&self, path: &str, body: &str) -> Result<String> {
        self.etcd_http(&format!(
            "POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        ))
    }

    /// One HTTP/1.0 exchange with etcd's client port (no chunking, the server closes); returns the
    /// body of a 200 answer.
    fn etcd_http(&self, request: &str) -> Result<String> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.etcd_port));
        let request = request.to_owned();
        let response = in_netns(self.options.netns.as_deref(), move || {
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            stream.write_all(request.as_bytes())?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })
        .map_err(io_error(format!("etcd 127.0.0.1:{}", self.etcd_port)))?;
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
            return Err(Error::Protocol {
                what: "etcd HTTP",
                answer: response,
            });
        }
        Ok(body.to_owned())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // The apiserver first, so it does not spend its shutdown retrying a dead etcd.
        stop(&mut self.apiserver);
        stop(&mut self.etcd);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// `program` run inside the named network namespace (`ip netns exec` execs it in place, so the
/// pid is the program's), or directly.
fn command_in(netns: Option<&str>, program: &Path) -> Command {
    if let Some(ns) = netns {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

/// Starts the server as the leader of a new process group, killed when this thread dies.
fn spawn(netns: Option<&str>, server: &mut Server) -> Result<()> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&server.log)
        .map_err(io_error(&server.log))?;
    let log_err = log.try_clone().map_err(io_error(&server.log))?;
    let mut command = command_in(netns, &server.program);
    command
        .args(&server.args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    server.child = Some(command.spawn().map_err(io_error(&server.program))?);
    Ok(())
}

fn os_args(args: &[String]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// Fails (with the log's tail) when the server has exited.
fn exited(server: &mut Server) -> Result<()> {
    let Some(child) = server.child.as_mut() else {
        return Ok(());
    };
    match child.try_wait() {
        Ok(Some(status)) => {
            server.child = None;
            Err(not_ready(
                server,
                Duration::ZERO,
                format!("exited: {status}"),
            ))
        }
        Ok(None) => Ok(()),
        Err(e) => Err(Error::Io {
            path: server.program.clone(),
            source: e,
        }),
    }
}

fn not_ready(server: &Server, waited: Duration, last: String) -> Error {
    let text = fs::read_to_string(&server.log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(30)..].join("\n");
    Error::NotReady {
        what: server.name,
        waited,
        last,
        log: server.log.clone(),
        tail,
    }
}

/// SIGTERM to the server's process group, SIGKILL after [`STOP_GRACE`]; bounded either way.
fn stop(server: &mut Server) {
    let Some(mut child) = server.child.take() else {
        return;
    };
    let Ok(group) = i32::try_from(child.id()) else {
        let _ = child.kill();
        let _ = child.wait();
        return;
    };
    // SAFETY: signals the process group this module created (process_group(0) made the child
    // its leader); the group is not reused while the leader is not yet waited for.
    unsafe { libc::kill(-group, libc::SIGTERM) };
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            // Children of the leader (none expected) go too.
            // SAFETY: as above.
            unsafe { libc::kill(-group, libc::SIGKILL) };
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: as above.
    unsafe { libc::kill(-group, libc::SIGKILL) };
    let _ = child.wait();
}

/// The last PEM certificate of a bundle (the apiserver writes its certificate, then its CA).
fn last_pem(bundle: &str) -> Option<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let start = bundle.rfind(BEGIN)?;
    let end = start + bundle[start..].find(END)? + END.len();
    Some(format!("{}\n", &bundle[start..end]))
}

fn run_with_stdin(command: &mut Command, stdin: Option<&str>) -> Result<Output> {
    let shown = format!("{command:?}");
    let mut child = command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_error(&shown))?;
    if let Some(input) = stdin {
        // Written from a thread so a large input cannot deadlock against a full stdout pipe.
        let mut pipe = child.stdin.take().expect("stdin is piped");
        let input = input.to_owned();
        let writer = thread::spawn(move || pipe.write_all(input.as_bytes()));
        let out = child.wait_with_output().map_err(io_error(&shown))?;
        let _ = writer.join();
        return Ok(out);
    }
    child.wait_with_output().map_err(io_error(&shown))
}

/// An RSA key pair for the `ServiceAccount` token issuer: (private, public) PEM files in `dir`.
fn service_account_key(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let sa_key = dir.join("sa.key");
    let sa_pub = dir.join("sa.pub");
    openssl(&[
        "genpkey".as_ref(),
        "-algorithm".as_ref(),
        "RSA".as_ref(),
        "-pkeyopt".as_ref(),
        "rsa_keygen_bits:2048".as_ref(),
        "-out".as_ref(),
        sa_key.as_os_str(),
    ])?;
    openssl(&[
        "pkey".as_ref(),
        "-in".as_ref(),
        sa_key.as_os_str(),
        "-pubout".as_ref(),
        "-out".as_ref(),
        sa_pub.as_os_str(),
    ])?;
    Ok((sa_key, sa_pub))
}

fn openssl(args: &[&std::ffi::OsStr]) -> Result<()> {
    let mut command = Command::new("openssl");
    command.args(args);
    let out = run_with_stdin(&mut command, None)?;
    if !out.status.success() {
        return Err(Error::Command {
            command: format!("{command:?}"),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(io_error("/dev/urandom"))?;
    Ok(buf.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }))
}

static NEXT: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Removes `kovn-cp-<pid>-*` directories of processes that no longer exist (a run killed by a
/// signal cannot remove its own; its servers died with it).
pub fn remove_stale(temp: &Path) {
    let Ok(entries) = fs::read_dir(temp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Runs `f` on a thread inside the named network namespace (or on one in the caller's).
fn in_netns<T: Send + 'static>(
    netns: Option<&str>,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let path = netns.map(|ns| format!("/run/netns/{ns}"));
    thread::spawn(move || {
        if let Some(path) = path {
            let file = File::open(&path)?;
            // SAFETY: a valid namespace fd; only this short-lived thread switches.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        f()
    })
    .join()
    .map_err(|_| io::Error::other("namespace thread panicked"))?
}

/// `count` distinct free loopback ports in the namespace: bound together, then released.
fn free_ports(netns: Option<&str>, count: usize) -> Result<Vec<u16>> {
    in_netns(netns, move || {
        let listeners = (0..count)
            .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
            .collect::<io::Result<Vec<_>>>()?;
        listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect()
    })
    .map_err(io_error(format!(
        "free ports in {}",
        netns.unwrap_or("this namespace")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_is_the_last_certificate_of_the_bundle() {
        let bundle = "-----BEGIN CERTIFICATE-----\nLEAF\n-----END CERTIFICATE-----\n\
                      -----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n";
        assert_eq!(
            last_pem(bundle).as_deref(),
            Some("-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n")
        );
        assert_eq!(last_pem("no certificate"), None);
    }

    #[test]
    fn stale_directories_of_dead_processes_are_removed_and_live_ones_kept() {
        let temp = std::env::temp_dir().join(unique("kovn-cp-stale-test-"));
        let dead = temp.join(format!("{DIR_PREFIX}{}-0", u32::MAX - 1));
        let live = temp.join(format!("{DIR_PREFIX}{}-0", std::process::id()));
        let other = temp.join("unrelated");
        for d in [&dead, &live, &other] {
            fs::create_dir_all(d).unwrap();
        }
        remove_stale(&temp);
        assert!(!dead.exists() && live.exists() && other.exists());
        fs::remove_dir_all(&temp).unwrap();
    }

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_ports(None, 3).unwrap();
        assert!(ports[0] != ports[1] && ports[1] != ports[2] && ports[0] != ports[2]);
    }
}
