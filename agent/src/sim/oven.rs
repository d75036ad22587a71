//! Simulated OPC UA servers (async-opcua server, in process, on loopback):
//! - a curing oven for the demo plant: three zone temperatures (Double, °C), door open (Boolean),
//!   current batch id (String), in namespace `urn:plantmesh:demo:oven`;
//! - a load bank of N Double items all changing at a fixed interval, for benchmarks.
//!
//! Both speak SecurityPolicy None only: they exist to run on loopback next to the agent.

use opcua::server::address_space::Variable;
use opcua::server::diagnostics::NamespaceMetadata;
use opcua::server::node_manager::memory::{simple_node_manager, SimpleNodeManager};
use opcua::server::{ServerBuilder, ServerHandle};
use opcua::types::{DataValue, DateTime, NodeId};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub const OVEN_NAMESPACE: &str = "urn:plantmesh:demo:oven";
pub const BANK_NAMESPACE: &str = "urn:plantmesh:sim:bank";

/// A running simulated server.
pub struct SimServer {
    pub endpoint: String,
    pub handle: ServerHandle,
}

async fn start_server(
    name: &str,
    namespace: &str,
    pki_dir: &std::path::Path,
) -> Result<(SimServer, Arc<SimpleNodeManager>, u16), String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let (server, handle) = ServerBuilder::new_anonymous(name)
        .host("127.0.0.1")
        .port(port)
        .pki_dir(pki_dir)
        .create_sample_keypair(true)
        .with_node_manager(simple_node_manager(
            NamespaceMetadata {
                namespace_uri: namespace.to_string(),
                ..Default::default()
            },
            name,
        ))
        .build()?;
    let nm = handle
        .node_managers()
        .get_of_type::<SimpleNodeManager>()
        .ok_or("no node manager")?;
    let ns = handle
        .get_namespace_index(namespace)
        .ok_or("namespace not registered")?;
    tokio::spawn(async move {
        if let Err(e) = server.run_with(listener).await {
            tracing::error!(error = %e, "simulated OPC UA server stopped");
        }
    });
    let endpoint = format!("opc.tcp://127.0.0.1:{port}/");
    Ok((SimServer { endpoint, handle }, nm, ns))
}

/// Starts the curing oven; values change every 500 ms.
pub async fn start_oven(pki_dir: &std::path::Path) -> Result<SimServer, String> {
    let (sim, nm, ns) = start_server("plantmesh demo oven", OVEN_NAMESPACE, pki_dir).await?;
    let folder = NodeId::new(ns, "Oven");
    let ids: Vec<NodeId> = ["Zone1", "Zone2", "Zone3", "DoorOpen", "BatchId"]
        .iter()
        .map(|n| NodeId::new(ns, format!("Oven.{n}")))
        .collect();
    {
        let mut space = nm.address_space().write();
        space.add_folder(&folder, "Oven", "Oven", &NodeId::objects_folder_id());
        space.add_variables(
            vec![
                Variable::new(&ids[0], "Zone1", "Zone 1 temperature", 180.0f64),
                Variable::new(&ids[1], "Zone2", "Zone 2 temperature", 185.0f64),
                Variable::new(&ids[2], "Zone3", "Zone 3 temperature", 175.0f64),
                Variable::new(&ids[3], "DoorOpen", "Door open", false),
                Variable::new(&ids[4], "BatchId", "Batch id", "B-0001"),
            ],
            &folder,
        );
    }
    let subscriptions = sim.handle.subscriptions().clone();
    tokio::spawn(async move {
        let mut t = 0.0f64;
        let mut batch = 1u32;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            t += 0.5;
            // A batch cycle of 60 s: the door opens for 4 s between batches.
            let door = (t % 60.0) >= 56.0;
            if (t % 60.0) == 0.0 {
                batch += 1;
            }
            let drop = if door { 12.0 } else { 0.0 };
            let values = [
                180.0 + 2.0 * (t / 20.0).sin() - drop + fastrand::f64() * 0.2,
                185.0 + 1.5 * (t / 25.0).cos() - drop + fastrand::f64() * 0.2,
                175.0 + 1.0 * (t / 30.0).sin() - drop + fastrand::f64() * 0.2,
            ];
            let now = DateTime::now();
            let mut updates: Vec<(&NodeId, Option<&opcua::types::NumericRange>, DataValue)> = ids[..3]
                .iter()
                .zip(values)
                .map(|(id, v)| (id, None, DataValue::new_at(v, now)))
                .collect();
            updates.push((&ids[3], None, DataValue::new_at(door, now)));
            updates.push((&ids[4], None, DataValue::new_at(format!("B-{batch:04}"), now)));
            let _ = nm.set_values(&subscriptions, updates.into_iter());
        }
    });
    Ok(sim)
}

/// Starts a bank of `items` Double variables `Item<i>`, all changing every `interval`.
pub async fn start_bank(pki_dir: &std::path::Path, items: usize, interval: Duration) -> Result<SimServer, String> {
    let (sim, nm, ns) = start_server("plantmesh load bank", BANK_NAMESPACE, pki_dir).await?;
    let folder = NodeId::new(ns, "Bank");
    let ids: Vec<NodeId> = (0..items).map(|i| NodeId::new(ns, format!("Item{i}"))).collect();
    {
        let mut space = nm.address_space().write();
        space.add_folder(&folder, "Bank", "Bank", &NodeId::objects_folder_id());
        let vars = ids
            .iter()
            .enumerate()
            .map(|(i, id)| Variable::new(id, format!("Item{i}"), format!("Item{i}"), 0.0f64))
            .collect();
        space.add_variables(vars, &folder);
    }
    let subscriptions = sim.handle.subscriptions().clone();
    tokio::spawn(async move {
        let mut n = 0u64;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            n += 1;
            let now = DateTime::now();
            let updates = ids
                .iter()
                .enumerate()
                .map(|(i, id)| (id, None, DataValue::new_at((n as f64) + i as f64 * 1e-3, now)));
            let _ = nm.set_values(&subscriptions, updates);
        }
    });
    Ok(sim)
}

/// The address the simulated server listens on.
pub fn address(sim: &SimServer) -> Option<SocketAddr> {
    sim.endpoint
        .trim_start_matches("opc.tcp://")
        .trim_end_matches('/')
        .parse()
        .ok()
}
