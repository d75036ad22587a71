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
    QualityText(q).to_string()
}

/// [`quality_text`] written straight into a formatter (record encoding writes one per bad value).
pub struct QualityText(pub Quality);

impl std::fmt::Display for QualityText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = |code: u32| opcua::types::StatusCode::from(code).sub_code().name();
        match self.0 {
            Quality::Bad(BadReason::OpcUa(code)) => write!(f, "bad:opcua_{}", name(code)),
            Quality::Uncertain(BadReason::OpcUa(code)) => write!(f, "uncertain:opcua_{}", name(code)),
            q => write!(f, "{q}"),
        }
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

/// Parses RFC 3339 date-time text (`2026-11-21T10:00:00.123Z`, `2026-11-21T11:00:00+01:00`) to
/// milliseconds since the epoch; digits past milliseconds are cut off.
pub fn parse_rfc3339_millis(s: &str) -> Option<Millis> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes().all(|c| c.is_ascii_digit()).then(|| t.parse().ok())?
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut millis = 0;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        let frac = &s[start..i.min(start + 3)];
        millis = frac.parse::<i64>().ok()? * 10_i64.pow(3 - frac.len() as u32);
    }
    let offset_min = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let m = num(i + 1..i + 3)? * 60 + num(i + 4..i + 6)?;
            if *sign == b'+' {
                m
            } else {
                -m
            }
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo as u32, d as u32);
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_min * 60;
    u64::try_from(secs * 1000 + millis).ok()
}

/// (year, month, day) in the proleptic Gregorian calendar to days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
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
    fn rfc3339_parsing_inverts_formatting() {
        for ms in [0, 951_782_400_000, 1_795_255_200_123, 4_102_444_799_999] {
            assert_eq!(parse_rfc3339_millis(&format_rfc3339_millis(ms)), Some(ms));
        }
        assert_eq!(
            parse_rfc3339_millis("2026-11-21T11:00:00+01:00"),
            Some(1_795_255_200_000)
        );
        assert_eq!(
            parse_rfc3339_millis("2026-11-21T10:00:00.1234567Z"),
            Some(1_795_255_200_123)
        );
        assert_eq!(parse_rfc3339_millis("2026-11-21T10:00:00.5Z"), Some(1_795_255_200_500));
        for bad in [
            "",
            "2026-11-21",
            "2026-13-01T00:00:00Z",
            "2026-11-21T10:00:00",
            "2026-11-21T10:00:00.Z",
            "x026-11-21T10:00:00Z",
        ] {
            assert_eq!(parse_rfc3339_millis(bad), None, "{bad}");
        }
    }

    #[test]
    fn nan_is_null_in_json() {
        assert_eq!(Value::Float(f64::NAN).to_json(), serde_json::Value::Null);
        assert_eq!(Value::Float(1.5).to_json(), serde_json::json!(1.5));
    }
}
