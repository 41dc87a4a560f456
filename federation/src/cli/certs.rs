//! `federation certs init`: a development CA and every certificate a local
//! federation needs (regions with their attested tags, one agent per region,
//! a client, an operator and an auditor), with rcgen. Thin: parse, call
//! [`federation_tls::dev::init`], print.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

/// `certs` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum CertsCommand {
    /// Create a development CA and certificates in a folder.
    Init(InitArgs),
}

/// Arguments of `certs init`.
#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Output folder (created).
    #[arg(long)]
    pub out: PathBuf,
    /// Regions, comma-separated (default: the `--config` file's regions).
    #[arg(long, value_delimiter = ',')]
    pub regions: Vec<String>,
    /// Tags a region's certificate attests: `europe=GDPR+SOX` (repeatable;
    /// default: the tags the `--config` file grants).
    #[arg(long = "tags", value_parser = parse_tags)]
    pub tags: Vec<(String, Vec<String>)>,
    /// The federation's name (default: the `--config` file's, else `federation`).
    #[arg(long)]
    pub federation: Option<String>,
    /// A federation file for default regions, tags and name.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Replace a CA already in `--out`. Every certificate it issued stops
    /// working: running controllers keep trusting the old CA and refuse
    /// clients and peers with certificates of the new one.
    #[arg(long)]
    pub force: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub format: super::OutputFormat,
}

fn parse_tags(s: &str) -> Result<(String, Vec<String>), String> {
    let (region, tags) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected REGION=TAG+TAG"))?;
    Ok((
        region.to_string(),
        tags.split('+')
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .collect(),
    ))
}

/// Runs a `certs` command.
pub fn run(cmd: CertsCommand) -> ExitCode {
    match cmd {
        CertsCommand::Init(args) => match init(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => super::fail(&e, 1),
        },
    }
}

fn init(args: &InitArgs) -> anyhow::Result<()> {
    let existing: Vec<PathBuf> = ["ca.pem", "ca.key"]
        .iter()
        .map(|f| args.out.join(f))
        .filter(|p| p.exists())
        .collect();
    if !existing.is_empty() && !args.force {
        anyhow::bail!(
            "{} already holds a CA ({}): refusing to replace it, since controllers that trust it \
             would refuse every certificate of a new one; pass --force to replace it anyway, or \
             choose another --out",
            args.out.display(),
            existing
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let policy = match &args.config {
        Some(path) => Some(crate::policy::Policy::load_file(path)?),
        None => None,
    };
    let federation = args
        .federation
        .clone()
        .or_else(|| policy.as_ref().map(|p| p.federation.clone()))
        .unwrap_or_else(|| "federation".to_string());
    let mut regions: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let names: Vec<String> = if args.regions.is_empty() {
        policy
            .as_ref()
            .map(|p| p.regions.iter().map(|r| r.name.clone()).collect())
            .unwrap_or_default()
    } else {
        args.regions.clone()
    };
    if names.is_empty() {
        anyhow::bail!("no regions: pass --regions a,b,c or --config FILE");
    }
    for name in names {
        let tags = policy
            .as_ref()
            .and_then(|p| p.region(&name))
            .map(|r| r.tags.iter().cloned().collect())
            .unwrap_or_default();
        regions.insert(name, tags);
    }
    for (region, tags) in &args.tags {
        let slot = regions
            .get_mut(region)
            .with_context(|| format!("--tags {region}=…: `{region}` is not among the regions"))?;
        *slot = tags.clone();
    }
    let list: Vec<(String, Vec<String>)> = regions.into_iter().collect();
    let layout = federation_tls::dev::init(&args.out, &federation, &list)?;
    let fed = federation_tls::identity::slug(&federation);
    // (file stem, identity, attested tags) of every certificate written.
    let mut issued: Vec<(String, String, Vec<String>)> = Vec::new();
    for (region, tags) in &list {
        issued.push((
            format!("region-{region}"),
            federation_tls::identity::region_uri(&fed, region),
            tags.clone(),
        ));
        issued.push((
            format!("agent-{region}"),
            federation_tls::identity::agent_uri(&fed, region, &format!("{region}-agent")),
            Vec::new(),
        ));
    }
    for role in ["client", "operator", "auditor"] {
        issued.push((
            role.to_string(),
            format!("spiffe://{fed}/{role}/{role}"),
            Vec::new(),
        ));
    }
    if args.format == super::OutputFormat::Json {
        let certificates: Vec<serde_json::Value> = issued
            .iter()
            .map(|(stem, id, tags)| {
                serde_json::json!({
                    "cert": layout.dir.join(format!("{stem}.pem")),
                    "key": layout.dir.join(format!("{stem}.key")),
                    "identity": id,
                    "attested_tags": tags,
                })
            })
            .collect();
        super::output::say!(
            "{}",
            serde_json::json!({
                "dir": layout.dir, "federation": federation, "ca": layout.ca(),
                "certificates": certificates,
            })
        );
        return Ok(());
    }
    super::output::say!(
        "development CA and certificates in {}",
        layout.dir.display()
    );
    super::output::say!("  ca.pem (ca.key: keep it private)");
    for (stem, id, tags) in &issued {
        super::output::say!(
            "  {stem}.pem  {id}{}",
            if tags.is_empty() {
                String::new()
            } else {
                format!("  attests {}", tags.join(", "))
            }
        );
    }
    Ok(())
}
