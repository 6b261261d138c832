//! Strict opaque identifiers.
//!
//! Volume and snapshot IDs travel through CSI, CRs and the admin CLI and end
//! up as directory names in a pool. They are validated against one exact
//! shape (`vol-` / `snap-` followed by a lowercase hyphenated UUID), so no ID
//! can ever contain a path separator, `..`, or encode a node name.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The regular expression of a volume ID, as a literal usable in `concat!` (CEL rules and
/// OpenAPI patterns are built from it). [`VolumeId::parse`] accepts exactly what it matches.
#[macro_export]
macro_rules! volume_id_regex {
    () => {
        "^vol-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
    };
}

/// The regular expression of a snapshot ID (see [`volume_id_regex`]).
#[macro_export]
macro_rules! snapshot_id_regex {
    () => {
        "^snap-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
    };
}

/// The regular expression of a group snapshot ID (see [`volume_id_regex`]).
#[macro_export]
macro_rules! group_snapshot_id_regex {
    () => {
        "^gsnap-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
    };
}

/// Volume IDs: `vol-` and a lowercase hyphenated UUID. Never a node, never a path.
pub const VOLUME_ID_PATTERN: &str = volume_id_regex!();
/// Snapshot IDs: `snap-` and a lowercase hyphenated UUID.
pub const SNAPSHOT_ID_PATTERN: &str = snapshot_id_regex!();
/// Group snapshot IDs: `gsnap-` and a lowercase hyphenated UUID.
pub const GROUP_SNAPSHOT_ID_PATTERN: &str = group_snapshot_id_regex!();

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} id {shown:?}: expected {kind_prefix}<lowercase uuid>")]
pub struct IdError {
    kind: &'static str,
    kind_prefix: &'static str,
    /// Truncated so a hostile multi-megabyte "id" cannot bloat logs.
    shown: String,
}

/// Checks `s` is `prefix` + 36 chars of lowercase hyphenated UUID: the patterns above, without a
/// regex engine on every call (a test holds the two to the same answers).
fn valid(prefix: &str, s: &str) -> bool {
    let Some(rest) = s.strip_prefix(prefix) else {
        return false;
    };
    let b = rest.as_bytes();
    if b.len() != 36 {
        return false;
    }
    b.iter().enumerate().all(|(i, c)| match i {
        8 | 13 | 18 | 23 => *c == b'-',
        _ => c.is_ascii_digit() || (b'a'..=b'f').contains(c),
    })
}

macro_rules! strict_id {
    ($name:ident, $prefix:literal, $kind:literal) => {
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            /// A fresh random ID.
            pub fn generate() -> Self {
                Self(format!("{}{}", $prefix, uuid::Uuid::new_v4().hyphenated()))
            }

            pub fn parse(s: &str) -> Result<Self, IdError> {
                if valid($prefix, s) {
                    Ok(Self(s.to_owned()))
                } else {
                    Err(IdError {
                        kind: $kind,
                        kind_prefix: $prefix,
                        shown: s.chars().take(64).collect(),
                    })
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The 32 hex digits of the UUID, used to derive short QEMU names.
            pub fn hex(&self) -> String {
                self.0[$prefix.len()..].replace('-', "")
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        // Deserialisation validates too: a tampered record cannot smuggle a path in.
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

strict_id!(VolumeId, "vol-", "volume");
strict_id!(SnapshotId, "snap-", "snapshot");
strict_id!(GroupSnapshotId, "gsnap-", "group snapshot");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_round_trip() {
        let v = VolumeId::generate();
        assert_eq!(VolumeId::parse(v.as_str()).unwrap(), v);
        let s = SnapshotId::generate();
        assert_eq!(s.as_str().parse::<SnapshotId>().unwrap(), s);
        assert_eq!(v.hex().len(), 32);
    }

    #[test]
    fn rejects_everything_else() {
        let good = "vol-0f8e2a3c-1d2b-4c5d-8e9f-0a1b2c3d4e5f";
        assert!(VolumeId::parse(good).is_ok());
        for bad in [
            "",
            "vol-",
            "../x",
            "vol-../../etc/passwd",
            "vol-0F8E2A3C-1D2B-4C5D-8E9F-0A1B2C3D4E5F",
            "vol-0f8e2a3c1d2b4c5d8e9f0a1b2c3d4e5f",
            "vol-0f8e2a3c-1d2b-4c5d-8e9f-0a1b2c3d4e5f/",
            "vol-0f8e2a3c-1d2b-4c5d-8e9f-0a1b2c3d4e5",
            "snap-0f8e2a3c-1d2b-4c5d-8e9f-0a1b2c3d4e5f",
            "vol-0f8e2a3c-1d2b-4c5d-8e9f-0a1b2c3d4e5g",
            "vol-0f8e2a3c_1d2b-4c5d-8e9f-0a1b2c3d4e5f",
        ] {
            assert!(VolumeId::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(SnapshotId::parse(good).is_err());
    }

    #[test]
    fn parse_accepts_exactly_what_the_pattern_matches() {
        let volume = regex::Regex::new(VOLUME_ID_PATTERN).unwrap();
        let snapshot = regex::Regex::new(SNAPSHOT_ID_PATTERN).unwrap();
        let generated = [VolumeId::generate().0, SnapshotId::generate().0];
        let samples = [
            "vol-0f8e2a3c-1d2b-4c5d-8e9f-0a1b2c3d4e5f",
            "snap-0f8e2a3c-1d2b-4c5d-8e9f-0a1b2c3d4e5f",
            "vol-0F8E2A3C-1D2B-4C5D-8E9F-0A1B2C3D4E5F",
            "vol-0f8e2a3c-1d2b-4c5d-8e9f-0a1b2c3d4e5f\n",
            "xvol-0f8e2a3c-1d2b-4c5d-8e9f-0a1b2c3d4e5f",
            "vol-0f8e2a3c-1d2b-4c5d-8e9f0-a1b2c3d4e5f",
            "snap-",
            "",
        ];
        for s in samples
            .iter()
            .copied()
            .chain(generated.iter().map(String::as_str))
        {
            assert_eq!(VolumeId::parse(s).is_ok(), volume.is_match(s), "{s:?}");
            assert_eq!(SnapshotId::parse(s).is_ok(), snapshot.is_match(s), "{s:?}");
        }
    }

    #[test]
    fn deserialize_validates() {
        let r: Result<VolumeId, _> = serde_json::from_str("\"../x\"");
        assert!(r.is_err());
    }
}
