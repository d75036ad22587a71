//! `plantmesh discover`: browse an OPC UA server and propose tag definitions.
//!
//! Breadth first from a start node (default: Objects), following hierarchical references, in
//! Browse requests of up to 100 nodes with continuation points (BrowseNext), so address spaces of
//! tens of thousands of nodes neither hang nor overflow a response. For every Variable found it reads
//! DataType and ValueRank, and its EngineeringUnits and EURange properties where the server has
//! them, and prints `[[devices.tags]]` blocks in the gateway config syntax, with namespace URIs
//! instead of indexes. Progress goes to stderr, the proposal to stdout.

use crate::config::{OpcUaDevicePlan, OpcUaIdentity, OpcUaSecurityMode};
use crate::sources::opcua::{build_client, identity_token, security_policy, Selector};
use opcua::client::Session;
use opcua::types::{
    AttributeId, BrowseDescription, BrowseDirection, BrowsePath, BrowseResultMask, EUInformation, ExtensionObject,
    MessageSecurityMode, NodeClass, NodeId, ObjectId, QualifiedName, Range, ReadValueId, ReferenceTypeId, RelativePath,
    RelativePathElement, TimestampsToReturn, UserTokenPolicy, VariableId, Variant,
};
use std::collections::{HashSet, VecDeque};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Options {
    pub endpoint: String,
    pub security_policy: String,
    pub security_mode: OpcUaSecurityMode,
    pub identity: OpcUaIdentity,
    pub start: Option<String>,
    pub max_depth: usize,
    pub pki_dir: std::path::PathBuf,
    pub application_uri: String,
    pub device_id: String,
}

/// One variable found.
#[derive(Debug, Clone)]
pub struct Found {
    pub path: Vec<String>,
    pub node: NodeId,
    pub type_name: Option<String>,
    pub array: bool,
    pub unit: Option<String>,
    pub range: Option<(f64, f64)>,
}

/// Browses the server and returns the proposal as config text.
pub async fn discover(o: &Options) -> Result<String, String> {
    let plan = OpcUaDevicePlan {
        endpoint: o.endpoint.clone(),
        security_policy: o.security_policy.clone(),
        security_mode: o.security_mode,
        identity: o.identity.clone(),
        publishing_interval: Duration::from_secs(1),
        polling: false,
        poll_interval: Duration::from_secs(1),
        timeout: Duration::from_secs(30),
        server_timestamp: false,
        insecure_credentials: o.identity != OpcUaIdentity::Anonymous
            && o.security_mode != OpcUaSecurityMode::SignAndEncrypt,
    };
    let mut client = build_client(&o.device_id, &plan, &o.pki_dir, &o.application_uri)?;
    let policy = security_policy(&o.security_policy)
        .ok_or_else(|| format!("unsupported security policy {}", o.security_policy))?;
    let mode = match o.security_mode {
        OpcUaSecurityMode::None => MessageSecurityMode::None,
        OpcUaSecurityMode::Sign => MessageSecurityMode::Sign,
        OpcUaSecurityMode::SignAndEncrypt => MessageSecurityMode::SignAndEncrypt,
    };
    let endpoint = (o.endpoint.as_str(), policy.to_str(), mode, UserTokenPolicy::anonymous());
    let connected = client
        .connect_to_matching_endpoint(endpoint, identity_token(&o.identity)?)
        .await;
    let (session, event_loop) = match connected {
        Ok(c) => c,
        Err(e) => {
            let why = crate::sources::opcua::connect_failure(&client, &plan, &e.to_string(), Selector::Flags).await;
            return Err(why);
        }
    };
    let handle = event_loop.spawn();
    if !session.wait_for_connection().await {
        let status = handle.await.map_or_else(|e| e.to_string(), |s| s.to_string());
        let rejected = o.pki_dir.join("rejected");
        return Err(format!(
            "connection to {} failed: {status}. If the server's certificate is new, it is now in {}: check it and move it to {}/",
            o.endpoint,
            rejected.display(),
            o.pki_dir.join("trusted").display()
        ));
    }
    let result = run(&session, o).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), session.disconnect()).await;
    handle.abort();
    result
}

