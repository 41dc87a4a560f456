//! The agent registry: which region agents are registered with this
//! controller, their slots, and when each last heartbeated. The region's
//! advertised capacity is the sum over live agents. Leases and tasks live in
//! [`crate::tasks`]; this module only knows agents.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One registered agent.
#[derive(Debug, Clone)]
pub struct Agent {
    /// Id given at registration.
    pub id: String,
    /// Name for logs.
    pub name: String,
    /// Slots.
    pub slots: u32,
    /// Free slots at the last heartbeat.
    pub free: u32,
    /// Last heartbeat (or registration).
    pub last_seen: Instant,
}

/// The registry.
#[derive(Debug, Default)]
pub struct AgentRegistry {
    agents: Mutex<HashMap<String, Agent>>,
}

impl AgentRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Agent>> {
        self.agents
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers an agent and returns its id.
    pub fn register(&self, name: &str, slots: u32, now: Instant) -> String {
        let id = format!("agent-{}", uuid::Uuid::new_v4());
        self.lock().insert(
            id.clone(),
            Agent {
                id: id.clone(),
                name: name.to_string(),
                slots,
                free: slots,
                last_seen: now,
            },
        );
        id
    }

    /// Records a heartbeat; false when the agent is unknown (it must
    /// register again, for example after a controller restart).
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

    /// True when the agent is registered.
    pub fn contains(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    /// The agent's slot count.
    pub fn slots(&self, id: &str) -> Option<u32> {
        self.lock().get(id).map(|a| a.slots)
    }

    /// Removes agents silent for longer than `timeout`; returns their ids.
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
        self.lock()
            .values()
            .fold((0, 0), |(t, f), a| (t + a.slots, f + a.free))
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

    #[test]
    fn capacity_sums_live_agents_and_reaps_silent_ones() {
        let r = AgentRegistry::default();
        let t0 = Instant::now();
        let a = r.register("a", 4, t0);
        let b = r.register("b", 2, t0);
        assert!(r.heartbeat(&a, Some(1), t0 + Duration::from_secs(5)));
        assert_eq!(r.capacity(), (6, 3));
        let gone = r.reap(Duration::from_secs(3), t0 + Duration::from_secs(6));
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].id, b);
        assert!(!r.heartbeat(&b, None, t0), "reaped agent must re-register");
        assert_eq!(r.capacity(), (4, 1));
    }
}
