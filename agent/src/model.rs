//! The values that flow through the pipeline: readings from sources, records of products.

use std::fmt;

pub use protocol::{BadReason, Quality};

/// A decoded device value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Text(String),
    /// A one-dimensional array (OPC UA arrays).
    Array(Vec<Value>),
}

impl Value {
    /// The value as a float, for scaling and deadbands (text has none).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Bool(b) => Some(f64::from(u8::from(*b))),
            Value::Int(i) => Some(*i as f64),
            Value::UInt(u) => Some(*u as f64),
            Value::Float(f) => Some(*f),
            Value::Text(_) | Value::Array(_) => None,
        }
    }

    /// The JSON form used in product messages. Non-finite floats have no JSON form and become null.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Bool(b) => (*b).into(),
            Value::Int(i) => (*i).into(),
            Value::UInt(u) => (*u).into(),
            Value::Float(f) => serde_json::Number::from_f64(*f).map_or(serde_json::Value::Null, Into::into),
            Value::Text(s) => s.as_str().into(),
            Value::Array(items) => serde_json::Value::Array(items.iter().map(Value::to_json).collect()),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::UInt(u) => write!(f, "{u}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Text(s) => write!(f, "{s:?}"),
            Value::Array(items) => write!(f, "[{} items]", items.len()),
        }
    }
}

/// The wire form of a quality (`good`, `stale`, `bad:<reason>`, `uncertain:<reason>`), with OPC UA
/// status codes by name (`bad:opcua_BadNodeIdUnknown`).
pub fn quality_text(q: Quality) -> String {
    let name = |code: u32| opcua::types::StatusCode::from(code).sub_code().name();
    match q {
        Quality::Bad(BadReason::OpcUa(code)) => format!("bad:opcua_{}", name(code)),
        Quality::Uncertain(BadReason::OpcUa(code)) => format!("uncertain:opcua_{}", name(code)),
        q => q.to_string(),
    }
}

/// Milliseconds since the Unix epoch (UTC).
pub type Millis = u64;

/// The current wall-clock time in milliseconds since the Unix epoch.
pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One value of one tag, as read.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// Index of the tag in the plan's tag table.
    pub tag: usize,
    pub value: Option<Value>,
    pub quality: Quality,
}

/// Everything one poll of one device produced, stamped with the time of the read.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadingBatch {
    pub device: usize,
    pub ts: Millis,
    pub readings: Vec<Reading>,
}

/// One row of a product: a timestamp and a value and quality per field.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub ts: Millis,
    /// In the product's field order; `None` when the field has no value (its quality says why).
    pub fields: Vec<(Option<Value>, Quality)>,
}

/// Formats milliseconds since the epoch as RFC 3339 UTC with millisecond precision
/// (`2026-11-21T10:00:00.123Z`).
pub fn format_rfc3339_millis(ms: Millis) -> String {
    let secs = ms / 1000;
    let millis = ms % 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formatting() {
        assert_eq!(format_rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        // 2026-11-21T10:00:00.123Z
        assert_eq!(format_rfc3339_millis(1_795_255_200_123), "2026-11-21T10:00:00.123Z");
        // a leap day
        assert_eq!(format_rfc3339_millis(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn nan_is_null_in_json() {
        assert_eq!(Value::Float(f64::NAN).to_json(), serde_json::Value::Null);
        assert_eq!(Value::Float(1.5).to_json(), serde_json::json!(1.5));
    }
}
