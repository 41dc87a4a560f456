//! Test fixtures that exist once: the user's policy and its requires-GDPR
//! variant (both the files under `policies/`), and task attributes.

use federation_api as api;

/// The user's example, unchanged (`policies/seed-federation.yaml`).
pub const SEED_POLICY: &str = include_str!("../../policies/seed-federation.yaml");

/// The user's example with `requires: [GDPR]` on the EU rule
/// (`policies/seed-requires-gdpr.yaml`): the failover to north_america is
/// refused.
pub const SEED_REQUIRES_GDPR: &str = include_str!("../../policies/seed-requires-gdpr.yaml");

/// Submit attributes helper: `[("customer_region", "DE")]` as string attributes.
pub fn string_attrs(
    pairs: &[(&str, &str)],
) -> std::collections::HashMap<String, api::AttributeValue> {
    pairs
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                api::AttributeValue {
                    kind: Some(api::attribute_value::Kind::StringValue(v.to_string())),
                },
            )
        })
        .collect()
}

/// A task as a store holds it on arrival: id `id`, owned by europe,
/// payload `echo`, nothing else set (the task-store tests' fixture).
pub fn queued_task(id: &str) -> api::Task {
    api::Task {
        task_id: id.to_string(),
        payload: b"echo".to_vec(),
        owner_region: "europe".into(),
        ..api::Task::default()
    }
}
