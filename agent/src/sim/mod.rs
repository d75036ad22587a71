//! Built-in simulated devices and the embedded broker, for the demo plant and tests.

#[cfg(feature = "embedded-broker")]
pub mod broker;
#[cfg(feature = "simulators")]
pub mod oven;
#[cfg(feature = "simulators")]
pub mod packer;
#[cfg(feature = "simulators")]
pub mod plc;
#[cfg(feature = "simulators")]
pub mod sensor;
