//! `federation snapshot inspect FILE --keys KEYRING`: decrypts a stored
//! snapshot (`<data_dir>/snapshots/<source>.snap`) and summarises it for
//! operators and auditors: source, epoch, sequence, key id, residency scope
//! and task counts by rule. Read-only. Exit 0 when it decrypts, 1 when it
//! does not (wrong key, tampered), 2 when a file cannot be read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use federation_api as api;
use serde::Serialize;

use super::OutputFormat;
use crate::replication::envelope::{self, Limits};
use crate::replication::{BodyFormat, KeyRing, SnapshotBody, columnar, receiver};

/// Snapshot subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum SnapshotCommand {
    /// Decrypt and summarise a stored snapshot.
    Inspect {
        /// The snapshot file.
        file: PathBuf,
        /// The key ring file (`id:base64` lines).
        #[arg(long)]
        keys: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        format: OutputFormat,
    },
}

/// What `inspect` reports.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// The region whose state it is.
    pub source: String,
    /// Its epoch.
    pub epoch: u64,
    /// Sequence.
    pub sequence: u64,
    /// Key id that sealed it.
    pub key_id: String,
    /// `zstd` or `none`.
    pub compression: String,
    /// The body's format (1: prost, 2: columnar).
    pub body_format: u32,
    /// Chunks.
    pub chunks: u32,
    /// Plaintext bytes.
    pub plaintext_bytes: u64,
    /// Residency scope (rule indexes, 0-based).
    pub rule_indexes: Vec<u32>,
    /// The source's policy hash.
    pub policy_hash: String,
    /// Pending tasks.
    pub tasks: usize,
    /// Pending tasks by rule (numbered from 1) and state.
    pub tasks_by_rule: BTreeMap<String, BTreeMap<String, usize>>,
    /// Recent results.
    pub results: usize,
    /// Task ids (pending).
    pub task_ids: Vec<String>,
}

/// Summarises a decrypted snapshot.
pub fn summarize(
    header: &api::SnapshotHeader,
    body: &SnapshotBody,
    body_format: BodyFormat,
) -> Summary {
    let mut by_rule: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for t in &body.tasks {
        *by_rule
            .entry(format!("rule {}", t.rule_index + 1))
            .or_default()
            .entry(crate::tasks::state_name(t.state()))
            .or_default() += 1;
    }
    Summary {
        source: header.source_region.clone(),
        epoch: header.epoch,
        sequence: header.sequence,
        key_id: header.key_id.clone(),
        compression: header.compression.clone(),
        body_format: body_format.number(),
        chunks: header.chunk_count,
        plaintext_bytes: header.plaintext_bytes,
        rule_indexes: header.rule_indexes.clone(),
        policy_hash: header.policy_hash.clone(),
        tasks: body.tasks.len(),
        tasks_by_rule: by_rule,
        results: body.results.len(),
        task_ids: body.tasks.iter().map(|t| t.task_id.clone()).collect(),
    }
}

/// Reads, decrypts and decodes a stored snapshot. The error carries the
/// exit code: 2 when a file cannot be read, 1 when the snapshot does not
/// decrypt or decode.
pub fn open_file(
    file: &Path,
    keys: &Path,
) -> Result<(api::SnapshotHeader, SnapshotBody), (u8, anyhow::Error)> {
    open_file_as(file, keys).map(|(h, b, _)| (h, b))
}

/// [`open_file`], and the body's format.
fn open_file_as(
    file: &Path,
    keys: &Path,
) -> Result<(api::SnapshotHeader, SnapshotBody, BodyFormat), (u8, anyhow::Error)> {
    let ring = KeyRing::load_file(keys).map_err(|e| (2, anyhow::Error::new(e)))?;
    let chunks = receiver::read_file(file).map_err(|e| (2, anyhow::anyhow!(e)))?;
    let (header, plain) = envelope::open(&chunks, &ring, &Limits::default()).map_err(|e| {
        (
            1,
            anyhow::anyhow!("{}: cannot decrypt: {e}", file.display()),
        )
    })?;
    let body = columnar::decode_any(&plain)
        .map_err(|e| (1, anyhow::anyhow!("{}: body: {e}", file.display())))?;
    Ok((header, body, columnar::format_of(&plain)))
}

/// Runs a snapshot subcommand.
pub fn run(cmd: SnapshotCommand) -> ExitCode {
    let SnapshotCommand::Inspect { file, keys, format } = cmd;
    let (header, body, body_format) = match open_file_as(&file, &keys) {
        Ok(v) => v,
        Err((code, e)) => return super::fail(&e, code),
    };
    let s = summarize(&header, &body, body_format);
    match format {
        OutputFormat::Json => match serde_json::to_string_pretty(&s) {
            Ok(text) => super::output::say!("{text}"),
            Err(e) => return super::fail(&anyhow::Error::new(e), 2),
        },
        OutputFormat::Text => {
            super::output::say!("snapshot {}", file.display());
            super::output::say!("  source       {}", s.source);
            super::output::say!("  epoch        {}", s.epoch);
            super::output::say!("  sequence     {}", s.sequence);
            super::output::say!("  key id       {}", s.key_id);
            super::output::say!(
                "  compression  {} ({} chunks, {} plaintext bytes, body format {})",
                s.compression,
                s.chunks,
                s.plaintext_bytes,
                s.body_format
            );
            super::output::say!(
                "  scope        rules {:?}",
                s.rule_indexes.iter().map(|r| r + 1).collect::<Vec<_>>()
            );
            super::output::say!("  policy hash  {}", s.policy_hash);
            super::output::say!(
                "  tasks        {} pending, {} recent results",
                s.tasks,
                s.results
            );
            for (rule, states) in &s.tasks_by_rule {
                let parts: Vec<String> = states.iter().map(|(k, v)| format!("{v} {k}")).collect();
                super::output::say!("    {rule}: {}", parts.join(", "));
            }
        }
    }
    ExitCode::SUCCESS
}
