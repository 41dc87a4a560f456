//! The connection to a region's PostgreSQL database (`node.store.backend:
//! postgres`): a runtime of its own, the pool, the versioned schema the
//! controller migrates at start, and what the database's errors mean.
//!
//! What it owns: connecting (the pool of `node.store.pool_size` connections,
//! recycled when the server closed one), the schema (the [`MIGRATIONS`], run
//! under an advisory lock so that several replicas starting at once apply
//! each exactly once; a database of a newer version than this build knows
//! is refused), and classifying errors: configuration errors (unreachable
//! server, wrong credentials, missing database, newer schema) versus a store
//! that is unavailable now. What it must not know: tasks, decisions (the
//! SQL of those lives in `tasks::postgres` and `audit::postgres`).
//!
//! Why a runtime of its own: the stores' read paths are synchronous (the
//! embedded store reads its file in place), and a synchronous call must be
//! able to wait for the database from any thread, also from a
//! single-threaded runtime's. The pool's connections are driven by two
//! threads of this runtime; callers hand work over and wait for the answer
//! ([`Pg::run`], [`Pg::block`]).
//!
//! **Every call is bounded** by `node.store.timeout` ([`Pg::bounded`]):
//! a server that accepts connections but stops answering (a stopped
//! process, a stalled volume) would otherwise hold a caller for as long
//! as it is stopped, and `statement_timeout` cannot help when the server
//! runs nothing. Past the deadline the call fails as
//! [`PgError::Unreachable`] (the store is unavailable) and every
//! connection it held is discarded, not returned to the pool ([`PgClient`]):
//! its answer may still arrive, and a later call must not read it.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::runtime::{Handle, Runtime};

/// The schema versions this build knows, in order: version, SQL. Each runs
/// in the one transaction that holds the migration lock and records it.
pub const MIGRATIONS: &[(i32, &str)] = &[
    (1, SCHEMA_V1),
    (2, SCHEMA_V2),
    (3, SCHEMA_V3),
    (4, SCHEMA_V4),
    (5, SCHEMA_V5),
];

/// The newest schema version this build knows.
pub fn known_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// The advisory lock key of migrations (`pg_advisory_xact_lock`): a
/// constant of this program ("fedstore" in ASCII).
const MIGRATION_LOCK: i64 = 0x6665_6473_746f_7265;

/// How long connecting to the database may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a caller waits for a connection of the pool.
const WAIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one call may take by default (`node.store.timeout`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one call of the auditors' commands may take (they read the
/// whole chain in one query).
const READ_ONLY_TIMEOUT: Duration = Duration::from_secs(600);

tokio::task_local! {
    /// Set by [`Pg::bounded`] for the call it runs: true once the call ran
    /// out of time, so the connections it holds are discarded when it is
    /// dropped.
    static ABANDONED: Arc<AtomicBool>;
}

/// A connection of the pool, given back to the pool when dropped, unless
/// the call that took it was abandoned at its deadline: then it is
/// detached and closed (a request may still be waiting on it).
pub struct PgClient {
    object: Option<deadpool_postgres::Client>,
    abandoned: Option<Arc<AtomicBool>>,
}

impl std::ops::Deref for PgClient {
    type Target = deadpool_postgres::Client;

    fn deref(&self) -> &Self::Target {
        // Only `Drop` takes it out.
        self.object.as_ref().expect("a connection until dropped")
    }
}

impl std::ops::DerefMut for PgClient {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.object.as_mut().expect("a connection until dropped")
    }
}

impl Drop for PgClient {
    fn drop(&mut self) {
        let abandoned = self
            .abandoned
            .as_ref()
            .is_some_and(|a| a.load(Ordering::SeqCst));
        if let (true, Some(object)) = (abandoned, self.object.take()) {
            // Out of the pool; dropping the client closes the connection.
            drop(deadpool_postgres::Client::take(object));
        }
    }
}

