//! The agent registry: which region agents are registered with this
//! controller, the identity each belongs to, their slots, and when each last
//! heartbeated. The region's advertised capacity is the sum over live agents.
//! Registrations are also kept durably by [`crate::tasks`] (so an agent keeps
//! its id and leases across a controller restart); this module is their
//! in-memory view and knows nothing of tasks or leases.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::tasks::AgentRecord;

/// The prefix of every agent id.
const ID_PREFIX: &str = "agent-";

/// One registered agent.
#[derive(Debug, Clone)]
pub struct Agent {
    /// Id given at registration.
    pub id: String,
    /// The identity that registered it (empty without TLS).
    pub owner: String,
    /// Name for logs.
    pub name: String,
    /// Slots.
    pub slots: u32,
    /// Free slots at the last heartbeat.
    pub free: u32,
    /// Last heartbeat (or registration, or the controller's start).
    pub last_seen: Instant,
}

/// The id a registration is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assigned {
    /// The id.
    pub id: String,
    /// True when it is the id the agent asked to keep.
    pub resumed: bool,
}

/// The registry.
#[derive(Debug, Default)]
pub struct AgentRegistry {
    agents: Mutex<HashMap<String, Agent>>,
}

/// True for ids this registry hands out: `agent-` and a UUID.
pub fn well_formed(id: &str) -> bool {
    id.strip_prefix(ID_PREFIX)
        .is_some_and(|u| u.len() == 36 && uuid::Uuid::parse_str(u).is_ok())
}

impl AgentRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Agent>> {
        self.agents
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A registry holding the stored registrations, each counted as seen at
    /// `now` (it gets the agent timeout to heartbeat again).
    pub fn load(records: Vec<AgentRecord>, now: Instant) -> Self {
        let registry = Self::default();
        for r in records {
            registry.insert(&r, now);
        }
        registry
    }

    /// The id for a registration by `owner` that asks to keep `resume`:
    /// `resume` itself when it is well formed and not registered to another
    /// identity, else a new id.
    pub fn assign(&self, resume: &str, owner: &str) -> Assigned {
        if well_formed(resume) {
            let taken = self.lock().get(resume).is_some_and(|a| a.owner != owner);
            if !taken {
                return Assigned {
                    id: resume.to_string(),
                    resumed: true,
                };
            }
        }
        Assigned {
            id: format!("{ID_PREFIX}{}", uuid::Uuid::new_v4()),
            resumed: false,
        }
    }

    /// Adds (or replaces) a registration, seen at `now`.
    pub fn insert(&self, record: &AgentRecord, now: Instant) {
        self.lock().insert(
            record.id.clone(),
            Agent {
                id: record.id.clone(),
                owner: record.owner.clone(),
                name: record.name.clone(),
                slots: record.slots,
                free: record.slots,
                last_seen: now,
            },
        );
    }

    /// Records a heartbeat; false when the agent is unknown (it must
    /// register again).
    pub fn heartbeat(&self, id: &str, free: Option<u32>, now: Instant) -> bool {
        match self.lock().get_mut(id) {
            Some(a) => {
                if let Some(free) = free {
                    a.free = free.min(a.slots);
                }
                a.last_seen = now;
                true
            }
            None => false,
        }
    }

    /// True when the agent is registered to `owner`.
    pub fn is_owned_by(&self, id: &str, owner: &str) -> bool {
        self.lock().get(id).is_some_and(|a| a.owner == owner)
    }

    /// True when the agent is registered.
    pub fn contains(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    /// The agent's slot count.
    pub fn slots(&self, id: &str) -> Option<u32> {
        self.lock().get(id).map(|a| a.slots)
    }

    /// Removes agents silent for longer than `timeout`; returns them.
    pub fn reap(&self, timeout: Duration, now: Instant) -> Vec<Agent> {
        let mut agents = self.lock();
        let dead: Vec<String> = agents
            .values()
            .filter(|a| now.saturating_duration_since(a.last_seen) > timeout)
            .map(|a| a.id.clone())
            .collect();
        dead.iter().filter_map(|id| agents.remove(id)).collect()
    }

    /// (total slots, free slots) over registered agents.
    pub fn capacity(&self) -> (u32, u32) {
        self.lock().values().fold((0, 0), |(t, f), a| {
            (t.saturating_add(a.slots), f.saturating_add(a.free))
        })
    }

    /// How many agents heartbeated (or leased) within `window` of `now`.
    pub fn heard_within(&self, window: Duration, now: Instant) -> u32 {
        let n = self
            .lock()
            .values()
            .filter(|a| now.saturating_duration_since(a.last_seen) <= window)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Number of registered agents.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no agent is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(r: &AgentRegistry, owner: &str, slots: u32, now: Instant) -> String {
        let id = r.assign("", owner).id;
        r.insert(
            &AgentRecord {
                id: id.clone(),
                owner: owner.into(),
                name: "n".into(),
                slots,
                registered_unix_ms: 0,
            },
            now,
        );
        id
    }

    #[test]
    fn capacity_sums_live_agents_and_reaps_silent_ones() {
        let r = AgentRegistry::default();
        let t0 = Instant::now();
        let a = record(&r, "", 4, t0);
        let b = record(&r, "", 2, t0);
        assert!(r.heartbeat(&a, Some(1), t0 + Duration::from_secs(5)));
        assert_eq!(r.capacity(), (6, 3));
        let gone = r.reap(Duration::from_secs(3), t0 + Duration::from_secs(6));
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].id, b);
        assert!(!r.heartbeat(&b, None, t0), "reaped agent must re-register");
        assert_eq!(r.capacity(), (4, 1));
    }

    #[test]
    fn agents_heard_lately_are_counted() {
        let r = AgentRegistry::default();
        let t0 = Instant::now();
        let a = record(&r, "", 1, t0);
        let _b = record(&r, "", 1, t0);
        assert!(r.heartbeat(&a, None, t0 + Duration::from_secs(3)));
        let window = Duration::from_secs(2);
        assert_eq!(r.heard_within(window, t0 + Duration::from_secs(1)), 2);
        assert_eq!(r.heard_within(window, t0 + Duration::from_secs(4)), 1);
        assert_eq!(r.heard_within(window, t0 + Duration::from_secs(6)), 0);
    }

    #[test]
    fn an_agent_keeps_its_id_unless_another_identity_holds_it() {
        let r = AgentRegistry::default();
        let t0 = Instant::now();
        let a = record(&r, "agent europe/one", 1, t0);
        assert!(well_formed(&a), "{a}");
        let same = r.assign(&a, "agent europe/one");
        assert_eq!((same.id.as_str(), same.resumed), (a.as_str(), true));
        let other = r.assign(&a, "agent europe/two");
        assert!(!other.resumed);
        assert_ne!(other.id, a);
        assert!(r.is_owned_by(&a, "agent europe/one"));
        assert!(!r.is_owned_by(&a, "agent europe/two"));
        // An id the registry does not know (forgotten, or a store from before
        // registrations were kept) is kept too; a made-up one is not.
        let unknown = format!("agent-{}", uuid::Uuid::new_v4());
        assert!(r.assign(&unknown, "x").resumed);
        for bad in ["", "agent-", "agent-123", "task-1", "agent-../../etc"] {
            assert!(!r.assign(bad, "x").resumed, "{bad}");
        }
    }
}
