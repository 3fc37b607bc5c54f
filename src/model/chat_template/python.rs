//! Python's `str()`/`repr()` and Jinja2's type tests, for the template environment.
//!
//! Jinja2 prints values with Python's `str()` (`None`, `True`, `1.0`, `['a']`,
//! `{'k': 1}`) and minijinja prints them its own way; templates are written
//! against the Python spellings, so the formatter, the `string` filter and the
//! `iterable`/`sequence`/`callable` tests are recreated here. `tojson` shares
//! the float spelling.

use std::fmt::Write as _;

use minijinja::value::ValueKind;
use minijinja::{Error, State, Value};

/// `{{ value }}` prints `str(value)` in Jinja2: `None`, `True`, `1.0`,
/// `['a', 'b']`, `{'k': 1}`; an undefined value prints nothing.
pub(super) fn python_formatter(
    out: &mut minijinja::Output,
    _state: &mut State,
    value: &Value,
) -> Result<(), Error> {
    if value.is_undefined() {
        return Ok(());
    }
    if let Some(s) = value.as_str() {
        return out.write_str(s).map_err(Error::from);
    }
    out.write_str(&python_str(value)).map_err(Error::from)
}

/// Jinja2's `iterable` test is `iter(value)` succeeding: `None` and numbers
/// are not iterable (minijinja would say they are), undefined is.
pub(super) fn is_iterable(value: &Value) -> bool {
    !matches!(
        value.kind(),
        ValueKind::None
            | ValueKind::Bool
            | ValueKind::Number
            | ValueKind::Plain
            | ValueKind::Invalid
    )
}

/// Jinja2's `sequence` test: has `len()` and `[]`, so strings and dicts too.
pub(super) fn is_sequence(value: &Value) -> bool {
    matches!(
        value.kind(),
        ValueKind::String
            | ValueKind::Seq
            | ValueKind::Map
            | ValueKind::Bytes
            | ValueKind::Undefined
    )
}

/// Jinja2's `callable` test; functions and macros are the plain objects, and
/// Jinja2's `Undefined` is callable.
pub(super) fn is_callable(value: &Value) -> bool {
    matches!(value.kind(), ValueKind::Plain | ValueKind::Undefined)
}

/// Jinja2's `string` filter is `str()`.
pub(super) fn string_filter(value: &Value) -> String {
    python_str(value)
}

pub(super) fn python_str(value: &Value) -> String {
    match value.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::String => value.as_str().unwrap_or_default().to_owned(),
        _ => {
            let mut out = String::new();
            python_repr(value, &mut out);
            out
        }
    }
}

fn python_repr(value: &Value, out: &mut String) {
    match value.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number => out.push_str(&python_number(value, false)),
        ValueKind::String => python_str_repr(value.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            let tuple = value.is_tuple();
            out.push(if tuple { '(' } else { '[' });
            let mut len = 0;
            if let Ok(iter) = value.try_iter() {
                for (i, item) in iter.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    python_repr(&item, out);
                    len = i + 1;
                }
            }
            if tuple && len == 1 {
                out.push(',');
            }
            out.push(if tuple { ')' } else { ']' });
        }
        ValueKind::Map => {
            out.push('{');
            if let Ok(iter) = value.try_iter() {
                for (i, key) in iter.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    python_repr(&key, out);
                    out.push_str(": ");
                    let item = value.get_item(&key).unwrap_or_default();
                    python_repr(&item, out);
                }
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{value}");
        }
    }
}