/// Version 1: tasks (with their queue and lease indexes), agents, small
/// named values, and the decision log (append-only by trigger, one hash
/// chain per region, its head in `decision_heads`).
const SCHEMA_V1: &str = r#"
CREATE TABLE tasks (
    region text NOT NULL,
    task_id text NOT NULL,
    state smallint NOT NULL,
    priority integer NOT NULL,
    created_ms bigint NOT NULL,
    lease_deadline_ms bigint NOT NULL,
    agent_id text NOT NULL,
    idempotency_key text,
    body bytea NOT NULL,
    PRIMARY KEY (region, task_id)
);
CREATE UNIQUE INDEX tasks_idempotency ON tasks (region, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX tasks_queue ON tasks (region, priority DESC, created_ms, task_id)
    WHERE state = 1;
CREATE INDEX tasks_leases ON tasks (region, lease_deadline_ms, task_id)
    WHERE state = 2;
CREATE TABLE agents (
    region text NOT NULL,
    agent_id text NOT NULL,
    record bytea NOT NULL,
    PRIMARY KEY (region, agent_id)
);
CREATE TABLE store_meta (
    region text NOT NULL,
    key text NOT NULL,
    value text NOT NULL,
    PRIMARY KEY (region, key)
);
CREATE TABLE decisions (
    region text NOT NULL,
    seq bigint NOT NULL,
    hash text NOT NULL,
    task_id text,
    line text NOT NULL,
    PRIMARY KEY (region, seq)
);
CREATE TABLE decision_heads (
    region text PRIMARY KEY,
    seq bigint NOT NULL,
    hash text NOT NULL
);
CREATE FUNCTION decisions_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the decision log is append-only: % on decisions refused', TG_OP;
END
$$;
CREATE TRIGGER decisions_no_update_or_delete BEFORE UPDATE OR DELETE ON decisions
    FOR EACH ROW EXECUTE FUNCTION decisions_append_only();
CREATE TRIGGER decisions_no_truncate BEFORE TRUNCATE ON decisions
    FOR EACH STATEMENT EXECUTE FUNCTION decisions_append_only();
"#;

/// Version 2: the region's leader (a lease with a fencing token, times on
/// the database's clock) and the replicas' names in use.
const SCHEMA_V2: &str = r#"
CREATE TABLE region_leaders (
    region text PRIMARY KEY,
    replica text NOT NULL,
    instance text NOT NULL,
    token bigint NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE TABLE replicas (
    region text NOT NULL,
    replica text NOT NULL,
    instance text NOT NULL,
    seen_at timestamptz NOT NULL,
    PRIMARY KEY (region, replica)
);
"#;

/// Version 3: a task's decision records found by its id (`GetTask`'s
/// decision; before, the lookup read the whole chain). Built in the
/// migration's transaction: it locks `decisions` against appends while it
/// builds, which a region's chain (one row per decision) takes seconds for.
const SCHEMA_V3: &str = r#"
CREATE INDEX decisions_task ON decisions (region, task_id, seq) WHERE task_id IS NOT NULL;
"#;

/// Version 4: what each replica tells its siblings (where it is reached and
/// whether it drains), refreshed with its name every heartbeat: a draining
/// replica passes new work to a sibling that serves. Columns with defaults,
/// so replicas of version 3 keep running on it.
const SCHEMA_V4: &str = r#"
ALTER TABLE replicas ADD COLUMN endpoint text NOT NULL DEFAULT '';
ALTER TABLE replicas ADD COLUMN draining boolean NOT NULL DEFAULT false;
"#;

/// Version 5: the database seals decision records into the chain itself
/// (`crate::audit::postgres::append`), so an append locks the region's
/// head only from its statement to the commit. `decisions_append` locks
/// the head row, and for each record (in order) joins its parts around the
/// previous hash and the seq — `head ‖ previous hash ‖ mid ‖ seq ‖ tail`,
/// the line's body without its closing brace, as
/// `crate::audit::Prepared::seal_into` writes it — hashes the body (that
/// and `}`, SHA-256 of its UTF-8), makes the line of it, `p_sep`, the hash
/// and `"}`, then inserts the rows and moves the head. Every step is a
/// copy, none counts characters: the head stays locked while it runs.
/// Given `p_created` and `p_expected` (how many tasks the statement's own
/// INSERT created, and should have), it appends only when they agree and
/// otherwise fails with SQLSTATE `FDB01`, which aborts the transaction.
/// Replicas of version 4 keep running on it (they lock the same row).
const SCHEMA_V5: &str = r#"
CREATE FUNCTION decisions_append(
    p_region text, p_genesis text, p_sep text,
    p_heads text[], p_mids text[], p_tails text[], p_task_ids text[],
    p_created bigint DEFAULT NULL, p_expected bigint DEFAULT NULL,
    OUT head_seq bigint, OUT head_hash text)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $fn$
DECLARE
    n integer := coalesce(array_length(p_heads, 1), 0);
    seqs bigint[] := '{}';
    hashes text[] := '{}';
    lines text[] := '{}';
    unsealed text;
BEGIN
    IF p_created IS DISTINCT FROM p_expected THEN
        RAISE EXCEPTION 'the batch created % of its % tasks', p_created, p_expected
            USING ERRCODE = 'FDB01';
    END IF;
    SELECT h.seq, h.hash INTO head_seq, head_hash
        FROM decision_heads h WHERE h.region = p_region FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO decision_heads (region, seq, hash) VALUES (p_region, 0, p_genesis)
            ON CONFLICT (region) DO NOTHING;
        SELECT h.seq, h.hash INTO head_seq, head_hash
            FROM decision_heads h WHERE h.region = p_region FOR UPDATE;
    END IF;
    IF n = 0 THEN
        RETURN;
    END IF;
    FOR i IN 1 .. n LOOP
        head_seq := head_seq + 1;
        unsealed := p_heads[i] || head_hash || p_mids[i] || head_seq::text || p_tails[i];
        head_hash := encode(sha256(convert_to(unsealed || '}', 'UTF8')), 'hex');
        seqs[i] := head_seq;
        hashes[i] := head_hash;
        lines[i] := unsealed || p_sep || head_hash || '"}';
    END LOOP;
    INSERT INTO decisions (region, seq, hash, task_id, line)
        SELECT p_region, u.s, u.h, u.t, u.l FROM unnest(seqs, hashes, p_task_ids, lines) AS u(s, h, t, l);
    UPDATE decision_heads SET seq = head_seq, hash = head_hash WHERE region = p_region;
END
$fn$;
"#;

/// Errors of the database connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PgError {
    /// `node.store.url` does not parse, or is missing.
    #[error("node.store.url: {0}")]
    Url(String),
    /// The server cannot be reached (refused, timed out, name unknown).
    #[error("PostgreSQL at {target}: cannot connect: {detail}")]
    Unreachable {
        /// Host, port and database (no password).
        target: String,
        /// What the client saw.
        detail: String,
    },
    /// The server refused the credentials.
    #[error("PostgreSQL at {target}: authentication failed for user `{user}`: {detail}")]
    Auth {
        /// Host, port and database.
        target: String,
        /// The user.
        user: String,
        /// What the server said.
        detail: String,
    },
    /// The database named by the URL does not exist.
    #[error(
        "PostgreSQL at {target}: database `{database}` does not exist (create it, or fix node.store.url)"
    )]
    MissingDatabase {
        /// Host and port.
        target: String,
        /// The database.
        database: String,
    },
    /// TLS to the database failed: the server offers none, or its
    /// certificate is not trusted or does not name the host.
    #[error("PostgreSQL at {target}: TLS (sslmode={mode}): {detail}")]
    Tls {
        /// Host, port and database.
        target: String,
        /// The URL's `sslmode`.
        mode: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The database's schema is newer than this build.
    #[error(
        "PostgreSQL at {target}: the schema is at version {found}, newer than this build knows ({known}); \
         refusing to start on it: run a controller of the version that migrated it (or newer)"
    )]
    NewerSchema {
        /// Host, port and database.
        target: String,
        /// The version found.
        found: i32,
        /// The newest version this build knows.
        known: i32,
    },
    /// The schema needs migrating and this role may not (a controller's
    /// role without DDL rights: migrations run with the owner's).
    #[error(
        "PostgreSQL at {target}: the schema is at version {found}, this build needs {known}, and this role may not migrate it ({detail}): \
         run `federation store migrate URL` with the URL of the schema's owner first"
    )]
    MigrationRefused {
        /// Host, port and database.
        target: String,
        /// The version found (0: no schema).
        found: i32,
        /// The newest version this build knows.
        known: i32,
        /// What the server said.
        detail: String,
    },
    /// Any other failure of the database (a query, a lost connection).
    #[error("PostgreSQL at {target}: {detail}")]
    Db {
        /// Host, port and database.
        target: String,
        /// What failed.
        detail: String,
    },
}

