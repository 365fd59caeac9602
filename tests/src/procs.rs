//! Nodes as separate processes, for tests that kill or restart one: a real etcd server (Debian `etcd-server`) on
//! free loopback ports with its own data directory, and `tandem` nodes started from the release binary. Each is
//! killed when dropped.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (bound, then released for the child to bind).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An etcd server; `stop` and `start` again keep its data and ports (a restart).
pub struct Etcd {
    pub client_port: u16,
    peer_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Etcd {
    /// Starts etcd and waits until it answers `/health`.
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "tandem-etcd-{}-{}",
            std::process::id(),
            free_port()
        ));
        let mut e = Etcd {
            client_port: free_port(),
            peer_port: free_port(),
            dir,
            child: None,
        };
        e.resume();
        e
    }

    /// `host:port` for `--etcd-endpoint`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// Starts the (stopped) server again on the same ports and data.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "etcd is already running");
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new("etcd")
            .args(["--name", "tandem-test", "--data-dir"])
            .arg(&self.dir)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("tandem-test={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting etcd (Debian package etcd-server; scripts/setup.sh installs it)");
        self.child = Some(child);
        let started = Instant::now();
        loop {
            let up = std::net::TcpStream::connect(("127.0.0.1", self.client_port)).is_ok()
                && crate::http::request(&self.endpoint(), "GET", "/health", b"")
                    .body
                    .contains("true");
            if up {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "etcd did not become healthy"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the server (SIGKILL: no goodbye to its clients).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `tandem` node process.
pub struct Node {
    pub child: Child,
    /// The URL the node printed: a worker's gRPC endpoint, or the router's HTTP address.
    pub url: String,
}

impl Node {
    /// Starts `tandem <args>` and waits for the line with its URL: a worker's "serving on URL" on stderr, or the
    /// router's URL on stdout.
    pub fn start(args: &[&str]) -> Self {
        let router = args.first() == Some(&"router");
        let mut child = Command::new(crate::tandem_bin())
            .args(args)
            .env_remove("TANDEM_LOG")
            .stdout(if router {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(if router {
                Stdio::null()
            } else {
                Stdio::piped()
            })
            .spawn()
            .unwrap();
        let out: Box<dyn std::io::Read + Send> = if router {
            Box::new(child.stdout.take().unwrap())
        } else {
            Box::new(child.stderr.take().unwrap())
        };
        let mut lines = BufReader::new(out).lines();
        let url = loop {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("tandem {args:?} exited before serving"))
                .unwrap();
            if let Some(i) = line.find("http://") {
                break line[i..].trim().to_string();
            }
        };
        // Keep draining the pipe so the child never blocks on a full one.
        std::thread::spawn(move || for _ in lines {});
        Node { child, url }
    }

    /// `host:port` of the URL.
    pub fn addr(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit, failing after `within`.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let started = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(started.elapsed() < within, "node did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}
