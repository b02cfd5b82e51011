//! RFC 8785, the JSON Canonicalization Scheme (JCS): one byte string per
//! JSON value, whatever the text it was sent as.
//!
//! Two services in two regions serialize the same payment differently
//! (`1.0` or `1`, keys in any order, `"\u00e9"` or `"é"`); a fingerprint
//! over the text as sent would call a retry a misuse of the key. JCS fixes
//! the form: no white space, object members sorted by the UTF-16 code units
//! of their names, strings with only the escapes JSON requires, and numbers
//! as IEEE 754 doubles printed the way ECMAScript's `Number.prototype.toString`
//! prints them (the `ryu-js` crate implements that algorithm).
//!
//! As in I-JSON (RFC 7493), which JCS builds on, a number is a double: an
//! integer beyond 2^53 loses precision here exactly as it would in a
//! JavaScript service, so identifiers that large belong in strings.

use serde_json::{Number, Value};

/// The JCS form of `value`.
///
/// ```
/// let sent: serde_json::Value =
///     serde_json::from_str(r#"{ "b": [1.0, 1e2], "a": "caf\u00e9" }"#).unwrap();
/// let canonical = oncemesh::jcs::canonical(&sent);
/// assert_eq!(String::from_utf8(canonical).unwrap(), r#"{"a":"café","b":[1,100]}"#);
/// ```
pub fn canonical(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    write_value(&mut out, value);
    out
}

fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(members) => {
            let mut sorted: Vec<(&String, &Value)> = members.iter().collect();
            // serde_json's map orders names by UTF-8 bytes, which differs
            // from UTF-16 order between U+E000..U+FFFF and the astral planes.
            sorted.sort_by(|(a, _), (b, _)| a.encode_utf16().cmp(b.encode_utf16()));
            out.push(b'{');
            for (i, (name, member)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(out, name);
                out.push(b':');
                write_value(out, member);
            }
            out.push(b'}');
        }
    }
}

/// A number as the double it denotes, in ECMAScript's shortest form
/// (`1`, `0.1`, `1e+21`, `-0` as `0`). serde_json parses JSON text into
/// finite numbers only, so every number has a double.
fn write_number(out: &mut Vec<u8>, n: &Number) {
    match n.as_f64() {
        Some(f) if f.is_finite() => {
            out.extend_from_slice(ryu_js::Buffer::new().format_finite(f).as_bytes())
        }
        _ => out.extend_from_slice(n.to_string().as_bytes()),
    }
}

