//! A throwaway PostgreSQL server for the tests (and local runs): Debian's
//! `initdb` and `postgres` (the newest `/usr/lib/postgresql/*/bin`, or
//! `FEDERATION_PG_BIN`), a data directory in a temporary directory,
//! listening on a free loopback port with its socket in that directory,
//! stopped when dropped, and also when the process that started it dies
//! (a watchdog shell stops it when its stdin, held by this process, closes).
//!
//! PostgreSQL refuses to run as root: when this process is root (CI), the
//! server runs as the `postgres` user (`setpriv`), and its directory is
//! handed to that user. The superuser is `federation`, password
//! [`PASSWORD`], checked over TCP (scram-sha-256), so a test can also try
//! wrong credentials.

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// Signal names for `kill`.
mod libc_signal {
    pub const STOP: &str = "STOP";
    pub const CONT: &str = "CONT";
}

/// The superuser's password.
pub const PASSWORD: &str = "federation-test";
/// The superuser.
pub const USER: &str = "federation";

/// The PostgreSQL binaries: `FEDERATION_PG_BIN`, else the newest
/// `/usr/lib/postgresql/<version>/bin` holding `initdb`.
pub fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("FEDERATION_PG_BIN") {
        let dir = PathBuf::from(dir);
        return dir.join("initdb").exists().then_some(dir);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

/// A running PostgreSQL server.
#[derive(Debug)]
pub struct PgServer {
    dir: tempfile::TempDir,
    port: u16,
    version: String,
    child: Option<Child>,
    /// Held open; the watchdog stops the server when it closes.
    stdin: Option<ChildStdin>,
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Runs `cmd` as the `postgres` user when this process is root.
fn as_server_user(program: &Path) -> Command {
    if is_root() {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

impl PgServer {
    /// Starts a server (bounded: 60 s for initdb and start-up).
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(None, None)
    }

    /// Starts a server that also offers TLS (`ssl=on`) with this
    /// certificate (PEM, its chain) and key; plain connections are still
    /// accepted.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> anyhow::Result<Self> {
        Self::start_with(Some((cert_pem, key_pem)), None)
    }

    /// As [`start_tls`](Self::start_tls), and role `cert_user` logs in
    /// only over TLS with a client certificate signed by `client_ca_pem`
    /// whose common name is `cert_user` (pg_hba's `cert` method); every
    /// other role as before. The role itself is the test's to create.
    pub fn start_tls_with_client_certs(
        cert_pem: &str,
        key_pem: &str,
        client_ca_pem: &str,
        cert_user: &str,
    ) -> anyhow::Result<Self> {
        Self::start_with(Some((cert_pem, key_pem)), Some((client_ca_pem, cert_user)))
    }

    fn start_with(
        tls: Option<(&str, &str)>,
        client_certs: Option<(&str, &str)>,
    ) -> anyhow::Result<Self> {
        let bin = bin_dir().context(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb; apt-get install postgresql, or set FEDERATION_PG_BIN)",
        )?;
        let dir = tempfile::Builder::new()
            .prefix("federation-pg-")
            .tempdir()
            .context("temporary directory")?;
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, PASSWORD).context("writing the password file")?;
        let mut settings = Vec::new();
        if let Some((cert, key)) = tls {
            use std::os::unix::fs::PermissionsExt as _;
            let cert_file = dir.path().join("server.crt");
            let key_file = dir.path().join("server.key");
            std::fs::write(&cert_file, cert).context("writing the server certificate")?;
            std::fs::write(&key_file, key).context("writing the server key")?;
            // The server refuses a key others may read.
            std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))
                .context("chmod of the server key")?;
            settings.extend([
                "ssl=on".to_string(),
                format!("ssl_cert_file={}", cert_file.display()),
                format!("ssl_key_file={}", key_file.display()),
            ]);
        }
        if let Some((ca, _)) = client_certs {
            let ca_file = dir.path().join("client-ca.crt");
            std::fs::write(&ca_file, ca).context("writing the client CA")?;
            settings.push(format!("ssl_ca_file={}", ca_file.display()));
        }
        if is_root() {
            let status = Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(dir.path())
                .status()
                .context("chown of the server's directory")?;
            if !status.success() {
                bail!("chown postgres {} failed", dir.path().display());
            }
        }
        let data = dir.path().join("data");
        let out = as_server_user(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                USER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["-E", "UTF8", "--locale=C", "--no-sync"])
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if let Some((_, user)) = client_certs {
            // First match wins: this role by certificate only.
            let hba = data.join("pg_hba.conf");
            let rest = std::fs::read_to_string(&hba).context("reading pg_hba.conf")?;
            std::fs::write(
                &hba,
                format!(
                    "hostssl all {user} 127.0.0.1/32 cert\nhost all {user} 0.0.0.0/0 reject\n{rest}"
                ),
            )
            .context("writing pg_hba.conf")?;
        }
        let version = std::fs::read_to_string(data.join("PG_VERSION"))
            .map(|v| v.trim().to_string())
            .unwrap_or_default();
        let port = crate::ports::free_port()?.port();
        let log = std::fs::File::create(dir.path().join("server.log")).context("server log")?;
        let mut server = as_server_user(&bin.join("postgres"));
        server
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string()])
            .arg("-k")
            .arg(dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=200",
            ]);
        // Extra server settings for profiling runs, `;`-separated
        // (`FEDERATION_PG_SETTINGS="shared_preload_libraries=pg_stat_statements"`).
        if let Ok(extra) = std::env::var("FEDERATION_PG_SETTINGS") {
            settings.extend(
                extra
                    .split(';')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            );
        }
        for setting in &settings {
            server.args(["-c", setting]);
        }
        // The watchdog: runs the server; on a line `stop` on its stdin it
        // stops it (immediate shutdown: a crash, recovered at the next
        // start), on `start` it starts it again; when stdin closes (this
        // process dropped the guard, or died) it stops the server and
        // removes the directory (a server of `shared()` is never dropped).
        let script = r#""$@" & pid=$!; running=1
