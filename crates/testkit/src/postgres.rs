//! A private PostgreSQL cluster per test: `initdb` into its own temp dir, `pg_ctl start` on a free port of
//! 127.0.0.1 with the unix socket inside that dir, trust authentication, and `fsync = off` because a test
//! database never has to survive a power cut. When this process runs as root the server binaries run as the
//! `postgres` user (initdb and postgres refuse root), and the temp dir is handed to that user.
//! It must not touch the machine's own clusters: nothing here reads /etc/postgresql or uses port 5432.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, anyhow, bail};
use tempfile::TempDir;

use crate::guard::{Watchdog, euid, log_tail, run};
use crate::{PORT_ATTEMPTS, free_port};

/// Seconds `pg_ctl -w` waits for a start or stop; generous because the machine may be busy compiling.
const PG_CTL_WAIT_SECS: &str = "60";

/// A PostgreSQL cluster owned by one test, with a database named `ferry`. Stopped (`-m immediate`) and its
/// directory removed on drop.
#[derive(Debug)]
pub struct PostgresServer {
    port: u16,
    bin: PathBuf,
    /// Run server binaries through `runuser -u postgres` (we are root).
    as_postgres: bool,
    running: bool,
    watchdog: Watchdog,
    // Declared last so the directory outlives the server that writes into it.
    dir: TempDir,
}

