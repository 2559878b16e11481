//! Holding the kernel state as found. The edge's autonomy rule "stale is
//! not invalid": nothing expires because the hub has been silent, and state
//! is removed only on explicit removal after a complete snapshot.
//!
//! An agent that starts without a usable state — its cache was corrupt,
//! torn or rolled back and moved aside, or it was lost — knows nothing it
//! could reconcile towards: an empty state would plan the removal of every
//! route, rule, link, tunnel peer and skip-NAT rule raven owns. Instead it
//! adopts what the kernel holds and changes nothing until a complete
//! snapshot (the hub's completion marker) has been persisted; then it
//! reconciles as usual. `/readyz`, the `raven_edge_holding_kernel_state`
//! gauge and the log say so, and `raven-edge plan` shows that nothing would
//! change.
//!
//! A cache that holds resources is used even when its last snapshot was
//! incomplete (deltas or a snapshot in progress on top of a complete one):
//! that is the last good state, and it only adds to it.

use std::fmt;

use crate::cache::CachedState;

/// Why an agent holds the kernel state as it found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldReason {
    /// The cache was unusable (corrupt, torn, rolled back, foreign or
    /// undecodable) and was moved aside.
    Unusable(String),
    /// The cache holds nothing: a new node, or a lost cache.
    Empty,
}

impl fmt::Display for HoldReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HoldReason::Unusable(why) => write!(f, "the topology cache is unusable ({why})"),
            HoldReason::Empty => write!(
                f,
                "the topology cache holds nothing (a new node, or the cache was lost)"
            ),
        }
    }
}

/// Whether an agent starting from `state` (with the cache found at open
/// unusable for `recovered`, if it was) must hold the kernel state. Pure.
pub fn at_start(state: &CachedState, recovered: Option<&str>) -> Option<HoldReason> {
    if state.complete || !state.resources.is_empty() {
        return None;
    }
    Some(match recovered {
        Some(why) => HoldReason::Unusable(why.to_owned()),
        None => HoldReason::Empty,
    })
}

/// Whether a hold ends with `state`: only a complete snapshot ends it.
pub fn ends_with(state: &CachedState) -> bool {
    state.complete
}

#[cfg(test)]
mod tests {
    use super::*;
    use raven_model::fixtures;
    use raven_model::{Resource, ResourceBody, ResourceName};

    fn with_one_resource(complete: bool) -> CachedState {
        let view = fixtures::node_view("n0", None);
        let name = ResourceName::node(&view.name);
        CachedState {
            epoch: "e".into(),
            revision: 3,
            complete,
            resources: [(name, Resource::new(ResourceBody::Node(view)))].into(),
        }
    }

    #[test]
    fn an_unusable_or_empty_cache_holds_and_a_usable_one_does_not() {
        let empty = CachedState::default();
        assert_eq!(
            at_start(&empty, Some("checksum mismatch")),
            Some(HoldReason::Unusable("checksum mismatch".into()))
        );
        assert_eq!(at_start(&empty, None), Some(HoldReason::Empty));
        assert_eq!(at_start(&with_one_resource(true), None), None);
        // Deltas or a snapshot in progress on top of the last good state.
        assert_eq!(at_start(&with_one_resource(false), None), None);
    }

    #[test]
    fn only_a_complete_snapshot_ends_a_hold() {
        assert!(!ends_with(&CachedState::default()));
        assert!(!ends_with(&with_one_resource(false)));
        assert!(ends_with(&with_one_resource(true)));
    }
}