while read -r cmd; do
  if [ "$cmd" = stop ] && [ $running = 1 ]; then kill -QUIT "$pid" 2>/dev/null; wait "$pid"; running=0; fi
  if [ "$cmd" = start ] && [ $running = 0 ]; then "$@" & pid=$!; running=1; fi
done
if [ $running = 1 ]; then kill -QUIT "$pid" 2>/dev/null; wait "$pid"; fi
rm -rf "$FEDERATION_PG_DIR"
"#;
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .arg("sh")
            .arg(server.get_program())
            .args(server.get_args())
            .env("FEDERATION_PG_DIR", dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(log);
        let mut child = cmd.spawn().context("starting postgres")?;
        let stdin = child.stdin.take();
        let mut pg = Self {
            dir,
            port,
            version,
            child: Some(child),
            stdin,
        };
        pg.wait_ready(&bin)?;
        Ok(pg)
    }

    fn wait_ready(&mut self, bin: &Path) -> anyhow::Result<()> {
        let until = Instant::now() + Duration::from_secs(60);
        while Instant::now() < until {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    bail!("postgres exited ({status}): {}", self.log_text());
                }
            }
            let ready = Command::new(bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("postgres did not become ready: {}", self.log_text())
    }

    /// Stops the server as a crash would (immediate shutdown), keeping its
    /// data; [`PgServer::start_again`] brings it back on the same port.
    pub fn crash(&mut self) -> anyhow::Result<()> {
        self.tell("stop")?;
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("postgres did not stop")
    }

    /// Starts the server again after [`PgServer::crash`] (crash recovery
    /// runs), waiting until it accepts connections.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        self.tell("start")?;
        let bin = bin_dir().context("PostgreSQL binaries")?;
        self.wait_ready(&bin)
    }

    fn tell(&mut self, word: &str) -> anyhow::Result<()> {
        use std::io::Write as _;
        let stdin = self.stdin.as_mut().context("the server was stopped")?;
        writeln!(stdin, "{word}").context("telling the watchdog")?;
        stdin.flush().context("telling the watchdog")
    }

    /// Pauses the server as a hung machine would: SIGSTOP to the
    /// postmaster and every process of it. Connections stay open and
    /// nothing answers until [`PgServer::resume`].
    pub fn pause(&self) -> anyhow::Result<()> {
        self.signal_all(libc_signal::STOP)
    }

    /// Resumes a server [`PgServer::pause`]d (SIGCONT to every process).
    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal_all(libc_signal::CONT)
    }

    /// The postmaster's pid, from its `postmaster.pid`.
    pub fn postmaster_pid(&self) -> anyhow::Result<u32> {
        let text = std::fs::read_to_string(self.dir.path().join("data").join("postmaster.pid"))
            .context("reading postmaster.pid")?;
        text.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .context("postmaster.pid holds no pid")
    }

    fn signal_all(&self, signal: &str) -> anyhow::Result<()> {
        let main = self.postmaster_pid()?;
        // The postmaster first (no new backend forks), then its children.
        let mut pids = vec![main];
        for entry in std::fs::read_dir("/proc").context("/proc")?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // `pid (comm) state ppid …`: the fields after the last `)`.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(main) {
                pids.push(pid);
            }
        }
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .args(pids.iter().map(u32::to_string))
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -{signal} {pids:?} failed");
        }
        Ok(())
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// The server's major version (`15`).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db` as the superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{USER}:{PASSWORD}@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a new, empty database with a unique name; returns its URL.
    pub fn create_database(&self, stem: &str) -> anyhow::Result<String> {
        static N: AtomicU64 = AtomicU64::new(0);
        let name: String = format!(
            "{stem}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
        self.execute("postgres", &format!("CREATE DATABASE \"{name}\""))?;
        Ok(self.url(&name))
    }

    /// Runs `sql` in database `db` as the superuser (on a thread of its
    /// own, so it may be called from anywhere).
    pub fn execute(&self, db: &str, sql: &str) -> anyhow::Result<()> {
        let url = self.url(db);
        let sql = sql.to_string();
        std::thread::spawn(move || -> anyhow::Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
                let driver = tokio::spawn(conn);
                let r = client.batch_execute(&sql).await;
                drop(client);
                let _ = driver.await;
                r.map_err(anyhow::Error::from)
            })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the sql thread panicked"))?
        .with_context(|| format!("executing in {db}"))
    }

    /// Stops the server (immediate shutdown) and waits for it.
    pub fn stop(&mut self) {
        self.stdin.take();
        if let Some(mut c) = self.child.take() {
            let until = Instant::now() + Duration::from_secs(20);
            while Instant::now() < until {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The one server of this test binary, started on first use. It is stopped
/// when the binary exits (the watchdog sees its stdin close).
pub fn shared() -> anyhow::Result<&'static PgServer> {
    static SERVER: OnceLock<Result<PgServer, String>> = OnceLock::new();
    SERVER
        .get_or_init(|| PgServer::start().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))
}
