//! What a sandbox needs to know of the federation file it is given: the
//! federation's name (its CA's) and each region with its compliance tags.
//! The controllers validate the file themselves; this reads only those
//! fields, so the sandbox needs nothing of the `federation` library.

use anyhow::{Context as _, bail};
use yaml_rust2::{Yaml, YamlLoader};

/// The federation's name and its regions, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// `federation.name`.
    pub name: String,
    /// `federation.regions[]`: name and `compliance` tags (sorted, once each).
    pub regions: Vec<(String, Vec<String>)>,
}

impl Topology {
    /// Reads the federation file's text (YAML).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let docs = YamlLoader::load_from_str(text).context("the sandbox policy is not YAML")?;
        let fed = docs
            .first()
            .map(|d| &d["federation"])
            .filter(|f| !f.is_badvalue())
            .context("the sandbox policy has no `federation` section")?;
        let name = fed["name"]
            .as_str()
            .context("the sandbox policy has no `federation.name`")?
            .to_string();
        let Some(list) = fed["regions"].as_vec() else {
            bail!("the sandbox policy has no `federation.regions` list");
        };
        let mut regions = Vec::new();
        for (i, r) in list.iter().enumerate() {
            let region = r["name"]
                .as_str()
                .with_context(|| format!("federation.regions[{i}] has no name"))?;
            let tags = match &r["compliance"] {
                Yaml::BadValue | Yaml::Null => Vec::new(),
                Yaml::Array(tags) => tags
                    .iter()
                    .map(|t| {
                        t.as_str().map(str::to_string).with_context(|| {
                            format!("federation.regions[{i}].compliance: not a list of strings")
                        })
                    })
                    .collect::<anyhow::Result<_>>()?,
                _ => bail!("federation.regions[{i}].compliance: not a list"),
            };
            let mut tags: Vec<String> = tags;
            tags.sort();
            tags.dedup();
            regions.push((region.to_string(), tags));
        }
        Ok(Self { name, regions })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_seed_regions_and_tags() {
        let t = Topology::parse(crate::fixtures::SEED_POLICY).expect("seed");
        assert_eq!(t.name, "Global Enterprise Federation");
        assert_eq!(
            t.regions,
            vec![
                ("north_america".into(), vec!["HIPAA".into(), "SOX".into()]),
                ("europe".into(), vec!["GDPR".into(), "SOX".into()]),
                ("asia_pacific".into(), vec!["PDPA".into()]),
            ]
        );
    }

    #[test]
    fn a_file_without_regions_is_an_error_that_says_so() {
        let e = Topology::parse("federation:\n  name: x\n").expect_err("no regions");
        assert!(format!("{e:#}").contains("federation.regions"), "{e:#}");
        let e = Topology::parse("federation:\n  name: x\n  regions:\n    - endpoint: y\n")
            .expect_err("no name");
        assert!(format!("{e:#}").contains("regions[0] has no name"), "{e:#}");
    }
}
