//! One take of a group snapshot at a time on this node.
//!
//! The members of a group are separate objects, reconciled side by side. The first member's
//! reconcile takes the whole group in one engine transaction; a second member reconciled at the
//! same moment would start its own transaction on volumes the first one holds, which the engine
//! refuses ("another operation is in progress"), and that member would be retried seconds later
//! (seen: a guest kept frozen 6 s instead of under one). With a turn per group, the second member
//! waits for the first's transaction and then finds its snapshot taken.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

type Turns = Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>;

#[derive(Clone, Default)]
pub struct GroupTurns {
    turns: Turns,
}

/// This reconcile's turn at a group; the next one waiting gets it when this is dropped.
pub struct GroupTurn {
    guard: Option<OwnedMutexGuard<()>>,
    turns: Turns,
    group: String,
}

impl GroupTurns {
    /// Waits until no other reconcile of this node holds `group`, then holds it.
    pub async fn turn(&self, group: &str) -> GroupTurn {
        let lock = {
            let mut turns = self.turns.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(turns.entry(group.to_string()).or_default())
        };
        GroupTurn {
            guard: Some(lock.lock_owned().await),
            turns: Arc::clone(&self.turns),
            group: group.to_string(),
        }
    }

    #[cfg(test)]
    fn groups(&self) -> usize {
        self.turns.lock().map(|t| t.len()).unwrap_or_default()
    }
}

impl Drop for GroupTurn {
    fn drop(&mut self) {
        let Some(guard) = self.guard.take() else {
            return;
        };
        let lock = Arc::clone(OwnedMutexGuard::mutex(&guard));
        drop(guard);
        // Forgotten once nobody holds or waits for it: the map and `lock` are the only owners
        // (a waiter clones it under the map's lock, which is held here).
        let mut turns = self.turns.lock().unwrap_or_else(|p| p.into_inner());
        if Arc::strong_count(&lock) == 2 {
            turns.remove(&self.group);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn members_of_one_group_take_turns_and_other_groups_do_not_wait() {
        let turns = GroupTurns::default();
        let inside = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (turns, inside, most) = (turns.clone(), inside.clone(), most.clone());
            tasks.push(tokio::spawn(async move {
                let _turn = turns.turn("g1").await;
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        // Another group's turn is given while g1's members queue.
        let other = tokio::time::timeout(Duration::from_millis(50), turns.turn("g2")).await;
        assert!(other.is_ok(), "another group waited for g1");
        drop(other);
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(
            most.load(Ordering::SeqCst),
            1,
            "two members of g1 overlapped"
        );
        assert_eq!(
            turns.groups(),
            0,
            "turns are forgotten once nobody holds them"
        );
    }
}