impl PostgresServer {
    /// initdb, start on a free port, wait until it accepts connections, and create the database `ferry`.
    /// Durability is off (fsync, synchronous commit): the cluster is thrown away after the test.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with("")
    }

    /// [`PostgresServer::start`] with `extra` appended to postgresql.conf (later settings win), e.g.
    /// `"fsync = on\nsynchronous_commit = on\n"` for a benchmark that must pay for durability.
    pub fn start_with(extra: &str) -> anyhow::Result<Self> {
        Self::start_impl(extra, None)
    }

    /// [`PostgresServer::start_with`] with TLS on (`ssl = on`) and `certs`' server certificate: clients may use
    /// TLS (check `pg_stat_ssl`), plain connections are still accepted. The certificate and key are copied into
    /// the cluster's directory, owned by the server's user, the key with mode 0600 as PostgreSQL demands.
    pub fn start_tls(certs: &crate::TestCerts, extra: &str) -> anyhow::Result<Self> {
        Self::start_impl(extra, Some(certs))
    }

    fn start_impl(extra: &str, tls: Option<&crate::TestCerts>) -> anyhow::Result<Self> {
        let mut server = Self::unstarted(bindir()?.to_path_buf(), euid() == Some(0), "ferry-pg-")?;
        let as_postgres = server.as_postgres;
        let dir = server.dir.path().to_path_buf();
        let mut tls_conf = String::new();
        if let Some(certs) = tls {
            use std::os::unix::fs::PermissionsExt;
            let cert = dir.join("server.crt");
            let key = dir.join("server.key");
            fs::copy(certs.cert_file(), &cert).context("cannot copy the server certificate")?;
            fs::copy(certs.key_file(), &key).context("cannot copy the server key")?;
            fs::set_permissions(&key, fs::Permissions::from_mode(0o600))
                .context("cannot chmod the server key")?;
            if as_postgres {
                let (uid, gid) = postgres_ids()?;
                for f in [&cert, &key] {
                    std::os::unix::fs::chown(f, Some(uid), Some(gid))
                        .with_context(|| format!("cannot chown {} to postgres", f.display()))?;
                }
            }
            let quoted = |p: &Path| -> anyhow::Result<String> {
                Ok(p.to_str()
                    .context("certificate path is not UTF-8")?
                    .replace('\'', "''"))
            };
            tls_conf = format!(
                "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
                quoted(&cert)?,
                quoted(&key)?
            );
        }
        let data = dir.join("data");
        let socket_dir = dir
            .to_str()
            .context("temp dir path is not UTF-8")?
            .to_string();

        server
            .server_cmd("initdb", |c| {
                c.arg("-D")
                    .arg(&data)
                    .args([
                        "-U",
                        "postgres",
                        "--auth=trust",
                        "--encoding=UTF8",
                        "--locale=C",
                    ])
                    // The cluster is thrown away after the test; syncing it to disk only costs time.
                    .arg("--no-sync");
            })
            .context("initdb failed")?;
        let conf = format!(
            "\n# ferry-testkit\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
             shared_buffers = '32MB'\nmax_connections = 200\n",
            socket_dir.replace('\'', "''")
        ) + &tls_conf
            + extra
            + "\n";
        // Appending keeps the file owned by postgres.
        OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .context("cannot write postgresql.conf")?;

        server.start_on_a_free_port()?;
        server.create_database("ferry")?;
        Ok(server)
    }

    /// A cluster not made yet: its temp dir (owned by the server's user) and the watchdog that stops a postmaster
    /// left in `data/` and removes the dir if this process dies without running Drop (the postmaster detached
    /// from our process group, so a harness kill does not reach it).
    fn unstarted(bin: PathBuf, as_postgres: bool, prefix: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .context("cannot create a temp dir for PostgreSQL")?;
        if as_postgres {
            let (uid, gid) = postgres_ids()?;
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .with_context(|| format!("cannot chown {} to postgres", dir.path().display()))?;
        }
        let data = dir.path().join("data");
        let dir_str = dir.path().to_str().context("temp dir path is not UTF-8")?;
        let pg_ctl = bin.join("pg_ctl");
        let pg_ctl = pg_ctl.to_str().context("pg_ctl path is not UTF-8")?;
        let data_str = data.to_str().context("data dir path is not UTF-8")?;
        let stop = if as_postgres {
            "runuser -u postgres -- \"$3\" -D \"$1\" -m immediate -w stop"
        } else {
            "\"$3\" -D \"$1\" -m immediate -w stop"
        };
        let watchdog = Watchdog::spawn(
            &format!("[ -f \"$1/postmaster.pid\" ] && {stop} >/dev/null 2>&1; rm -rf \"$2\""),
            &[data_str, dir_str, pg_ctl],
        );
        Ok(Self {
            port: 0,
            bin,
            as_postgres,
            running: false,
            watchdog,
            dir,
        })
    }

    /// `pg_ctl start` on a free port, trying again on another when the port was taken meanwhile.
    fn start_on_a_free_port(&mut self) -> anyhow::Result<()> {
        let server = self;
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            server.port = free_port();
            let log_start = fs::metadata(server.log_path())
                .map(|m| m.len())
                .unwrap_or(0);
            match server.pg_ctl_start() {
                Ok(()) => {
                    server.running = true;
                    last = None;
                    break;
                }
                Err(e) => {
                    let fresh = fs::read(server.log_path())
                        .map(|b| {
                            String::from_utf8_lossy(&b[(log_start as usize).min(b.len())..])
                                .into_owned()
                        })
                        .unwrap_or_default();
                    if !fresh.contains("Address already in use") {
                        return Err(e);
                    }
                    last = Some(e);
                }
            }
        }
        if let Some(e) = last {
            return Err(e.context(format!(
                "PostgreSQL found no free port in {PORT_ATTEMPTS} attempts"
            )));
        }
        Ok(())
    }

    /// A streaming replica of this cluster (`pg_basebackup -R`, hot standby): a cluster of its own, in its own
    /// temp dir and on its own port, that answers reads of every database and follows the primary's writes
    /// (read-only: writes fail). Stopping the primary leaves it up, serving what it has.
    pub fn start_replica(&self) -> anyhow::Result<PostgresServer> {
        let mut replica = Self::unstarted(self.bin.clone(), self.as_postgres, "ferry-pg-replica-")?;
        let data = replica.dir.path().join("data");
        let socket_dir = replica
            .dir
            .path()
            .to_str()
            .context("temp dir path is not UTF-8")?
            .to_string();
        let port = self.port.to_string();
        replica
            .server_cmd("pg_basebackup", |c| {
                c.args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-D"])
                    .arg(&data)
                    // Write the standby settings (primary_conninfo, standby.signal); stream the WAL it needs.
                    .args(["-R", "-X", "stream", "--no-sync", "--checkpoint=fast"]);
            })
            .with_context(|| format!("pg_basebackup failed\n{}", self.log_tail()))?;
        // The copied postgresql.conf points at the primary's socket dir: this one's own (later settings win).
        OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .and_then(|mut f| {
                f.write_all(
                    format!(
                        "\n# ferry-testkit replica\nunix_socket_directories = '{}'\nhot_standby = on\n",
                        socket_dir.replace('\'', "''")
                    )
                    .as_bytes(),
                )
            })
            .context("cannot write the replica's postgresql.conf")?;
        replica.start_on_a_free_port()?;
        Ok(replica)
    }

    /// `postgres://postgres@127.0.0.1:PORT/ferry`
    pub fn url(&self) -> String {
        self.url_for("ferry")
    }

    /// The URL of another database on this server.
    pub fn url_for(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's temp dir (data directory in `data/`, the log, the unix socket).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last lines of the server log, for assertion messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path(), 40)
    }

    /// Create a database and return its URL, so each test can have its own. Names are limited to ASCII letters,
    /// digits, `_` and `-` so that the URL needs no escaping.
    pub fn create_database(&self, name: &str) -> anyhow::Result<String> {
        let valid = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            bail!("database name {name:?} must be 1-63 ASCII letters, digits, '_' or '-'");
        }
        run(Command::new(self.bin.join("createdb"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                name,
            ])
            .env("PGCONNECT_TIMEOUT", "10"))
        .with_context(|| format!("cannot create database {name}\n{}", self.log_tail()))?;
        Ok(self.url_for(name))
    }

    /// Run SQL through `psql` on the `ferry` database; see [`psql`].
    pub fn psql(&self, sql: &str) -> anyhow::Result<String> {
        psql(&self.url(), sql)
    }

    /// `pg_ctl stop -m fast`: connections are closed, the cluster shuts down cleanly. A no-op when stopped.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if !self.running {
            return Ok(());
        }
        self.pg_ctl_stop("fast")?;
        self.running = false;
        Ok(())
    }

    /// Start the stopped cluster again on the same port (clients hold the URL) and wait until it accepts
    /// connections.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        if self.running {
            return Ok(());
        }
        self.pg_ctl_start()
            .with_context(|| format!("cannot start PostgreSQL again on port {}", self.port))?;
        self.running = true;
        Ok(())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn pg_ctl_start(&self) -> anyhow::Result<()> {
        let data = self.dir.path().join("data");
        let log = self.log_path();
        let port = self.port;
        self.server_cmd("pg_ctl", |c| {
            c.arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", PG_CTL_WAIT_SECS])
                .args(["-o", &format!("-p {port}"), "start"]);
        })
        .with_context(|| format!("pg_ctl start on port {port} failed\n{}", self.log_tail()))?;
        Ok(())
    }

    fn pg_ctl_stop(&self, mode: &str) -> anyhow::Result<()> {
        let data = self.dir.path().join("data");
        self.server_cmd("pg_ctl", |c| {
            c.arg("-D")
                .arg(&data)
                .args(["-m", mode, "-w", "-t", PG_CTL_WAIT_SECS, "stop"]);
        })
        .with_context(|| format!("pg_ctl stop -m {mode} failed\n{}", self.log_tail()))?;
        Ok(())
    }

    /// Run a server binary (initdb, pg_ctl), as the postgres user when we are root. The working directory is the
    /// temp dir because the postgres user may not be allowed into the test's own working directory.
    fn server_cmd(&self, program: &str, args: impl FnOnce(&mut Command)) -> anyhow::Result<()> {
        let path = self.bin.join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        args(&mut cmd);
        cmd.current_dir(self.dir.path());
        run(&mut cmd).map(drop)
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        // Checked by pid file rather than `running`: a start that timed out may still have left a postmaster up.
        if self.dir.path().join("data/postmaster.pid").exists() {
            // Immediate: nobody reads this cluster again, so there is nothing to flush.
            let _ = self.pg_ctl_stop("immediate");
        }
        self.watchdog.disarm();
    }
}