impl PgError {
    /// True for errors of the configuration (exit 64 at start): the URL,
    /// the server, the credentials, the database, the schema's version.
    pub fn is_config(&self) -> bool {
        !matches!(self, PgError::Db { .. })
    }
}

/// A region's database: the pool and the runtime that drives it. Cheap to
/// clone; the runtime stops when the last clone is dropped.
#[derive(Clone)]
pub struct Pg {
    inner: Arc<PgInner>,
}

struct PgInner {
    runtime: Option<Runtime>,
    handle: Handle,
    pool: deadpool_postgres::Pool,
    target: String,
    config: tokio_postgres::Config,
    tls: crate::pg_tls::DbTls,
    /// The bound of every call (`node.store.timeout`).
    timeout: Duration,
}

impl Drop for PgInner {
    fn drop(&mut self) {
        self.pool.close();
        if let Some(rt) = self.runtime.take() {
            // Never blocks, so it may run on an async worker too.
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for Pg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pg")
            .field("target", &self.inner.target)
            .finish()
    }
}

/// The first host of a configuration (the name TLS checks).
fn host_of(config: &tokio_postgres::Config) -> String {
    config
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into())
}

/// `host:port/database` of a configuration, for messages (never the
/// password).
fn target_of(config: &tokio_postgres::Config) -> String {
    let host = host_of(config);
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or("postgres");
    format!("{host}:{port}/{db}")
}

/// The whole chain of an error's causes, `a: b: c`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The startup `options` of the controller's sessions. Statements are
/// prepared once per connection and planned per execution
/// (`force_custom_plan`): a generic plan cannot see how many ids an
/// `= ANY($2)` carries, and the look-ups' generic plans scanned the table
/// (6 ms per batch in the PostgreSQL bench with `auto`). The URL's own
/// `options` come after that (an operator may plan otherwise), and
/// `synchronous_commit=on` after them: no URL makes an acknowledgement less
/// durable.
fn session_options(url_options: Option<&str>) -> String {
    let url_options = url_options.map(str::trim).filter(|o| !o.is_empty());
    match url_options {
        Some(o) => format!("-c plan_cache_mode=force_custom_plan {o} -c synchronous_commit=on"),
        None => "-c plan_cache_mode=force_custom_plan -c synchronous_commit=on".to_string(),
    }
}

impl Pg {
    /// Connects to `url` with at most `pool_size` connections and migrates
    /// the schema. Errors name what is wrong; [`PgError::is_config`] tells
    /// the configuration's from the database's.
    pub fn connect(url: &str, pool_size: usize, application: &str) -> Result<Self, PgError> {
        Self::connect_with(url, pool_size, application, true, DEFAULT_TIMEOUT)
    }

    /// [`Pg::connect`] with every call bounded by `timeout`
    /// (`node.store.timeout`).
    pub fn connect_with_timeout(
        url: &str,
        pool_size: usize,
        application: &str,
        timeout: Duration,
    ) -> Result<Self, PgError> {
        Self::connect_with(url, pool_size, application, true, timeout)
    }

    /// Connects to a database a controller migrated, without changing it
    /// (the auditors' commands: an auditor's role may only read). Refuses a
    /// database without the schema, or with a newer one.
    pub fn connect_read_only(url: &str, application: &str) -> Result<Self, PgError> {
        Self::connect_with(url, 2, application, false, READ_ONLY_TIMEOUT)
    }

