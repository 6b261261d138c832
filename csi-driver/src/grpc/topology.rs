//! Topology: every livedisk volume lives on exactly one node, named by one segment.

use std::collections::HashMap;

use livedisk_csi_proto::csi::v1::{Topology, TopologyRequirement};

pub use livedisk_common::TOPOLOGY_NODE_KEY as NODE_KEY;

/// The accessible topology of a volume on `node`.
pub fn of_node(node: &str) -> Topology {
    Topology {
        segments: HashMap::from([(NODE_KEY.to_string(), node.to_string())]),
    }
}

/// Pure: where a volume held by `owner` can be used. A volume shared by several nodes
/// (MULTI_NODE_MULTI_WRITER block, attached remotely on all but its owner) is accessible from
/// every registered node, its owner first; any other from its owner only, so that its consumer
/// runs where its engine is.
pub fn accessible(owner: &str, registered: &[String], shared: bool) -> Vec<Topology> {
    let mut nodes = vec![owner];
    if shared {
        nodes.extend(
            registered
                .iter()
                .map(String::as_str)
                .filter(|n| *n != owner),
        );
    }
    nodes.into_iter().map(of_node).collect()
}

/// Chooses the node for a new volume: the first preferred topology that names a known node,
/// then the first requisite one; without requirements, the known node with the fewest volumes.
/// `None` when the requirements name no known node.
pub fn choose_node(
    requirement: Option<&TopologyRequirement>,
    known_nodes: &[String],
    volumes_per_node: &HashMap<String, usize>,
) -> Option<String> {
    let named = |topologies: &[Topology]| {
        topologies
            .iter()
            .filter_map(|t| t.segments.get(NODE_KEY))
            .find(|node| known_nodes.contains(node))
            .cloned()
    };
    match requirement {
        Some(requirement)
            if !requirement.preferred.is_empty() || !requirement.requisite.is_empty() =>
        {
            named(&requirement.preferred).or_else(|| named(&requirement.requisite))
        }
        _ => known_nodes
            .iter()
            .min_by_key(|node| {
                (
                    volumes_per_node.get(*node).copied().unwrap_or(0),
                    (*node).clone(),
                )
            })
            .cloned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes() -> Vec<String> {
        vec!["node-a".into(), "node-b".into()]
    }

    #[test]
    fn preferred_wins_over_requisite() {
        let requirement = TopologyRequirement {
            requisite: vec![of_node("node-a"), of_node("node-b")],
            preferred: vec![of_node("node-b")],
        };
        assert_eq!(
            choose_node(Some(&requirement), &nodes(), &HashMap::new()).as_deref(),
            Some("node-b")
        );
    }

    #[test]
    fn unknown_nodes_are_skipped_and_none_means_none() {
        let requirement = TopologyRequirement {
            requisite: vec![of_node("node-z")],
            preferred: vec![],
        };
        assert_eq!(
            choose_node(Some(&requirement), &nodes(), &HashMap::new()),
            None
        );
    }

    #[test]
    fn without_requirements_the_emptiest_node_is_chosen() {
        let counts = HashMap::from([("node-a".to_string(), 3), ("node-b".to_string(), 1)]);
        assert_eq!(
            choose_node(None, &nodes(), &counts).as_deref(),
            Some("node-b")
        );
        assert_eq!(choose_node(None, &[], &counts), None);
    }

    #[test]
    fn shared_volumes_are_accessible_from_every_node_owner_first() {
        let registered = vec!["node-a".to_string(), "node-b".to_string()];
        assert_eq!(
            accessible("node-b", &registered, false),
            vec![of_node("node-b")]
        );
        assert_eq!(
            accessible("node-b", &registered, true),
            vec![of_node("node-b"), of_node("node-a")]
        );
    }
}