/// `repr(str)`: single quotes unless the text has a `'` and no `"`.
fn python_str_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if !python_printable(c) => {
                let cp = c as u32;
                let _ = if cp <= 0xff {
                    write!(out, "\\x{cp:02x}")
                } else if cp <= 0xffff {
                    write!(out, "\\u{cp:04x}")
                } else {
                    write!(out, "\\U{cp:08x}")
                };
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Approximates Python's `str.isprintable` for the characters that show up
/// in practice: controls, separators other than space, and format characters.
fn python_printable(c: char) -> bool {
    !matches!(c as u32,
        0x00..=0x1f | 0x7f..=0xa0 | 0xad | 0x1680 | 0x180e | 0x2000..=0x200f
        | 0x2028..=0x202f | 0x205f..=0x2064 | 0x3000 | 0xfeff | 0xe000..=0xf8ff)
}

/// Integers print as themselves; floats as Python's `repr(float)`.
/// `json` selects `json.dumps` spellings of the non-finite values.
pub(super) fn python_number(value: &Value, json: bool) -> String {
    if value.is_integer() {
        return value.to_string();
    }
    match f64::try_from(value.clone()) {
        Ok(f) => python_float_repr(f, json),
        Err(_) => value.to_string(),
    }
}

fn python_float_repr(f: f64, json: bool) -> String {
    if f.is_nan() {
        return if json { "NaN" } else { "nan" }.into();
    }
    if f.is_infinite() {
        return match (f > 0.0, json) {
            (true, true) => "Infinity",
            (false, true) => "-Infinity",
            (true, false) => "inf",
            (false, false) => "-inf",
        }
        .into();
    }
    // Rust's `{:e}` gives the shortest round-tripping digits, like Python's repr.
    let sci = format!("{:e}", f.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let mut out = String::new();
    if f.is_sign_negative() {
        out.push('-');
    }
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                out.push_str(&digits);
                out.extend(std::iter::repeat_n('0', int_len - digits.len()));
                out.push_str(".0");
            } else {
                out.push_str(&digits[..int_len]);
                out.push('.');
                out.push_str(&digits[int_len..]);
            }
        } else {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-exp - 1) as usize));
            out.push_str(&digits);
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let sign = if exp < 0 { '-' } else { '+' };
        let _ = write!(out, "e{sign}{:02}", exp.abs());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::tests::render_src;
    use super::*;

    #[test]
    fn type_tests_follow_jinja2() {
        // Llama-style guards such as `tools is iterable and tools | length > 0`
        // rely on `none is iterable` being false.
        let src = "{{ none is iterable }} {{ 1 is iterable }} {{ 'a' is iterable }} {{ nothing is iterable }} \
                   {{ {} is iterable }} {{ 'a' is sequence }} {{ {} is sequence }} {{ 1 is sequence }} \
                   {{ none is sequence }} {{ raise_exception is callable }} {{ 'a' is callable }} {{ tools is iterable }}";
        assert_eq!(
            render_src(src, &[]).unwrap(),
            "False False True True True True True False False True False False"
        );
    }

    #[test]
    fn prints_values_like_python() {
        let src = "{{ none }} {{ true }} {{ false }} {{ 1.0 }} {{ 2.5 }} {{ 10 }} {{ [1, 'a', none] }} \
                   {{ {'k': true} }} {{ none | string }} {{ 1e20 }} {{ 0.00001 }} {{ ['it\\'s'] }}";
        assert_eq!(
            render_src(src, &[]).unwrap(),
            "None True False 1.0 2.5 10 [1, 'a', None] {'k': True} None 1e+20 1e-05 [\"it's\"]"
        );
    }

    #[test]
    fn python_float_repr_matches_python() {
        for (f, want) in [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (0.1, "0.1"),
            (123.456, "123.456"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (0.0001, "0.0001"),
            (0.00012, "0.00012"),
            (1.2e-5, "1.2e-05"),
            (-2.5e-10, "-2.5e-10"),
            (1e100, "1e+100"),
            (f64::INFINITY, "inf"),
        ] {
            assert_eq!(python_float_repr(f, false), want, "{f}");
        }
        assert_eq!(python_float_repr(f64::NAN, true), "NaN");
        assert_eq!(python_float_repr(f64::NEG_INFINITY, true), "-Infinity");
    }
}