async fn run(session: &Arc<Session>, o: &Options) -> Result<String, String> {
    let started = Instant::now();
    let namespaces = read_namespaces(session).await?;
    let start: NodeId = match &o.start {
        Some(s) => s.parse().map_err(|_| format!("`{s}` is not a NodeId"))?,
        None => ObjectId::ObjectsFolder.into(),
    };
    let found = browse(session, start.clone(), o.max_depth).await?;
    eprintln!("reading types and units of {} variables...", found.len());
    let found = describe(session, found).await?;
    eprintln!(
        "done: {} variables in {:.1} s",
        found.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(render(o, &start, &namespaces, &found))
}

async fn read_namespaces(session: &Arc<Session>) -> Result<Vec<String>, String> {
    let id = ReadValueId::from(NodeId::from(VariableId::Server_NamespaceArray));
    let values = session
        .read(&[id], TimestampsToReturn::Neither, 0.0)
        .await
        .map_err(|e| format!("reading the NamespaceArray: {e}"))?;
    Ok(match values.first().and_then(|v| v.value.clone()) {
        Some(Variant::Array(a)) => a
            .values
            .iter()
            .map(|v| {
                if let Variant::String(s) = v {
                    s.as_ref().to_string()
                } else {
                    String::new()
                }
            })
            .collect(),
        _ => Vec::new(),
    })
}

/// Breadth-first browse; returns every Variable under `start` (not descending into variables).
pub async fn browse(session: &Arc<Session>, start: NodeId, max_depth: usize) -> Result<Vec<Found>, String> {
    let mut queue: VecDeque<(NodeId, Vec<String>, usize)> = VecDeque::from([(start.clone(), Vec::new(), 0)]);
    let mut seen: HashSet<NodeId> = HashSet::from([start]);
    let mut found = Vec::new();
    let mut browsed = 0usize;
    let mut last_progress = Instant::now();
    while !queue.is_empty() {
        let batch: Vec<(NodeId, Vec<String>, usize)> = queue.drain(..queue.len().min(100)).collect();
        let descriptions: Vec<BrowseDescription> = batch
            .iter()
            .map(|(n, _, _)| BrowseDescription {
                node_id: n.clone(),
                browse_direction: BrowseDirection::Forward,
                reference_type_id: ReferenceTypeId::HierarchicalReferences.into(),
                include_subtypes: true,
                node_class_mask: NodeClass::Object as u32 | NodeClass::Variable as u32,
                result_mask: BrowseResultMask::All as u32,
            })
            .collect();
        let mut results = session
            .browse(&descriptions, 1000, None)
            .await
            .map_err(|e| format!("Browse failed: {e}"))?;
        // Follow continuation points until every node's references are complete.
        let mut pending: Vec<(usize, opcua::types::ByteString)> = results
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.continuation_point.is_null())
            .map(|(i, r)| (i, r.continuation_point.clone()))
            .collect();
        while !pending.is_empty() {
            let points: Vec<opcua::types::ByteString> = pending.iter().map(|(_, c)| c.clone()).collect();
            let next = session
                .browse_next(false, &points)
                .await
                .map_err(|e| format!("BrowseNext failed: {e}"))?;
            let mut again = Vec::new();
            for ((i, _), r) in pending.iter().zip(next) {
                let refs = r.references.clone().unwrap_or_default();
                results[*i].references.get_or_insert_with(Vec::new).extend(refs);
                if !r.continuation_point.is_null() {
                    again.push((*i, r.continuation_point));
                }
            }
            pending = again;
        }
        for ((_, path, depth), r) in batch.iter().zip(results) {
            browsed += 1;
            for reference in r.references.unwrap_or_default() {
                let node = reference.node_id.node_id.clone();
                if !reference.node_id.namespace_uri.is_null() || !seen.insert(node.clone()) {
                    continue;
                }
                let mut p = path.clone();
                p.push(reference.browse_name.name.as_ref().to_string());
                match reference.node_class {
                    NodeClass::Variable => found.push(Found {
                        path: p,
                        node,
                        type_name: None,
                        array: false,
                        unit: None,
                        range: None,
                    }),
                    NodeClass::Object if *depth + 1 < max_depth => queue.push_back((node, p, depth + 1)),
                    _ => {}
                }
            }
        }
        if last_progress.elapsed() > Duration::from_millis(500) || queue.is_empty() {
            eprintln!(
                "browsed {browsed} nodes, {} variables found, {} to go",
                found.len(),
                queue.len()
            );
            last_progress = Instant::now();
        }
    }
    Ok(found)
}

/// Reads DataType, ValueRank, EngineeringUnits and EURange of every variable, in batches.
async fn describe(session: &Arc<Session>, mut found: Vec<Found>) -> Result<Vec<Found>, String> {
    for chunk in found.chunks_mut(500) {
        let mut reads = Vec::with_capacity(chunk.len() * 2);
        for f in chunk.iter() {
            for attr in [AttributeId::DataType, AttributeId::ValueRank] {
                reads.push(ReadValueId {
                    node_id: f.node.clone(),
                    attribute_id: attr as u32,
                    ..Default::default()
                });
            }
        }
        let values = session
            .read(&reads, TimestampsToReturn::Neither, 0.0)
            .await
            .map_err(|e| format!("Read failed: {e}"))?;
        for (f, pair) in chunk.iter_mut().zip(values.chunks(2)) {
            if let Some(Variant::NodeId(t)) = pair[0].value.as_ref() {
                f.type_name = builtin_type(t).map(str::to_string);
            }
            // ValueRank 1: one dimension; 0: one or more dimensions (servers use it for plain arrays too).
            f.array = matches!(pair[1].value, Some(Variant::Int32(0 | 1)));
        }
        // Properties, where present.
        let paths: Vec<BrowsePath> = chunk
            .iter()
            .flat_map(|f| {
                ["EngineeringUnits", "EURange"].map(|name| BrowsePath {
                    starting_node: f.node.clone(),
                    relative_path: RelativePath {
                        elements: Some(vec![RelativePathElement {
                            reference_type_id: ReferenceTypeId::HasProperty.into(),
                            is_inverse: false,
                            include_subtypes: true,
                            target_name: QualifiedName::new(0, name),
                        }]),
                    },
                })
            })
            .collect();
        let targets = session
            .translate_browse_paths_to_node_ids(&paths)
            .await
            .map_err(|e| format!("TranslateBrowsePaths failed: {e}"))?;
        let mut prop_reads = Vec::new();
        let mut owners = Vec::new();
        for (i, t) in targets.iter().enumerate() {
            if let Some(target) = t
                .targets
                .as_ref()
                .and_then(|v| v.first())
                .filter(|_| t.status_code.is_good())
            {
                prop_reads.push(ReadValueId::from(target.target_id.node_id.clone()));
                owners.push(i);
            }
        }
        if prop_reads.is_empty() {
            continue;
        }
        let values = session
            .read(&prop_reads, TimestampsToReturn::Neither, 0.0)
            .await
            .map_err(|e| format!("Read failed: {e}"))?;
        for (i, v) in owners.into_iter().zip(values) {
            let f = &mut chunk[i / 2];
            if let Some(Variant::ExtensionObject(ext)) = v.value.as_ref() {
                if i % 2 == 0 {
                    f.unit = unit_of(ext);
                } else if let Some(r) = ext.inner_as::<Range>() {
                    f.range = Some((r.low, r.high));
                }
            }
        }
    }
    Ok(found)
}

