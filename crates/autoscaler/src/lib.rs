//! `ferry autoscaler`: sizes the worker fleet of each region from what its queues look like in Redis.
//!
//! It owns the scaling policy ([`policy`], a pure function), the regions file ([`config`]), reading the signals
//! ([`signals`]), the control loop, and the node `ferry autoscaler` runs ([`node`]). It must not run jobs or touch job state: it reads queue statistics and
//! changes only how many workers run.

pub mod actuator;
pub mod config;
pub mod controller;
pub mod kubernetes;
pub mod node;
pub mod policy;
pub mod signals;

pub use actuator::{Actuator, ActuatorError, Held};
pub use config::RegionsFile;
pub use controller::{Autoscaler, Metrics, RegionControl, RegionDecision};
pub use node::AutoscalerNode;