/// Run SQL with `psql` against a database URL and return the unaligned, tuples-only output (`SELECT 1` → `1`).
/// Stops at the first error and reports it.
pub fn psql(url: &str, sql: &str) -> anyhow::Result<String> {
    let program = bindir()
        .map(|b| b.join("psql"))
        .ok()
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("psql"));
    let out = run(Command::new(program)
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            sql,
        ])
        .env("PGCONNECT_TIMEOUT", "10"))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .trim_end_matches('\n')
        .to_string())
}

/// The directory with initdb/pg_ctl/postgres: `FERRY_PG_BINDIR`, else `pg_config --bindir`, else the newest
/// `/usr/lib/postgresql/<version>/bin` (Debian keeps versions side by side and puts none of them on PATH).
fn bindir() -> anyhow::Result<&'static Path> {
    static BINDIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = BINDIR.get_or_init(|| {
        let has_server = |p: &Path| p.join("pg_ctl").exists() && p.join("initdb").exists();
        if let Some(dir) = std::env::var_os("FERRY_PG_BINDIR").map(PathBuf::from) {
            return if has_server(&dir) {
                Ok(dir)
            } else {
                Err(format!(
                    "FERRY_PG_BINDIR={} has no pg_ctl/initdb",
                    dir.display()
                ))
            };
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if out.status.success() && has_server(&dir) {
                return Ok(dir);
            }
        }
        let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let v = e.file_name().to_str()?.parse().ok()?;
                Some((v, e.path().join("bin")))
            })
            .filter(|(_, p)| has_server(p))
            .collect();
        versions.sort();
        versions.pop().map(|(_, p)| p).ok_or_else(|| {
            "no PostgreSQL server binaries (pg_config --bindir, /usr/lib/postgresql/*/bin); \
             scripts/test.sh installs them"
                .to_string()
        })
    });
    found.as_deref().map_err(|e| anyhow!("{e}"))
}

/// uid and gid of the `postgres` user, which the Debian package creates.
fn postgres_ids() -> anyhow::Result<(u32, u32)> {
    let id = |flag: &str| -> anyhow::Result<u32> {
        let out = run(Command::new("id").args([flag, "postgres"]))
            .context("running as root needs a `postgres` user to run PostgreSQL")?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    Ok((id("-u")?, id("-g")?))
}
