//! The real HAProxy (Debian's package) in front of two trunk servers, run with the
//! repository's `deploy/haproxy/trunk-pool.cfg` as it is.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// A running HAProxy; killed when dropped.
pub struct Haproxy {
    child: Child,
    dir: PathBuf,
    /// The loopback port devices dial (as `https://localhost:PORT`).
    pub port: u16,
}

impl Haproxy {
    /// Starts HAProxy on a free loopback port in front of the trunk servers on loopback
    /// `ports`, checking their health over TLS as `localhost` against the CA file `ca`; its
    /// admin socket and log go in `dir`. Returns once it reports every backend up.
    pub fn start(ports: [u16; 2], ca: &Path, dir: &Path) -> Self {
        let mut command = program();
        let port = free_port();
        let log = std::fs::File::create(dir.join("haproxy.log")).expect("haproxy log");
        command
            .arg("-db")
            .arg("-f")
            .arg(config())
            .env("LSPLIT_POOL_BIND", format!("127.0.0.1:{port}"))
            .env("LSPLIT_POOL_ADMIN", dir.join("admin.sock"))
            .env("LSPLIT_TRUNK_NAME", "localhost")
            .env("LSPLIT_TRUNK_CA", ca)
            .env("LSPLIT_TRUNK1", format!("127.0.0.1:{}", ports[0]))
            .env("LSPLIT_TRUNK2", format!("127.0.0.1:{}", ports[1]))
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let mut haproxy = Self {
            child: command.spawn().expect("spawn haproxy"),
            dir: dir.to_path_buf(),
            port,
        };
        for i in 0..ports.len() {
            haproxy.wait_for(i, "UP");
        }
        haproxy
    }

    /// HAProxy's status of backend `i` (`UP`, `DOWN`, `UP 1/2`, ...) from its runtime API, or
    /// `None` while that API is not up yet.
    pub fn status(&self, i: usize) -> Option<String> {
        self.stat(i, "status")
    }

    /// The column `column` of HAProxy's `show stat` for backend `i` (e.g. `check_status`:
    /// `L7OK`, `L7RSP` for an answer its check refused, `L4CON` for a refused connection), or
    /// `None` while the runtime API is not up yet.
    pub fn stat(&self, i: usize, column: &str) -> Option<String> {
        let mut socket = UnixStream::connect(self.dir.join("admin.sock")).ok()?;
        socket.write_all(b"show stat\n").expect("ask");
        let mut csv = String::new();
        socket.read_to_string(&mut csv).expect("read stats");
        let mut lines = csv.lines();
        let header: Vec<&str> = lines
            .next()
            .expect("a header")
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let index = |name: &str| header.iter().position(|h| *h == name).expect(name);
        let (proxy, server, wanted) = (index("pxname"), index("svname"), index(column));
        let name = format!("trunk{}", i + 1);
        let value = lines
            .map(|line| line.split(',').collect::<Vec<_>>())
            .find(|fields| fields[proxy] == "trunks" && fields[server] == name)
            .map(|fields| fields[wanted].to_string())
            .unwrap_or_else(|| panic!("no {name} in HAProxy's stats: {csv}"));
        Some(value)
    }

    /// Waits (a minute at most) until HAProxy's checks report backend `i` as `status`.
    pub fn wait_for(&mut self, i: usize, status: &str) {
        for _ in 0..3000 {
            if let Some(exit) = self.child.try_wait().expect("wait") {
                panic!("haproxy exited with {exit}: {}", self.log());
            }
            if self.status(i).as_deref() == Some(status) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "backend {} never became {status} (it is {:?}); HAProxy's log:\n{}",
            i + 1,
            self.status(i),
            self.log()
        );
    }

    /// What HAProxy has logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("haproxy.log")).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// HAProxy, from PATH or where Debian's package puts it (/usr/sbin, outside a user's PATH).
/// Fails, saying what to install, when there is none: CI installs it (scripts/test.sh), so
/// its absence is an error, not a skip.
fn program() -> Command {
    let mut tried = Vec::new();
    for program in ["haproxy", "/usr/sbin/haproxy"] {
        match Command::new(program).arg("-v").output() {
            Ok(out) if out.status.success() => return Command::new(program),
            Ok(out) => tried.push(format!(
                "`{program} -v` failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )),
            Err(e) => tried.push(format!("{program}: {e}")),
        }
    }
    panic!(
        "the trunk pool runs the real HAProxy, and none could be run ({}): install Debian's \
         package (`apt-get install haproxy`; scripts/test.sh does)",
        tried.join("; ")
    )
}

/// The repository's HAProxy configuration for a trunk pool.
fn config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/haproxy/trunk-pool.cfg")
}

/// A port free on loopback now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}
