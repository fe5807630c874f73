//! ironhorn manager: the control plane's resource types, the store they live in, the REST
//! API that serves them and a client of that API.
//!
//! - [`resources`]: Volume, Engine, Replica, Node, Snapshot, Backup, BackupTarget,
//!   RecurringJob and Setting — spec (desired) and status (observed), usable as Kubernetes
//!   custom resources and in the embedded store.
//! - [`store`]: one [`store::Store`] handle over a [`store::StoreBackend`] (embedded redb file
//!   now, Kubernetes later): get, list, create, update with a resource-version check,
//!   status updates, delete with finalizers, watch.

pub mod agent;
pub mod api;
pub mod client;
pub mod controllers;
pub mod resources;
pub mod scheduler;
pub mod server;
pub mod settings;
pub mod store;