    fn connect_with(
        url: &str,
        pool_size: usize,
        application: &str,
        migrating: bool,
        timeout: Duration,
    ) -> Result<Self, PgError> {
        // sslmode and sslrootcert are read as libpq reads them (the
        // client knows neither verify-ca, verify-full nor sslrootcert).
        let (url, tls) = crate::pg_tls::split_url(url).map_err(|e| PgError::Url(e.to_string()))?;
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|e: tokio_postgres::Error| {
                PgError::Url(format!("not a PostgreSQL URL: {}", chain(&e)))
            })?;
        config.ssl_mode(tls.client_mode());
        config.connect_timeout(CONNECT_TIMEOUT);
        // Acknowledged means committed on the server's disk, whatever the
        // server's default is (set for every session, so no transaction
        // pays a round trip for it).
        config.options(session_options(config.get_options()));
        if config.get_application_name().is_none() {
            config.application_name(application);
        }
        let target = target_of(&config);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("postgres")
            .enable_all()
            .build()
            .map_err(|e| PgError::Db {
                target: target.clone(),
                detail: format!("starting the database runtime: {e}"),
            })?;
        let handle = runtime.handle().clone();
        let manager = deadpool_postgres::Manager::from_config(
            config.clone(),
            tls.connector.clone(),
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(pool_size.max(2))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .create_timeout(Some(CONNECT_TIMEOUT))
            .wait_timeout(Some(WAIT_TIMEOUT))
            .build()
            .map_err(|e| PgError::Url(e.to_string()))?;
        let pg = Pg {
            inner: Arc::new(PgInner {
                runtime: Some(runtime),
                handle,
                pool,
                target,
                config: config.clone(),
                tls,
                timeout: timeout.max(Duration::from_millis(1)),
            }),
        };
        let user = config.get_user().unwrap_or("").to_string();
        let database = config.get_dbname().unwrap_or(&user).to_string();
        let this = pg.clone();
        pg.block(async move {
            let client = this.client_classified(&user, &database).await?;
            if migrating {
                migrate(&client, &this.inner.target).await
            } else {
                schema_version(&client, &this.inner.target).await
            }
        })?;
        Ok(pg)
    }

    /// `host:port/database`, for messages.
    pub fn target(&self) -> &str {
        &self.inner.target
    }

    /// The runtime that drives the connections.
    pub fn handle(&self) -> &Handle {
        &self.inner.handle
    }

    /// The connection settings (for a dedicated connection: LISTEN).
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.inner.config
    }

    /// The TLS connector of every connection (a dedicated one too).
    pub fn tls(&self) -> crate::pg_tls::Connector {
        self.inner.tls.connector.clone()
    }

    /// The pool itself, for work that must not keep the runtime alive (a
    /// task of this runtime holding a [`Pg`] would own its own runtime).
    pub fn pool(&self) -> deadpool_postgres::Pool {
        self.inner.pool.clone()
    }

    /// A connection of the pool (discarded instead of given back when the
    /// [`Pg::bounded`] call that took it runs out of time).
    pub async fn client(&self) -> Result<PgClient, PgError> {
        let object = self
            .inner
            .pool
            .get()
            .await
            .map_err(|e| self.pool_error(e))?;
        Ok(PgClient {
            object: Some(object),
            abandoned: ABANDONED.try_with(Arc::clone).ok(),
        })
    }

    /// The bound of every call (`node.store.timeout`).
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// Runs `fut` within `node.store.timeout`: past it, `fut` is dropped,
    /// the connections it took are discarded, and the call fails as
    /// [`PgError::Unreachable`] naming the bound.
    pub async fn bounded<T>(
        &self,
        fut: impl Future<Output = Result<T, PgError>>,
    ) -> Result<T, PgError> {
        let abandoned = Arc::new(AtomicBool::new(false));
        let limit = self.inner.timeout;
        let mut call = Box::pin(tokio::time::timeout(
            limit,
            ABANDONED.scope(Arc::clone(&abandoned), fut),
        ));
        match call.as_mut().await {
            Ok(answer) => answer,
            Err(_) => {
                abandoned.store(true, Ordering::SeqCst);
                drop(call);
                tracing::warn!(target = %self.inner.target, timeout = ?limit, "database call abandoned: no answer in time, its connection discarded");
                Err(PgError::Unreachable {
                    target: self.inner.target.clone(),
                    detail: format!(
                        "no answer within {} (node.store.timeout)",
                        humantime::format_duration(limit)
                    ),
                })
            }
        }
    }

    async fn client_classified(&self, user: &str, database: &str) -> Result<PgClient, PgError> {
        match self.inner.pool.get().await {
            Ok(c) => Ok(PgClient {
                object: Some(c),
                abandoned: ABANDONED.try_with(Arc::clone).ok(),
            }),
            Err(deadpool_postgres::PoolError::Backend(e)) => {
                if let Some(detail) = self.inner.tls.explain(&e, &host_of(&self.inner.config)) {
                    return Err(PgError::Tls {
                        target: self.inner.target.clone(),
                        mode: self.inner.tls.mode.as_str(),
                        detail,
                    });
                }
                Err(classify_connect(&e, &self.inner.target, user, database))
            }
            Err(deadpool_postgres::PoolError::Timeout(_)) => Err(PgError::Unreachable {
                target: self.inner.target.clone(),
                detail: format!("no connection within {}s", CONNECT_TIMEOUT.as_secs()),
            }),
            Err(e) => Err(self.pool_error(e)),
        }
    }

    fn pool_error(&self, e: deadpool_postgres::PoolError) -> PgError {
        PgError::Unreachable {
            target: self.inner.target.clone(),
            detail: format!("no connection: {}", chain(&e)),
        }
    }

    /// Wraps a database error of a query: [`PgError::Unreachable`] when the
    /// connection failed or was lost (no answer of the server), else
    /// [`PgError::Db`].
    pub fn db(&self, e: &tokio_postgres::Error) -> PgError {
        if e.as_db_error().is_none() && (e.is_closed() || std::error::Error::source(e).is_some()) {
            return PgError::Unreachable {
                target: self.inner.target.clone(),
                detail: chain(e),
            };
        }
        PgError::Db {
            target: self.inner.target.clone(),
            detail: chain(e),
        }
    }

    /// Runs `fut` on the database runtime, [`Pg::bounded`], and awaits its
    /// answer (from any runtime).
    pub async fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, PgError>> + Send + 'static,
    ) -> Result<T, PgError> {
        let this = self.clone();
        let bounded = async move { this.bounded(fut).await };
        match self.inner.handle.spawn(bounded).await {
            Ok(r) => r,
            Err(e) => Err(PgError::Db {
                target: self.inner.target.clone(),
                detail: format!("database task failed: {e}"),
            }),
        }
    }

    /// Runs `fut` on the database runtime and blocks this thread until it
    /// answers (the synchronous read paths; like a read of the embedded
    /// file, it holds the calling thread for the round trip).
    pub fn block<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, PgError>> + Send + 'static,
    ) -> Result<T, PgError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let this = self.clone();
        self.inner.handle.spawn(async move {
            let _ = tx.send(this.bounded(fut).await);
        });
        rx.recv().unwrap_or_else(|_| {
            Err(PgError::Db {
                target: self.inner.target.clone(),
                detail: "database task failed".into(),
            })
        })
    }
}