/// A string with the escapes RFC 8785 prescribes: `\"`, `\\`, the short
/// forms `\b \t \n \f \r`, `\u00xx` (lower case) for other control
/// characters, and every other character as its UTF-8 bytes.
fn write_string(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut plain_from = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            0x0c => b"\\f",
            b'\r' => b"\\r",
            0x00..=0x1f => &[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ],
            _ => continue,
        };
        out.extend_from_slice(&bytes[plain_from..i]);
        out.extend_from_slice(escape);
        plain_from = i + 1;
    }
    out.extend_from_slice(&bytes[plain_from..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::canonical;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    fn canon_text(text: &str) -> String {
        let value: Value = serde_json::from_str(text).expect("test JSON");
        String::from_utf8(canonical(&value)).expect("JCS is UTF-8")
    }

    #[test]
    fn numbers_print_as_ecmascript_does() {
        // RFC 8785 appendix B and section 3.2.2.3, as JSON text.
        for (sent, want) in [
            ("0", "0"),
            ("-0", "0"),
            ("-0.0", "0"),
            ("1.0", "1"),
            ("1e0", "1"),
            ("10E-1", "1"),
            ("100", "100"),
            ("1E2", "100"),
            ("0.000001", "0.000001"),
            ("1e-7", "1e-7"),
            ("1e21", "1e+21"),
            ("1e20", "100000000000000000000"),
            ("123e-2", "1.23"),
            ("5e-324", "5e-324"),
            ("-5e-324", "-5e-324"),
            ("1.7976931348623157e308", "1.7976931348623157e+308"),
            ("9007199254740992", "9007199254740992"),
            ("9007199254740993", "9007199254740992"),
            ("295147905179352830000", "295147905179352830000"),
            ("4.50", "4.5"),
            ("2e-3", "0.002"),
            ("0.000001000", "0.000001"),
            ("333333333.33333329", "333333333.3333333"),
            ("1424953923781206.2", "1424953923781206.2"),
            ("-1.0", "-1"),
            ("-18446744073709551615", "-18446744073709552000"),
        ] {
            assert_eq!(canon_text(sent), want, "{sent}");
        }
    }

    #[test]
    fn the_rfc_example_object() {
        // RFC 8785 section 3.2.3 (the same values, written differently).
        let sent = r#"{
          "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
          "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
          "literals": [null, true, false]
        }"#;
        assert_eq!(
            canon_text(sent),
            r#"{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\u000f\nA'B\"\\\\\"/"}"#
        );
    }

    #[test]
    fn members_sort_by_utf16_code_units() {
        // RFC 8785 section 3.2.3's sorting example: "\ud83d\ude00" (U+1F600)
        // sorts before "\ufb33" in UTF-16 although after it in UTF-8.
        let sent = r#"{"\u20ac":"Euro Sign","\r":"Carriage Return","\ufb33":"Hebrew Letter Dalet With Dagesh","1":"One","\ud83d\ude00":"Emoji: Grinning Face","\u0080":"Control","\u00f6":"Latin Small Letter O With Diaeresis"}"#;
        let text = canon_text(sent);
        let positions: Vec<usize> = [
            "Carriage Return",
            "One",
            "Control",
            "Latin Small",
            "Euro Sign",
            "Emoji",
            "Hebrew",
        ]
        .iter()
        .map(|name| text.find(name).expect("every member is kept"))
        .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{text}");
    }

    #[test]
    fn control_characters_use_the_prescribed_escapes() {
        let value = json!({"s": "\u{0}\u{8}\t\n\u{b}\u{c}\r\u{1f}\u{7f}\u{2028}é"});
        assert_eq!(
            String::from_utf8(canonical(&value)).unwrap(),
            "{\"s\":\"\\u0000\\b\\t\\n\\u000b\\f\\r\\u001f\u{7f}\u{2028}é\"}"
        );
    }

    /// A JSON value whose numbers are all finite doubles (as JCS sees them).
    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(any::<String>(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Which of the many JSON texts of one value a sender writes.
    #[derive(Clone, Copy, Debug)]
    struct Style {
        reverse_members: bool,
        escape_every_char: bool,
        number: u8,
        spaces: bool,
    }

    fn style() -> impl Strategy<Value = Style> {
        (any::<bool>(), any::<bool>(), 0u8..5, any::<bool>()).prop_map(
            |(reverse_members, escape_every_char, number, spaces)| Style {
                reverse_members,
                escape_every_char,
                number,
                spaces,
            },
        )
    }

    /// Writes `value` as JSON text in `style`: another text of the same value.
    fn write_styled(out: &mut String, value: &Value, style: Style) {
        let sep = if style.spaces { " " } else { "" };
        match value {
            Value::Number(n) => match n.as_f64() {
                Some(f) if style.number == 1 => out.push_str(&format!("{f:e}")),
                Some(f) if style.number == 2 => out.push_str(&format!("{f:E}")),
                Some(f) if style.number == 3 => out.push_str(&integer_mantissa(f)),
                Some(f) if style.number == 4 && f.fract() == 0.0 && f.abs() < 1e15 => {
                    out.push_str(&format!("{f:.1}"))
                }
                _ => out.push_str(&n.to_string()),
            },
            Value::String(s) => write_styled_string(out, s, style),
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                        out.push_str(sep);
                    }
                    write_styled(out, item, style);
                }
                out.push(']');
            }
            Value::Object(members) => {
                let mut members: Vec<_> = members.iter().collect();
                if style.reverse_members {
                    members.reverse();
                }
                out.push('{');
                for (i, (name, member)) in members.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(sep);
                    write_styled_string(out, name, style);
                    out.push(':');
                    out.push_str(sep);
                    write_styled(out, member, style);
                }
                out.push('}');
            }
            other => out.push_str(&other.to_string()),
        }
    }

    /// `f` with an integer mantissa: `1.2345e3` as `12345e-1`.
    fn integer_mantissa(f: f64) -> String {
        let shortest = format!("{f:e}");
        let (mantissa, exponent) = shortest.split_once('e').unwrap_or((&shortest, "0"));
        let exponent: i32 = exponent.parse().unwrap_or(0);
        let fraction = mantissa.split_once('.').map_or(0, |(_, frac)| frac.len());
        format!(
            "{}e{}",
            mantissa.replace('.', ""),
            exponent - fraction as i32
        )
    }

    fn write_styled_string(out: &mut String, s: &str, style: Style) {
        if !style.escape_every_char {
            out.push_str(&Value::String(s.to_owned()).to_string());
            return;
        }
        out.push('"');
        for unit in s.encode_utf16() {
            out.push_str(&format!("\\u{unit:04X}"));
        }
        out.push('"');
    }

    proptest! {
        /// The canonical form is a JSON text of the same value, and its
        /// own canonical form.
        #[test]
        fn canonical_form_is_a_fixed_point(v in value()) {
            let text = canonical(&v);
            let back: Value = serde_json::from_slice(&text).expect("JCS output is JSON");
            prop_assert_eq!(canonical(&back), text.clone());
            prop_assert!(same_value(&v, &back), "{} vs {}", v, back);
        }

        /// Every way of writing the same value (member order, white space,
        /// string escapes, number notation) has one canonical form.
        #[test]
        fn every_text_of_a_value_has_one_form(v in value(), a in style(), b in style()) {
            let (mut ta, mut tb) = (String::new(), String::new());
            write_styled(&mut ta, &v, a);
            write_styled(&mut tb, &v, b);
            let va: Value = serde_json::from_str(&ta).expect("styled text is JSON");
            let vb: Value = serde_json::from_str(&tb).expect("styled text is JSON");
            prop_assert_eq!(canonical(&va), canonical(&vb), "{} / {}", ta, tb);
            prop_assert_eq!(canonical(&va), canonical(&v));
        }
    }

    /// Equal as JCS sees values: numbers compare as doubles.
    fn same_value(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
            (Value::Array(x), Value::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_value(p, q))
            }
            (Value::Object(x), Value::Object(y)) => {
                x.len() == y.len()
                    && x.iter()
                        .all(|(k, p)| y.get(k).is_some_and(|q| same_value(p, q)))
            }
            _ => a == b,
        }
    }
}