fn unit_of(ext: &ExtensionObject) -> Option<String> {
    let eu = ext.inner_as::<EUInformation>()?;
    let name = eu.display_name.text.as_ref();
    Some(if name.is_empty() {
        eu.description.text.as_ref().to_string()
    } else {
        name.to_string()
    })
}

/// The built-in type (or the one a common subtype is encoded as) of a DataType NodeId.
fn builtin_type(t: &NodeId) -> Option<&'static str> {
    if t.namespace != 0 {
        return None;
    }
    let opcua::types::Identifier::Numeric(n) = t.identifier else {
        return None;
    };
    Some(match n {
        1 => "Boolean",
        2 => "SByte",
        3 => "Byte",
        4 => "Int16",
        5 => "UInt16",
        6 => "Int32",
        7 => "UInt32",
        8 => "Int64",
        9 => "UInt64",
        10 => "Float",
        11 => "Double",
        12 => "String",
        13 | 294 => "DateTime", // UtcTime
        14 => "Guid",
        15 => "ByteString",
        19 => "StatusCode",
        21 => "LocalizedText",
        290 => "Double", // Duration
        _ => return None,
    })
}

fn render(o: &Options, start: &NodeId, namespaces: &[String], found: &[Found]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Proposed by `plantmesh discover` from {} (start {start}, depth {}): {} variables.",
        o.endpoint,
        o.max_depth,
        found.len()
    );
    let _ = writeln!(
        s,
        "# Review names, remove what you do not need, then paste into agent.toml."
    );
    let _ = writeln!(
        s,
        "[[devices]]\nid = \"{}\"\nprotocol = \"opcua\"\nendpoint = \"{}\"",
        o.device_id, o.endpoint
    );
    let _ = writeln!(
        s,
        "security_policy = \"{}\"\nsecurity_mode = \"{:?}\"\npublishing_interval = \"1s\"",
        o.security_policy, o.security_mode
    );
    let mut names = HashSet::new();
    for f in found {
        let mut name: String = f
            .path
            .join("_")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if name.is_empty() {
            name = "tag".into();
        }
        let base = name.clone();
        let mut n = 2;
        while !names.insert(name.clone()) {
            name = format!("{base}_{n}");
            n += 1;
        }
        let _ = writeln!(s, "\n  [[devices.tags]]\n  name = \"{name}\"");
        let full = f.node.to_string();
        match namespaces
            .get(usize::from(f.node.namespace))
            .filter(|_| f.node.namespace != 0)
        {
            Some(uri) => {
                let local = full.split_once(';').map_or(full.as_str(), |(_, l)| l);
                let _ = writeln!(
                    s,
                    "  node_id = {}\n  namespace_uri = {}",
                    toml_str(local),
                    toml_str(uri)
                );
            }
            None => {
                let _ = writeln!(s, "  node_id = {}", toml_str(&full));
            }
        }
        match &f.type_name {
            Some(t) => {
                let _ = writeln!(s, "  type = \"{t}\"");
            }
            None => {
                let _ = writeln!(
                    s,
                    "  # the server's DataType is not a built-in scalar type; read as Double"
                );
            }
        }
        if f.array {
            let _ = writeln!(s, "  array = true");
        }
        match (&f.unit, f.range) {
            (Some(u), Some((lo, hi))) => {
                let _ = writeln!(s, "  # unit: {u}, range: {lo} .. {hi}");
            }
            (Some(u), None) => {
                let _ = writeln!(s, "  # unit: {u}");
            }
            (None, Some((lo, hi))) => {
                let _ = writeln!(s, "  # range: {lo} .. {hi}");
            }
            (None, None) => {}
        }
    }
    s
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}
