//! plantmesh: an edge agent that turns factory-floor device data into governed data products.
//!
//! The pipeline: **sources** poll devices and emit readings (value + quality + read time); **map**
//! turns readings into product records (pure); the **buffer** commits records durably to redb in
//! per-product queues of numbered messages `(epoch, seq)`; **publish** sends them upstream over MQTT at
//! QoS 1 and deletes a message only after the broker's PUBACK for exactly that message. Everything
//! upstream of the buffer may be lost in a crash; nothing the buffer has committed may be.

pub mod audit;
pub mod buffer;
pub mod catalog;
pub mod config;
pub mod discover;
pub mod govern;
pub mod map;
pub mod model;
pub mod preview;
pub mod produce;
pub mod publish;
pub mod runtime;
pub mod sim;
pub mod sources;
pub mod sparkplug;
pub mod telemetry;
pub mod view;
