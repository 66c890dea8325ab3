//! A real, throwaway PostgreSQL server for the database-sink tests: `initdb` into a temp
//! dir, `pg_ctl start` on a free port (TCP on 127.0.0.1, socket in the temp dir), stopped and
//! deleted on drop. Each test starts its own, so tests can stop, lock or break it freely.
//!
//! The server binaries come from `ATTRSTREAM_PG_BIN`, else the newest
//! `/usr/lib/postgresql/<version>/bin` (Debian's `postgresql` package, installed by
//! `scripts/setup --test`), else `initdb` on the PATH. Without them the tests fail, saying so.
//! PostgreSQL refuses to run as root: as root the server runs as the `postgres` user
//! (created if missing).
//!
//! [`TestPostgres::start_tls`] starts one that takes TCP clients over TLS only, with a
//! certificate from a [`TestCa`] made at test time (rcgen).
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use tokio_postgres::{Client, NoTls, Row};

/// The superuser (password authentication over TCP).
pub const ADMIN: &str = "admin";
/// The superuser's password.
pub const ADMIN_PASSWORD: &str = "admin-secret";
/// An ordinary role, owner of each test database: what attrstream connects as.
pub const WRITER: &str = "writer";
/// The writer's password.
pub const WRITER_PASSWORD: &str = "writer-secret";

/// A server's TLS certificate (PEM, leaf first) and its private key (PEM).
pub struct ServerTls {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

/// A certificate authority made at test time, to sign servers' certificates.
pub struct TestCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    /// A new self-signed CA named `name` (ECDSA P-256).
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("self-signed CA certificate");
        Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A server certificate for `names` (DNS names or IP addresses), signed by this CA.
    pub fn server_cert(&self, names: &[&str]) -> ServerTls {
        let key = KeyPair::generate().expect("server key");
        let sans: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(sans).expect("server certificate parameters");
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer).expect("server certificate");
        ServerTls {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// A running server; stopped and deleted on drop.
pub struct TestPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// `Some("postgres")` when we are root and must run the server as someone else.
    run_as: Option<String>,
    /// TCP takes TLS clients only: setup connections go through the Unix socket.
    tls_only: bool,
}

impl TestPostgres {
    /// initdb + start, with the `writer` role created. Panics with instructions when the
    /// server binaries are missing.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Like [`TestPostgres::start`], with `ssl = on` and `tls` as the server's certificate,
    /// and TCP clients on 127.0.0.1 accepted only over TLS (pg_hba.conf:
    /// `hostssl all all 127.0.0.1/32 scram-sha-256`, `hostnossl all all 127.0.0.1/32 reject`).
    pub fn start_tls(tls: &ServerTls) -> Self {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<&ServerTls>) -> Self {
        let bin = server_bin_dir();
        let run_as = if is_root() { Some(ensure_server_user()) } else { None };
        let dir = tempfile::Builder::new()
            .prefix("attrstream-pg-")
            .tempdir()
            .expect("temp dir for PostgreSQL");
        std::fs::write(dir.path().join("pwfile"), ADMIN_PASSWORD).unwrap();
        if let Some(user) = &run_as {
            chown_recursive(dir.path(), user);
        }
        let mut server = Self {
            dir,
            bin,
            port: 0,
            run_as,
            tls_only: tls.is_some(),
        };
        server.run_checked(
            "initdb",
            &[
                "-D",
                &server.data_dir(),
                "-U",
                ADMIN,
                &format!("--pwfile={}", server.dir.path().join("pwfile").display()),
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
                "--no-instructions",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        );
        if let Some(tls) = tls {
            server.enable_tls(tls);
        }
        let mut last_error = String::new();
        for _ in 0..5 {
            server.port = free_port();
            match server.pg_ctl_start() {
                Ok(()) => {
                    server
                        .admin("postgres")
                        .execute(&format!("CREATE ROLE {WRITER} LOGIN PASSWORD '{WRITER_PASSWORD}'"));
                    return server;
                }
                Err(e) => last_error = e, // the port was taken meanwhile: try another
            }
        }
        panic!("PostgreSQL did not start: {last_error}");
    }

    /// The TCP port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates database `name` owned by the writer role (so it may create tables in it).
    pub fn create_database(&self, name: &str) {
        self.admin("postgres")
            .execute(&format!("CREATE DATABASE {name} OWNER {WRITER}"));
    }

    /// The writer's URL for database `name`, without the password (set `database.password`).
    pub fn writer_url(&self, name: &str) -> String {
        format!("postgres://{WRITER}@127.0.0.1:{}/{name}", self.port)
    }

    /// A superuser connection to database `name` (over TCP, or the Unix socket when TCP takes
    /// TLS clients only). Its statements time out after 60 s, so a test that waits on its own
    /// lock fails instead of hanging.
    pub fn admin(&self, name: &str) -> Sql {
        if self.tls_only {
            return Sql::connect(&format!(
                "host={} port={} user={ADMIN} dbname={name} options='-c statement_timeout=60s'",
                self.dir.path().display(),
                self.port
            ));
        }
        Sql::connect(&format!(
            "postgres://{ADMIN}:{ADMIN_PASSWORD}@127.0.0.1:{}/{name}?options=-c%20statement_timeout%3D60s",
            self.port
        ))
    }

    /// Stops the server (fast shutdown: open connections are closed).
    pub fn stop(&self) {
        self.run_checked("pg_ctl", &["-D", &self.data_dir(), "-m", "fast", "-w", "stop"]);
    }

    /// Starts it again after [`TestPostgres::stop`], on the same port.
    pub fn restart(&self) {
        self.pg_ctl_start()
            .unwrap_or_else(|e| panic!("PostgreSQL did not restart: {e}"));
    }

    /// Writes the certificate and key (key mode 0600, both owned by the server's user), turns
    /// `ssl` on and replaces pg_hba.conf so TCP clients must use TLS.
    fn enable_tls(&self, tls: &ServerTls) {
        use std::os::unix::fs::PermissionsExt;

        let cert = self.dir.path().join("server.crt");
        let key = self.dir.path().join("server.key");
        std::fs::write(&cert, &tls.cert_pem).unwrap();
        std::fs::write(&key, &tls.key_pem).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        if let Some(user) = &self.run_as {
            chown_recursive(&cert, user);
            chown_recursive(&key, user);
        }
        let data = PathBuf::from(self.data_dir());
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        conf.push_str(&format!(
            "\nssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
            cert.display(),
            key.display()
        ));
        std::fs::write(data.join("postgresql.conf"), conf).unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 scram-sha-256\n\
             hostnossl all all 127.0.0.1/32 reject\n",
        )
        .unwrap();
    }

