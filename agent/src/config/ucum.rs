//! UCUM unit codes (the case-sensitive form, `c/s`), checked for the units that factory data uses.
//!
//! Grammar (UCUM §2–§7, without `10*`/`10^` special factors beyond plain integers):
//! `term := ['/'] component (('.' | '/') component)*`,
//! `component := annotatable [annotation] | annotation | factor | '(' term ')'`,
//! `annotatable := [prefix] atom [exponent]`, `annotation := '{' ... '}'`.
//! Atoms come from a table of the units a plant sees (SI, time, pressure, flow, customary units in
//! brackets). A unit outside it is refused with the nearest code or the usual fix (`°C` -> `Cel`), so
//! a contract's units are machine-readable rather than free text.

/// `(code, metric)`: metric atoms take SI prefixes.
const ATOMS: &[(&str, bool)] = &[
    // Base and SI derived units.
    ("m", true),
    ("g", true),
    ("s", true),
    ("A", true),
    ("K", true),
    ("mol", true),
    ("cd", true),
    ("rad", true),
    ("sr", true),
    ("Hz", true),
    ("N", true),
    ("Pa", true),
    ("J", true),
    ("W", true),
    ("C", true),
    ("V", true),
    ("F", true),
    ("Ohm", true),
    ("S", true),
    ("Wb", true),
    ("T", true),
    ("H", true),
    ("Cel", true),
    ("lm", true),
    ("lx", true),
    ("Bq", true),
    ("Gy", true),
    ("Sv", true),
    ("L", true),
    ("l", true),
    ("t", true),
    ("bar", true),
    ("eV", true),
    ("B", true),
    ("dB", false),
    ("VA", true),
    ("var", true),
    ("Ah", false),
    ("bit", true),
    ("By", true),
    ("Bd", true),
    // Time and angle.
    ("min", false),
    ("h", false),
    ("d", false),
    ("wk", false),
    ("mo", false),
    ("a", false),
    ("deg", false),
    ("'", false),
    ("''", false),
    ("gon", false),
    // Dimensionless.
    ("%", false),
    ("[ppm]", false),
    ("[ppb]", false),
    ("[ppth]", false),
    ("[pH]", false),
    // Customary units still found on nameplates.
    ("[degF]", false),
    ("[degR]", false),
    ("[psi]", false),
    ("[in_i]", false),
    ("[ft_i]", false),
    ("[yd_i]", false),
    ("[mi_i]", false),
    ("[lb_av]", false),
    ("[oz_av]", false),
    ("[gal_us]", false),
    ("[gal_br]", false),
    ("[HP]", false),
    ("[Btu]", false),
    ("cal", true),
    ("atm", false),
    ("mm[Hg]", false),
    ("m[H2O]", true),
    ("[in_i'Hg]", false),
    ("[kn_i]", false),
    ("[mesh_i]", false),
    ("[iU]", true),
];

/// SI prefixes, longest first where one is a prefix of another (`da` before `d`).
const PREFIXES: &[&str] = &[
    "da", "Y", "Z", "E", "P", "T", "G", "M", "k", "h", "d", "c", "m", "u", "n", "p", "f", "a", "z", "y",
];

/// Usual mistakes and their UCUM codes.
const FIXES: &[(&str, &str)] = &[
    ("°C", "Cel"),
    ("degC", "Cel"),
    ("C°", "Cel"),
    ("°F", "[degF]"),
    ("degF", "[degF]"),
    ("°", "deg"),
    ("rpm", "/min (or {rev}/min)"),
    ("RPM", "/min (or {rev}/min)"),
    ("psi", "[psi]"),
    ("ppm", "[ppm]"),
    ("ppb", "[ppb]"),
    ("pcs", "{pcs} (or 1)"),
    ("parts", "{parts} (or 1)"),
    ("count", "1 (or {count})"),
    ("sec", "s"),
    ("secs", "s"),
    ("hr", "h"),
    ("hrs", "h"),
    ("kW h", "kW.h"),
    ("kWh", "kW.h"),
    ("Wh", "W.h"),
    ("ohm", "Ohm"),
    ("Ω", "Ohm"),
    ("µm", "um"),
    ("μm", "um"),
    ("m3", "m3 is valid; for flow write m3/h"),
    ("lpm", "L/min"),
    ("l/m", "L/min"),
    ("m/s^2", "m/s2"),
    ("mA DC", "mA"),
];

