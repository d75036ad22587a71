//! plantmesh: an edge agent that turns factory-floor device data into governed data products.
//!
//! The pipeline, six stages: **sources** poll devices and emit readings (value + quality + read
//! time), one room per device kind; **map** turns readings into product records (pure); **govern**
//! decides what of each record may leave the site: classification actions, contract checks, drops
//! counted (pure; map and govern run together in [`produce`]); the **buffer** commits records durably
//! to redb in per-product queues of numbered messages `(epoch, seq)`; **publish** sends them upstream
//! over MQTT at QoS 1 and deletes a message only after the broker's PUBACK for exactly that message;
//! **catalog** measures each product's service levels and publishes them beside its descriptor.
//! Everything upstream of the buffer may be lost in a crash; nothing the buffer has committed may be.
//! [`config`] builds the typed plan every stage starts from; [`runtime`] wires the tasks.

pub mod audit;
pub mod backoff;
pub mod buffer;
pub mod catalog;
pub mod config;
pub mod discover;
pub mod disk;
pub mod fleet;
pub mod fsutil;
pub mod govern;
pub mod http;
pub mod map;
pub mod model;
pub mod page;
pub mod preview;
pub mod produce;
pub mod publish;
pub mod reload;
pub mod runtime;
pub mod sim;
pub mod sources;
pub mod sparkplug;
pub mod telemetry;
pub mod view;