    fn data_dir(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn pg_ctl_start(&self) -> Result<(), String> {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off \
             -c max_connections=60",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log").display().to_string();
        let out = self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data_dir(),
                "-l",
                &log,
                "-o",
                &options,
                "-w",
                "-t",
                "30",
                "start",
            ],
        );
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(&log).unwrap_or_default()
            ))
        }
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        let exe = self.bin.join(program);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()))
    }

    fn run_checked(&self, program: &str, args: &[&str]) {
        let out = self.run(program, args);
        assert!(
            out.status.success(),
            "{program} {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let _ = self.run("pg_ctl", &["-D", &self.data_dir(), "-m", "immediate", "-w", "stop"]);
    }
}

/// A blocking SQL connection for test setup and checks (its own small runtime).
pub struct Sql {
    rt: tokio::runtime::Runtime,
    client: Client,
}

impl Sql {
    /// Connects or panics.
    pub fn connect(url: &str) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let client = rt.block_on(async {
            let (client, connection) = tokio_postgres::connect(url, NoTls)
                .await
                .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
            tokio::spawn(connection);
            client
        });
        Self { rt, client }
    }

    /// Runs statements (no parameters); panics on error.
    pub fn execute(&self, sql: &str) {
        self.try_execute(sql).unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }

    /// Runs statements (no parameters).
    pub fn try_execute(&self, sql: &str) -> Result<(), tokio_postgres::Error> {
        self.rt.block_on(self.client.batch_execute(sql))
    }

    /// Rows of a query; panics on error.
    pub fn query(&self, sql: &str) -> Vec<Row> {
        self.rt
            .block_on(self.client.query(sql, &[]))
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
    }

    /// The first column of a one-row query.
    pub fn scalar<T: for<'a> tokio_postgres::types::FromSql<'a>>(&self, sql: &str) -> T {
        let rows = self.query(sql);
        assert_eq!(rows.len(), 1, "{sql}: expected one row");
        rows[0].get(0)
    }
}

/// Where the server binaries are; panics saying how to install them.
fn server_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ATTRSTREAM_PG_BIN") {
        let dir = PathBuf::from(dir);
        assert!(
            dir.join("initdb").exists(),
            "ATTRSTREAM_PG_BIN={} has no initdb",
            dir.display()
        );
        return dir;
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    if let Some(dir) = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
    {
        return dir;
    }
    panic!(
        "PostgreSQL server binaries (initdb, pg_ctl) not found in /usr/lib/postgresql/*/bin or on the \
         PATH: run `scripts/setup --test` (installs the Debian package postgresql), or set \
         ATTRSTREAM_PG_BIN to their directory"
    );
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The `postgres` user, created when missing (we are root here).
fn ensure_server_user() -> String {
    let user = "postgres";
    let exists = Command::new("id").arg(user).output().is_ok_and(|o| o.status.success());
    if !exists {
        let out = Command::new("useradd")
            .args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user])
            .output()
            .expect("running useradd");
        // Another test process may have created it at the same moment.
        let now_exists = Command::new("id").arg(user).output().is_ok_and(|o| o.status.success());
        assert!(
            now_exists,
            "PostgreSQL refuses to run as root and user {user} could not be created: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    user.to_string()
}

fn chown_recursive(path: &Path, user: &str) {
    let out = Command::new("chown")
        .args(["-R", user])
        .arg(path)
        .output()
        .expect("running chown");
    assert!(
        out.status.success(),
        "chown {user} {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A port free right now on 127.0.0.1.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().unwrap().port()
}

/// Polls `check` every 100 ms until it is true or `timeout` passes; returns the last answer.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