/// What a failure to connect means.
fn classify_connect(e: &tokio_postgres::Error, target: &str, user: &str, db: &str) -> PgError {
    use tokio_postgres::error::SqlState;
    match e.code() {
        Some(c)
            if *c == SqlState::INVALID_PASSWORD
                || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
        {
            PgError::Auth {
                target: target.to_string(),
                user: user.to_string(),
                detail: e
                    .as_db_error()
                    .map_or_else(|| chain(e), |d| d.message().to_string()),
            }
        }
        Some(c) if *c == SqlState::INVALID_CATALOG_NAME => PgError::MissingDatabase {
            target: target.rsplit_once('/').map_or(target, |t| t.0).to_string(),
            database: db.to_string(),
        },
        Some(_) => PgError::Db {
            target: target.to_string(),
            detail: chain(e),
        },
        None => PgError::Unreachable {
            target: target.to_string(),
            detail: chain(e),
        },
    }
}

/// The schema's version as recorded, 0 without a schema (read only).
async fn current_version(client: &tokio_postgres::Client, target: &str) -> Result<i32, PgError> {
    let db = |e: tokio_postgres::Error| PgError::Db {
        target: target.to_string(),
        detail: format!("reading the schema version: {}", chain(&e)),
    };
    let exists: bool = client
        .query_one("SELECT to_regclass('federation_schema') IS NOT NULL", &[])
        .await
        .map_err(db)?
        .get(0);
    if !exists {
        return Ok(0);
    }
    Ok(client
        .query_one(
            "SELECT coalesce(max(version), 0) FROM federation_schema",
            &[],
        )
        .await
        .map_err(db)?
        .get(0))
}

/// The schema's version, refusing a database without one or with a newer
/// one than this build knows.
async fn schema_version(client: &tokio_postgres::Client, target: &str) -> Result<i32, PgError> {
    let db = |e: tokio_postgres::Error| PgError::Db {
        target: target.to_string(),
        detail: format!("reading the schema version: {}", chain(&e)),
    };
    let exists: bool = client
        .query_one("SELECT to_regclass('federation_schema') IS NOT NULL", &[])
        .await
        .map_err(db)?
        .get(0);
    if !exists {
        return Err(PgError::Url(format!(
            "{target} holds no federation schema (no controller has used this database)"
        )));
    }
    let found: i32 = client
        .query_one(
            "SELECT coalesce(max(version), 0) FROM federation_schema",
            &[],
        )
        .await
        .map_err(db)?
        .get(0);
    if found > known_version() {
        return Err(PgError::NewerSchema {
            target: target.to_string(),
            found,
            known: known_version(),
        });
    }
    Ok(found)
}

