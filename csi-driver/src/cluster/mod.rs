//! The cluster side: the CSI Controller and GroupController services. It owns no storage; it declares `LivediskVolume`
//! and `LivediskSnapshot` objects for a chosen node and answers from their status.

pub mod controller;
pub mod deletion_events;
pub mod group;
pub mod health;
pub mod wait;