/// Checks a unit code; `Err((message, help))` when it is not UCUM. The empty string (no unit) is
/// accepted here; rules that require a unit check it separately.
pub fn check(code: &str) -> Result<(), (String, Option<String>)> {
    if code.is_empty() {
        return Ok(());
    }
    let mut p = Parser {
        s: code.as_bytes(),
        i: 0,
    };
    let ok = p.term() && p.i == p.s.len();
    if ok {
        return Ok(());
    }
    let fix = FIXES
        .iter()
        .find(|(bad, _)| *bad == code)
        .map(|(_, good)| format!("write `{good}`"))
        .or_else(|| super::diag::closest(code, ATOMS.iter().map(|(a, _)| *a)).map(|b| format!("did you mean `{b}`?")));
    Err((
        format!("`{code}` is not a UCUM unit code"),
        Some(fix.unwrap_or_else(|| "see https://ucum.org/ucum (e.g. Cel, bar, m3/h, kW.h, %, 1, {parts}/min)".into())),
    ))
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn term(&mut self) -> bool {
        if self.peek() == Some(b'/') {
            self.i += 1;
        }
        if !self.component() {
            return false;
        }
        while matches!(self.peek(), Some(b'.' | b'/')) {
            self.i += 1;
            if !self.component() {
                return false;
            }
        }
        true
    }

    fn component(&mut self) -> bool {
        match self.peek() {
            Some(b'(') => {
                self.i += 1;
                let ok = self.term() && self.peek() == Some(b')');
                self.i += 1;
                ok && self.exponent_opt()
            }
            Some(b'{') => self.annotation(),
            Some(c) if c.is_ascii_digit() => {
                while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                    self.i += 1;
                }
                // `10*3`, `10^3`: a power of ten.
                if matches!(self.peek(), Some(b'*' | b'^')) {
                    self.i += 1;
                    return self.exponent() && self.annotation_opt();
                }
                self.annotation_opt()
            }
            Some(_) => self.simple_unit() && self.exponent_opt() && self.annotation_opt(),
            None => false,
        }
    }

    fn annotation(&mut self) -> bool {
        let Some(end) = self.s[self.i..].iter().position(|&c| c == b'}') else {
            return false;
        };
        let inner = &self.s[self.i + 1..self.i + end];
        self.i += end + 1;
        inner.iter().all(|&c| (33..=126).contains(&c) && c != b'{')
    }

    fn annotation_opt(&mut self) -> bool {
        self.peek() != Some(b'{') || self.annotation()
    }

    fn exponent(&mut self) -> bool {
        if matches!(self.peek(), Some(b'+' | b'-')) {
            self.i += 1;
        }
        let start = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
        self.i > start
    }

    fn exponent_opt(&mut self) -> bool {
        match self.peek() {
            Some(b'+' | b'-') => self.exponent(),
            Some(c) if c.is_ascii_digit() => self.exponent(),
            _ => true,
        }
    }

    /// The longest `[prefix] atom` at the cursor.
    fn simple_unit(&mut self) -> bool {
        let rest = &self.s[self.i..];
        let end = rest
            .iter()
            .position(|&c| {
                matches!(c, b'.' | b'/' | b'(' | b')' | b'{') || c.is_ascii_digit() || c == b'+' || c == b'-'
            })
            .unwrap_or(rest.len());
        // Brackets may hold digits (`[H2O]`): extend over a bracketed part.
        let end = match rest.iter().position(|&c| c == b'[') {
            Some(open) if open <= end => rest[open..].iter().position(|&c| c == b']').map_or(end, |close| {
                let after = open + close + 1;
                after
                    + rest[after..]
                        .iter()
                        .position(|&c| !c.is_ascii_alphabetic() && c != b'\'' && c != b'[' && c != b']')
                        .unwrap_or(rest.len() - after)
            }),
            _ => end,
        };
        let Ok(word) = std::str::from_utf8(&rest[..end]) else {
            return false;
        };
        if word.is_empty() {
            return false;
        }
        let known = |w: &str| ATOMS.iter().find(|(a, _)| *a == w);
        let ok = known(word).is_some()
            || PREFIXES
                .iter()
                .any(|p| word.strip_prefix(p).and_then(known).is_some_and(|(_, metric)| *metric));
        if ok {
            self.i += end;
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plant_units_are_accepted() {
        for u in [
            "Cel",
            "K",
            "bar",
            "kPa",
            "MPa",
            "m3/h",
            "L/min",
            "kW.h",
            "kW",
            "mA",
            "V",
            "%",
            "1",
            "/min",
            "{parts}/min",
            "{rev}/min",
            "mm/s",
            "m/s2",
            "g/m3",
            "[psi]",
            "[degF]",
            "Hz",
            "kg",
            "t/h",
            "um",
            "dB",
            "[ppm]",
            "mm[Hg]",
            "Ohm",
            "kOhm",
            "(m/s)2",
            "10*3{parts}",
            "s-1",
            "{count}",
            "daL",
            "m[H2O]",
            "uS/cm",
        ] {
            assert!(check(u).is_ok(), "{u}: {:?}", check(u));
        }
    }

    #[test]
    fn free_text_is_refused_with_the_usual_fix() {
        assert_eq!(check("°C").unwrap_err().1.unwrap(), "write `Cel`");
        assert_eq!(check("rpm").unwrap_err().1.unwrap(), "write `/min (or {rev}/min)`");
        assert_eq!(check("kWh").unwrap_err().1.unwrap(), "write `kW.h`");
        assert!(check("Celsius").is_err());
        assert!(check("kmin").is_err(), "min takes no prefix");
        assert!(check("m/").is_err());
        assert!(check("{unclosed").is_err());
        assert!(check("m//s").is_err());
        assert!(check("bars").is_err());
    }
}
