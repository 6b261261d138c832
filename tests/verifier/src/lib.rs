//! Checksummed writer and verifier for livedisk's data-path tests.
//!
//! The writer puts sequence-numbered, self-describing 4 KiB blocks on a file
//! or block device opened with `O_DSYNC`, so a write is acknowledged exactly
//! when its `pwrite` returns, and logs every acknowledged write. The verifier
//! checks that the latest acknowledged write of every block reads back.

pub mod bench;
pub mod block;
pub mod verify;
pub mod writer;

pub use block::{BLOCK_SIZE, BlockError, Header, decode, encode};
pub use verify::{Mismatch, Report, verify, verify_point_in_time};
pub use writer::{Ack, BackgroundWriter, Pattern, Writer};
