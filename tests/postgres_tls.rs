//! TLS to the region's database: a controller whose `node.store.url` asks
//! for `sslmode=verify-full` with the database's CA serves over an
//! encrypted session (the server's `pg_stat_ssl` says so); a CA that did
//! not sign the server's certificate stops `serve` at start with exit 64,
//! naming the database and the TLS problem; a controller that presents a
//! client certificate (`sslcert=`/`sslkey=`) logs in as a role the server
//! admits by certificate only, and without one it is refused with exit 64.
//!
//! Its own test binary: it starts a PostgreSQL server with `ssl=on` and a
//! certificate made here.

mod support;

use std::process::{Command, Stdio};

use federation_api as api;
use federation_sandbox::pg::{self as pg_sandbox, PgServer};
use federation_sandbox::string_attrs;
use federation_tls::dev::{DevCa, Validity};
use support::*;

struct Fixture {
    server: PgServer,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn start() -> Self {
        let ca = DevCa::new("database").expect("ca");
        let leaf = ca
            .issue("db", &[], true, Validity::Normal)
            .expect("server certificate");
        let server = PgServer::start_tls(&leaf.cert_pem, &leaf.key_pem)
            .expect("the test PostgreSQL server (is PostgreSQL installed?)");
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("ca.pem"), ca.ca_pem()).expect("ca");
        let other = DevCa::new("elsewhere").expect("other ca");
        std::fs::write(dir.path().join("other-ca.pem"), other.ca_pem()).expect("other ca");
        Self { server, dir }
    }

    /// A fresh database's URL (host `localhost`, as the certificate
    /// names it) verifying against `ca_file`, and the database's name.
    fn url(&self, ca_file: &str) -> (String, String) {
        let plain = self.server.create_database("tls").expect("database");
        let db = plain.rsplit('/').next().expect("name").to_string();
        let url = format!(
            "postgres://{}:{}@localhost:{}/{db}?sslmode=verify-full&sslrootcert={}",
            pg_sandbox::USER,
            pg_sandbox::PASSWORD,
            self.server.port(),
            self.dir.path().join(ca_file).display()
        );
        (url, db)
    }
}