/// Creates or migrates the schema: in one transaction holding the
/// migration lock, reads the version, refuses a newer one, applies each
/// missing migration and records it. Replicas starting at once wait for
/// the lock; the second finds the schema current. A schema already current
/// is only read (no DDL, no lock): a controller's role that may not change
/// the schema starts on a database its owner migrated.
async fn migrate(client: &PgClient, target: &str) -> Result<i32, PgError> {
    let found = current_version(client, target).await?;
    let known = known_version();
    if found == known {
        return Ok(known);
    }
    if found > known {
        return Err(PgError::NewerSchema {
            target: target.to_string(),
            found,
            known,
        });
    }
    let db = |e: tokio_postgres::Error| {
        if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
            return PgError::MigrationRefused {
                target: target.to_string(),
                found,
                known,
                detail: e
                    .as_db_error()
                    .map_or_else(|| chain(&e), |d| d.message().to_string()),
            };
        }
        PgError::Db {
            target: target.to_string(),
            detail: format!("migrating the schema: {}", chain(&e)),
        }
    };
    let txn_client: &tokio_postgres::Client = client;
    txn_client.batch_execute("BEGIN").await.map_err(db)?;
    // No NOTICE for the schema table that already exists.
    txn_client
        .batch_execute("SET LOCAL client_min_messages = warning")
        .await
        .map_err(db)?;
    let result = async {
        txn_client
            .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(db)?;
        txn_client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS federation_schema (
                     version integer PRIMARY KEY,
                     applied_unix_ms bigint NOT NULL
                 )",
            )
            .await
            .map_err(db)?;
        let row = txn_client
            .query_one(
                "SELECT coalesce(max(version), 0) FROM federation_schema",
                &[],
            )
            .await
            .map_err(db)?;
        let found: i32 = row.get(0);
        let known = known_version();
        if found > known {
            return Err(PgError::NewerSchema {
                target: target.to_string(),
                found,
                known,
            });
        }
        for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > found) {
            txn_client.batch_execute(sql).await.map_err(db)?;
            txn_client
                .execute(
                    "INSERT INTO federation_schema (version, applied_unix_ms) VALUES ($1, $2)",
                    &[version, &crate::clock::now_unix_ms()],
                )
                .await
                .map_err(db)?;
            tracing::info!(target = %target, version, "database schema migrated");
        }
        Ok(known)
    }
    .await;
    match result {
        Ok(v) => {
            txn_client.batch_execute("COMMIT").await.map_err(db)?;
            Ok(v)
        }
        Err(e) => {
            let _ = txn_client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_urls_options_may_plan_otherwise_but_never_weaken_commits() {
        assert_eq!(
            session_options(None),
            "-c plan_cache_mode=force_custom_plan -c synchronous_commit=on"
        );
        assert_eq!(session_options(Some("  ")), session_options(None));
        // Later settings win in PostgreSQL's startup options.
        assert_eq!(
            session_options(Some("-c plan_cache_mode=auto -c synchronous_commit=off")),
            "-c plan_cache_mode=force_custom_plan -c plan_cache_mode=auto \
             -c synchronous_commit=off -c synchronous_commit=on"
        );
    }
    use federation_sandbox::pg as pg_sandbox;

    fn server() -> &'static pg_sandbox::PgServer {
        pg_sandbox::shared().expect("the test PostgreSQL server (is PostgreSQL installed?)")
    }

    #[test]
    fn replicas_starting_at_once_migrate_once() {
        let url = server().create_database("migrate").expect("database");
        let started: Vec<_> = (0..4)
            .map(|_| {
                let url = url.clone();
                std::thread::spawn(move || Pg::connect(&url, 2, "test").map(|_| ()))
            })
            .collect();
        for s in started {
            s.join().expect("join").expect("connect and migrate");
        }
        let pg = Pg::connect(&url, 2, "test").expect("again");
        let pg2 = pg.clone();
        let versions: Vec<i32> = pg
            .block(async move {
                let c = pg2.client().await?;
                let rows = c
                    .query(
                        "SELECT version FROM federation_schema ORDER BY version",
                        &[],
                    )
                    .await
                    .map_err(|e| pg2.db(&e))?;
                Ok(rows.iter().map(|r| r.get(0)).collect())
            })
            .expect("versions");
        let want: Vec<i32> = MIGRATIONS.iter().map(|m| m.0).collect();
        assert_eq!(versions, want);
    }

    #[test]
    fn a_newer_schema_is_refused_naming_both_versions() {
        let url = server().create_database("newer").expect("database");
        Pg::connect(&url, 2, "test").expect("first start migrates");
        let db = url.rsplit('/').next().expect("db name");
        server()
            .execute(
                db,
                "INSERT INTO federation_schema (version, applied_unix_ms) VALUES (999, 0)",
            )
            .expect("a newer version");
        let err = Pg::connect(&url, 2, "test").expect_err("refused");
        assert!(
            matches!(err, PgError::NewerSchema { found: 999, .. }),
            "{err}"
        );
        assert!(err.is_config());
        let msg = err.to_string();
        assert!(
            msg.contains("999") && msg.contains(&known_version().to_string()),
            "{msg}"
        );
    }

    #[test]
    fn configuration_errors_name_what_is_wrong() {
        let pg = server();
        // Wrong password.
        let url = format!(
            "postgres://{}:wrong@127.0.0.1:{}/postgres",
            pg_sandbox::USER,
            pg.port()
        );
        let err = Pg::connect(&url, 2, "test").expect_err("wrong password");
        assert!(matches!(err, PgError::Auth { .. }), "{err}");
        assert!(
            err.is_config() && err.to_string().contains("authentication failed"),
            "{err}"
        );
        // Missing database.
        let err = Pg::connect(&pg.url("no_such_db"), 2, "test").expect_err("missing");
        assert!(
            matches!(err, PgError::MissingDatabase { ref database, .. } if database == "no_such_db"),
            "{err}"
        );
        assert!(err.is_config());
        // Nothing listens on port 1.
        let err = Pg::connect("postgres://u:p@127.0.0.1:1/x", 2, "test").expect_err("unreachable");
        assert!(matches!(err, PgError::Unreachable { .. }), "{err}");
        assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
        // Not a URL.
        let err = Pg::connect("postgres://u@127.0.0.1:notaport/x", 2, "test").expect_err("bad url");
        assert!(matches!(err, PgError::Url(_)), "{err}");
    }

    /// A server offering TLS with a certificate of a development CA for
    /// `localhost` and 127.0.0.1; the CA and a foreign CA in PEM files.
    struct TlsDb {
        server: pg_sandbox::PgServer,
        ca: std::path::PathBuf,
        foreign_ca: std::path::PathBuf,
        _dir: tempfile::TempDir,
    }

    fn tls_server() -> &'static TlsDb {
        static SERVER: std::sync::OnceLock<TlsDb> = std::sync::OnceLock::new();
        SERVER.get_or_init(|| {
            use federation_tls::dev::{DevCa, Validity};
            let ca = DevCa::new("database").expect("ca");
            let leaf = ca
                .issue("db", &[], true, Validity::Normal)
                .expect("server certificate");
            let server =
                pg_sandbox::PgServer::start_tls(&leaf.cert_pem, &leaf.key_pem).expect("tls server");
            let dir = tempfile::tempdir().expect("dir");
            let ca_file = dir.path().join("ca.pem");
            std::fs::write(&ca_file, ca.ca_pem()).expect("ca file");
            let foreign_file = dir.path().join("foreign-ca.pem");
            let foreign = DevCa::new("elsewhere").expect("foreign ca");
            std::fs::write(&foreign_file, foreign.ca_pem()).expect("foreign ca file");
            TlsDb {
                server,
                ca: ca_file,
                foreign_ca: foreign_file,
                _dir: dir,
            }
        })
    }

    /// The URL of a fresh database on the TLS server, host `localhost`,
    /// with `query`, and the database's name.
    fn tls_url(stem: &str, query: &str) -> (String, String) {
        let url = tls_server().server.create_database(stem).expect("database");
        let db = url.rsplit('/').next().expect("db name").to_string();
        let url = format!(
            "postgres://{}:{}@localhost:{}/{db}?{query}",
            pg_sandbox::USER,
            pg_sandbox::PASSWORD,
            tls_server().server.port()
        );
        (url, db)
    }

    /// Whether this pool's connection is encrypted (the server's view).
    fn encrypted(pg: &Pg) -> bool {
        let pg2 = pg.clone();
        pg.block(async move {
            let c = pg2.client().await?;
            let row = c
                .query_one(
                    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                    &[],
                )
                .await
                .map_err(|e| pg2.db(&e))?;
            Ok(row.get::<_, bool>(0))
        })
        .expect("pg_stat_ssl")
    }

    #[test]
    fn verify_full_connects_encrypted_and_checks_the_host_name_verify_ca_only_the_chain() {
        let ca = tls_server().ca.display().to_string();
        let (url, db) = tls_url(
            "verify_full",
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        );
        let pg = Pg::connect(&url, 2, "test").expect("verify-full to localhost");
        assert!(encrypted(&pg), "the session is encrypted");
        // The same server under a name its certificate does not carry.
        let misnamed = |mode: &str| {
            format!(
                "host=wrong.example hostaddr=127.0.0.1 port={} user={} password={} dbname={db} sslmode={mode} sslrootcert={ca}",
                tls_server().server.port(),
                pg_sandbox::USER,
                pg_sandbox::PASSWORD
            )
        };
        let err = Pg::connect(&misnamed("verify-full"), 2, "test").expect_err("name checked");
        assert!(matches!(err, PgError::Tls { .. }), "{err}");
        assert!(err.is_config(), "{err}");
        assert!(
            err.to_string()
                .contains("does not name the host `wrong.example`"),
            "{err}"
        );
        let pg = Pg::connect(&misnamed("verify-ca"), 2, "test").expect("verify-ca: chain only");
        assert!(encrypted(&pg));
    }

    #[test]
    fn a_certificate_of_another_ca_is_a_configuration_error_naming_the_database_and_tls() {
        let foreign = tls_server().foreign_ca.display().to_string();
        for mode in ["verify-full", "verify-ca", "require"] {
            let (url, db) = tls_url("wrong_ca", &format!("sslmode={mode}&sslrootcert={foreign}"));
            let err = Pg::connect(&url, 2, "test").expect_err(mode);
            assert!(matches!(err, PgError::Tls { .. }), "{mode}: {err}");
            assert!(err.is_config());
            let msg = err.to_string();
            assert!(
                msg.contains(&db)
                    && msg.contains("TLS")
                    && msg.contains("not signed by a trusted CA")
                    && msg.contains("foreign-ca.pem"),
                "{mode}: {msg}"
            );
        }
    }

    #[test]
    fn require_and_prefer_encrypt_without_verifying_and_disable_does_not() {
        for (mode, want) in [("require", true), ("prefer", true), ("disable", false)] {
            let (url, _) = tls_url("modes", &format!("sslmode={mode}"));
            let pg = Pg::connect(&url, 2, "test").expect(mode);
            assert_eq!(encrypted(&pg), want, "sslmode={mode}");
        }
        // A server without TLS: prefer falls back, require refuses.
        let plain = server().create_database("plain").expect("database");
        let pg = Pg::connect(&format!("{plain}?sslmode=prefer"), 2, "test").expect("prefer");
        assert!(!encrypted(&pg));
        let err = Pg::connect(&format!("{plain}?sslmode=require"), 2, "test").expect_err("require");
        assert!(matches!(err, PgError::Tls { .. }), "{err}");
        assert!(err.to_string().contains("does not offer TLS"), "{err}");
    }

    /// The grants of README "Running a region highly available", for
    /// roles `{app}` (the controllers) and `{auditor}`.
    const GRANTS: &str = "\
        GRANT USAGE ON SCHEMA public TO {app}, {auditor};
        GRANT SELECT, INSERT, UPDATE, DELETE ON tasks, agents, store_meta, region_leaders, replicas TO {app};
        GRANT SELECT, INSERT, UPDATE ON decision_heads TO {app};
        GRANT SELECT, INSERT ON decisions TO {app};
        GRANT SELECT ON federation_schema TO {app};
        GRANT SELECT ON decisions, decision_heads, federation_schema TO {auditor};";

    #[test]
    fn the_owner_migrates_the_controllers_role_appends_only_and_the_auditor_only_reads() {
        use crate::tasks::TaskStore;
        let pg = server();
        let url = pg.create_database("roles").expect("database");
        let db = url.rsplit('/').next().expect("db name").to_string();
        let role = |what: &str| format!("{what}_{db}");
        let (owner, app, auditor) = (role("owner"), role("app"), role("auditor"));
        for r in [&owner, &app, &auditor] {
            pg.execute(
                "postgres",
                &format!("CREATE ROLE \"{r}\" LOGIN PASSWORD 'pw'"),
            )
            .expect("role");
        }
        pg.execute(
            "postgres",
            &format!("ALTER DATABASE \"{db}\" OWNER TO \"{owner}\""),
        )
        .expect("owner");
        let url_of = |r: &str| format!("postgres://{r}:pw@127.0.0.1:{}/{db}", pg.port());
        // The controllers' role may not create the schema: a clear
        // configuration error naming the way out.
        let err = Pg::connect(&url_of(&app), 2, "test").expect_err("no rights");
        assert!(
            matches!(err, PgError::MigrationRefused { found: 0, .. }),
            "{err}"
        );
        assert!(
            err.is_config() && err.to_string().contains("federation store migrate"),
            "{err}"
        );
        // The owner migrates; the grants; the controllers' role starts on it.
        Pg::connect(&url_of(&owner), 2, "test").expect("the owner migrates");
        pg.execute(
            &db,
            &GRANTS
                .replace("{app}", &format!("\"{app}\""))
                .replace("{auditor}", &format!("\"{auditor}\"")),
        )
        .expect("grants");
        let as_app = Pg::connect(&url_of(&app), 2, "test").expect("the controllers' role starts");
        let store = TaskStore::open_postgres(&as_app, "europe", Default::default()).expect("store");
        let log = crate::audit::DecisionLog::open_postgres(&as_app, "europe").expect("log");
        store
            .bind_journal(std::sync::Arc::new(log.clone()))
            .expect("journal");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(store.insert(federation_sandbox::fixtures::queued_task("t-1")))
            .expect("the controllers' role inserts");
        let entry = crate::audit::Entry {
            kind: "takeover".into(),
            task_id: Some("t-1".into()),
            ..Default::default()
        };
        log.append(entry).wait().expect("and appends a decision");
        // No UPDATE or DELETE of decisions for it (the grant, before the
        // trigger is reached).
        let run = |pg: &Pg, sql: &'static str| {
            let pg2 = pg.clone();
            pg.block(async move {
                let c = pg2.client().await?;
                c.batch_execute(sql).await.map_err(|e| pg2.db(&e))
            })
        };
        for sql in ["UPDATE decisions SET line = 'x'", "DELETE FROM decisions"] {
            let err = run(&as_app, sql).expect_err(sql);
            assert!(
                err.to_string().contains("permission denied"),
                "{sql}: {err}"
            );
        }
        // The auditor reads the chain and writes nothing.
        let as_auditor = Pg::connect_read_only(&url_of(&auditor), "test").expect("auditor");
        let db2 = as_auditor.clone();
        let lines = as_auditor
            .block(async move { crate::audit::postgres::export(&db2, "europe").await })
            .expect("export");
        assert!(!lines.is_empty());
        for sql in [
            "INSERT INTO decisions (region, seq, hash, line) VALUES ('europe', 99, 'h', '{}')",
            "SELECT count(*) FROM tasks",
        ] {
            let err = run(&as_auditor, sql).expect_err(sql);
            assert!(
                err.to_string().contains("permission denied"),
                "{sql}: {err}"
            );
        }
    }

    #[test]
    fn every_connection_commits_synchronously_whatever_the_database_default() {
        let url = server().create_database("sync").expect("database");
        let db = url.rsplit('/').next().expect("db name");
        server()
            .execute(
                "postgres",
                &format!("ALTER DATABASE \"{db}\" SET synchronous_commit = off"),
            )
            .expect("a lax default");
        let pg = Pg::connect(&url, 2, "test").expect("connect");
        let pg2 = pg.clone();
        let setting: String = pg
            .block(async move {
                let c = pg2.client().await?;
                let row = c
                    .query_one("SHOW synchronous_commit", &[])
                    .await
                    .map_err(|e| pg2.db(&e))?;
                Ok(row.get(0))
            })
            .expect("show");
        assert_eq!(setting, "on");
        // Nor whatever the URL's options say; they may plan otherwise.
        let lax =
            format!("{url}?options=-c%20synchronous_commit%3Doff%20-c%20plan_cache_mode%3Dauto");
        let pg = Pg::connect(&lax, 2, "test").expect("connect");
        let pg2 = pg.clone();
        let settings: (String, String) = pg
            .block(async move {
                let c = pg2.client().await?;
                let row = c
                    .query_one(
                        "SELECT current_setting('synchronous_commit'), current_setting('plan_cache_mode')",
                        &[],
                    )
                    .await
                    .map_err(|e| pg2.db(&e))?;
                Ok((row.get(0), row.get(1)))
            })
            .expect("settings");
        assert_eq!(settings, ("on".to_string(), "auto".to_string()));
    }

    #[test]
    fn the_decision_table_refuses_update_delete_and_truncate() {
        let url = server().create_database("append_only").expect("database");
        Pg::connect(&url, 2, "test").expect("migrate");
        let db = url.rsplit('/').next().expect("db name");
        server()
            .execute(
                db,
                "INSERT INTO decisions (region, seq, hash, line) VALUES ('europe', 1, 'h', '{}')",
            )
            .expect("insert is allowed");
        for sql in [
            "UPDATE decisions SET line = 'x'",
            "DELETE FROM decisions",
            "TRUNCATE decisions",
        ] {
            let err = server().execute(db, sql).expect_err(sql);
            assert!(format!("{err:#}").contains("append-only"), "{sql}: {err:#}");
        }
    }
}
