//! At most one call per volume (or name) at a time: a second concurrent call gets ABORTED, as the
//! CSI spec asks, and the caller's sidecar retries it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use super::error::CsiError;

#[derive(Clone, Default)]
pub struct InFlight {
    keys: Arc<Mutex<HashSet<String>>>,
}

/// Held for the duration of a call; releases its key when dropped, however the call ends.
pub struct Guard {
    keys: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl InFlight {
    pub fn begin(&self, key: &str) -> Result<Guard, CsiError> {
        let mut keys = self
            .keys
            .lock()
            .map_err(|_| CsiError::Internal("in-flight set poisoned".into()))?;
        if !keys.insert(key.to_string()) {
            return Err(CsiError::Aborted(key.to_string()));
        }
        Ok(Guard {
            keys: self.keys.clone(),
            key: key.to_string(),
        })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(mut keys) = self.keys.lock() {
            keys.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_call_is_aborted_until_the_first_ends() {
        let in_flight = InFlight::default();
        let first = in_flight.begin("vol-a").unwrap();
        assert!(matches!(
            in_flight.begin("vol-a"),
            Err(CsiError::Aborted(_))
        ));
        assert!(in_flight.begin("vol-b").is_ok());
        drop(first);
        assert!(in_flight.begin("vol-a").is_ok());
    }
}