/// A federation whose europe controller's store is `url`, after one EU
/// submit through it was acknowledged in europe.
async fn serving_on(url: &str) -> federation_sandbox::Sandbox {
    let sandbox = formed(
        seed_sandbox()
            .region_env("europe", "FEDERATION__NODE__STORE__BACKEND", "postgres")
            .region_env("europe", "FEDERATION__NODE__STORE__URL", url)
            .region_env("europe", "FEDERATION__NODE__REPLICA", "europe-1"),
    )
    .await;
    let mut client = sandbox.client("europe").await.expect("client");
    let r = client
        .submit_task(api::SubmitTaskRequest {
            attributes: string_attrs(&[("customer_region", "DE")]),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("{s:?}\n{}", sandbox.controller_log_text("europe")))
        .into_inner();
    assert_eq!(r.region, "europe");
    sandbox
}

/// The server's count of europe's controller sessions in `db` for which
/// `condition` (over `pg_stat_ssl s`) holds, and of those for which it does
/// not, asked through `url`.
fn sessions(url: &str, db: &str, condition: &str) -> (i64, i64) {
    let pg = federation::pg::Pg::connect(url, 2, "test").expect("the test's own session");
    let pg2 = pg.clone();
    let sql = format!(
        "SELECT count(*) FILTER (WHERE {condition}), count(*) FILTER (WHERE NOT ({condition})) \
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.datname = $1 AND a.application_name LIKE 'federation/europe/%'"
    );
    let db = db.to_string();
    pg.block(async move {
        let c = pg2.client().await?;
        let row = c.query_one(&sql, &[&db]).await.map_err(|e| pg2.db(&e))?;
        Ok((row.get(0), row.get(1)))
    })
    .expect("pg_stat_ssl")
}

/// Runs `serve` for europe on `url` in `dir` and expects it to stop by
/// itself with exit 64; returns what it printed.
fn serve_exits_64(dir: &std::path::Path, url: &str) -> String {
    let config = dir.join("federation.yaml");
    std::fs::write(&config, SEED).expect("policy");
    let listen = federation_sandbox::free_port().expect("port");
    let mut cmd = Command::new(federation_exe());
    cmd.arg("serve")
        .arg("--config")
        .arg(&config)
        .args(["--region", "europe", "--insecure"])
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--data-dir")
        .arg(dir.join("europe"))
        .env("FEDERATION__NODE__STORE__BACKEND", "postgres")
        .env("FEDERATION__NODE__STORE__URL", url)
        .env("FEDERATION_KEYS", TEST_KEYS)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child =
        federation_sandbox::ChildGuard::spawn("europe controller", &mut cmd).expect("spawn");
    let mut stderr = child.stderr().expect("stderr");
    let status = child
        .wait_timeout(PATIENCE)
        .expect("serve exits by itself on a configuration error");
    let mut text = String::new();
    use std::io::Read as _;
    let _ = stderr.read_to_string(&mut text);
    assert_eq!(status.code(), Some(64), "{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_connects_with_verify_full_and_its_sessions_are_encrypted() {
    let fx = Fixture::start();
    let (url, db) = fx.url("ca.pem");
    let _sandbox = serving_on(&url).await;
    // The server's view of the controller's sessions: every one encrypted.
    let (tls, plain) = sessions(&url, &db, "s.ssl");
    assert!(tls > 0 && plain == 0, "encrypted {tls}, plain {plain}");
}

#[test]
fn a_certificate_of_another_ca_stops_serve_with_exit_64_naming_the_database_and_tls() {
    let fx = Fixture::start();
    let (url, db) = fx.url("other-ca.pem");
    let text = serve_exits_64(fx.dir.path(), &url);
    assert!(
        text.contains(&db)
            && text.contains("TLS (sslmode=verify-full)")
            && text.contains("not signed by a trusted CA")
            && text.contains("other-ca.pem"),
        "{text}"
    );
    assert!(
        !text.contains(pg_sandbox::PASSWORD),
        "the password is never printed: {text}"
    );
}

/// The server admits role `fedcert` only by a client certificate of the
/// clients' CA: the controller presents it (`pg_stat_ssl.client_dn` of
/// every session it opened), and the same URL without it stops `serve`
/// with exit 64 naming the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_logs_in_with_a_client_certificate() {
    const ROLE: &str = "fedcert";
    let ca = DevCa::new("database").expect("ca");
    let leaf = ca
        .issue("db", &[], true, Validity::Normal)
        .expect("server certificate");
    let clients = DevCa::new("database clients").expect("clients' ca");
    let client = clients
        .issue(ROLE, &[], false, Validity::Normal)
        .expect("client certificate");
    let server = PgServer::start_tls_with_client_certs(
        &leaf.cert_pem,
        &leaf.key_pem,
        &clients.ca_pem(),
        ROLE,
    )
    .expect("the test PostgreSQL server (is PostgreSQL installed?)");
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("ca.pem"), ca.ca_pem()).expect("ca");
    federation_tls::dev::write_pair(dir.path(), "client", &client).expect("client pair");
    let plain = server.create_database("certs").expect("database");
    let db = plain.rsplit('/').next().expect("name").to_string();
    server
        .execute(
            "postgres",
            &format!("CREATE ROLE {ROLE} LOGIN; ALTER DATABASE \"{db}\" OWNER TO {ROLE}"),
        )
        .expect("role");
    server
        .execute(&db, &format!("ALTER SCHEMA public OWNER TO {ROLE}"))
        .expect("schema");
    let d = dir.path().display();
    let base = format!(
        "postgres://{ROLE}@localhost:{}/{db}?sslmode=verify-full&sslrootcert={d}/ca.pem",
        server.port()
    );
    let url = format!("{base}&sslcert={d}/client.pem&sslkey={d}/client.key");

    let sandbox = serving_on(&url).await;
    let (by_cert, other) = sessions(&url, &db, "s.client_dn IS NOT DISTINCT FROM '/CN=fedcert'");
    assert!(
        by_cert > 0 && other == 0,
        "by certificate {by_cert}, other {other}"
    );
    drop(sandbox);

    // Without the certificate the same role is refused: a configuration
    // error at start.
    let text = serve_exits_64(dir.path(), &base);
    assert!(text.contains(&db) && text.contains("certificate"), "{text}");
}
