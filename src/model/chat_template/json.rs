//! transformers' `tojson` filter: `json.dumps(x, ensure_ascii=False,
//! indent=None, separators=None, sort_keys=False)`.
//!
//! minijinja's own `tojson` writes compact separators and HTML-escapes, so tool
//! schemas would reach the prompt spelled differently from transformers';
//! this clone writes what Python writes. The conversion of serde_json values
//! into template values lives here too, as it must keep key order for `tojson`.

use std::fmt::Write as _;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Error, ErrorKind, Value};

use super::python::python_number;

struct JsonOptions {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// transformers' `tojson` filter. Its parameters may also be given
/// positionally, in `json.dumps` order after the value.
pub(super) fn tojson_filter(
    value: &Value,
    positional: &[Value],
    kwargs: Kwargs,
) -> Result<String, Error> {
    if positional.len() > 4 {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            "tojson() takes at most 4 arguments after the value",
        ));
    }
    let arg = |i: usize| positional.get(i).cloned();
    let (ensure_ascii, indent, separators, sort_keys) = (arg(0), arg(1), arg(2), arg(3));
    let pick = |positional: Option<Value>, name: &str| -> Result<Option<Value>, Error> {
        let named: Option<Value> = kwargs.get(name)?;
        if positional.is_some() && named.is_some() {
            return Err(Error::new(
                ErrorKind::TooManyArguments,
                format!("tojson() got multiple values for argument '{name}'"),
            ));
        }
        Ok(positional.or(named))
    };
    let ensure_ascii = pick(ensure_ascii, "ensure_ascii")?.is_some_and(|v| v.is_true());
    let indent = match pick(indent, "indent")? {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_owned()),
            None => {
                let n = v.as_i64().ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson indent must be an integer or a string",
                    )
                })?;
                // Bounded so that a hostile template cannot make a huge allocation;
                // real templates use 2 or 4.
                Some(" ".repeat(usize::try_from(n.clamp(0, 1024)).unwrap_or(0)))
            }
        },
    };
    let (item_sep, key_sep) = match pick(separators, "separators")? {
        Some(v) if !(v.is_none() || v.is_undefined()) => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [item, key] => match (item.as_str(), key.as_str()) {
                    (Some(item), Some(key)) => (item.to_owned(), key.to_owned()),
                    _ => return Err(bad_separators()),
                },
                _ => return Err(bad_separators()),
            }
        }
        // json.dumps drops the space after ',' when indenting.
        _ if indent.is_some() => (",".into(), ": ".into()),
        _ => (", ".into(), ": ".into()),
    };
    let sort_keys = pick(sort_keys, "sort_keys")?.is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    let opts = JsonOptions {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    write_json(value, &opts, 0, &mut out)?;
    Ok(out)
}

fn bad_separators() -> Error {
    Error::new(
        ErrorKind::InvalidOperation,
        "tojson separators must be a pair of strings",
    )
}

fn write_json(
    value: &Value,
    opts: &JsonOptions,
    depth: usize,
    out: &mut String,
) -> Result<(), Error> {
    if depth > 256 {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "tojson: value nested too deeply",
        ));
    }
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&python_number(value, true)),
        ValueKind::String => {
            json_string(value.as_str().unwrap_or_default(), opts.ensure_ascii, out)
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_json_container(out, opts, depth, '[', ']', items.len(), |i, out| {
                write_json(&items[i], opts, depth + 1, out)
            })?;
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((json_key(&key)?, item));
            }
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_json_container(out, opts, depth, '{', '}', entries.len(), |i, out| {
                let (key, item) = &entries[i];
                json_string(key, opts.ensure_ascii, out);
                out.push_str(&opts.key_sep);
                write_json(item, opts, depth + 1, out)
            })?;
        }
        kind => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("Object of type {kind} is not JSON serializable"),
            ));
        }
    }
    Ok(())
}

fn write_json_container(
    out: &mut String,
    opts: &JsonOptions,
    depth: usize,
    open: char,
    close: char,
    len: usize,
    mut item: impl FnMut(usize, &mut String) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if len == 0 {
        out.push(close);
        return Ok(());
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(indent) = &opts.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(indent);
            }
        }
    };
    for i in 0..len {
        if i > 0 {
            out.push_str(&opts.item_sep);
        }
        newline(out, depth + 1);
        item(i, out)?;
    }
    newline(out, depth);
    out.push(close);
    Ok(())
}

/// json.dumps turns non-string keys into strings: `true`, `null`, `1`, `1.5`.
fn json_key(key: &Value) -> Result<String, Error> {
    Ok(match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_owned(),
        ValueKind::None => "null".into(),
        ValueKind::Bool => if key.is_true() { "true" } else { "false" }.into(),
        ValueKind::Number => python_number(key, true),
        kind => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("keys must be str, int, float, bool or None, not {kind}"),
            ));
        }
    })
}

/// Python's JSON string escaping.
fn json_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// serde_json values become template values with the same key order.
pub(super) fn json_to_value(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(items) => {
            Value::from(items.iter().map(json_to_value).collect::<Vec<_>>())
        }
        serde_json::Value::Object(map) => {
            Value::from_pairs(map.iter().map(|(k, v)| (k.as_str(), json_to_value(v))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::ChatTemplate;
    use super::super::tests::{msgs, render_src};

    #[test]
    fn tojson_matches_json_dumps() {
        let t = |src: &str| render_src(src, &msgs(&[("user", "héllo \"w\" <b>&'\n")])).unwrap();
        // Python separators, no HTML escaping, non-ASCII kept.
        assert_eq!(
            t("{{ {'b': 1, 'a': [1, 2.0, none, true]} | tojson }}"),
            r#"{"b": 1, "a": [1, 2.0, null, true]}"#
        );
        assert_eq!(
            t("{{ messages[0].content | tojson }}"),
            r#""héllo \"w\" <b>&'\n""#
        );
        assert_eq!(
            t("{{ messages[0] | tojson }}"),
            r#"{"role": "user", "content": "héllo \"w\" <b>&'\n"}"#
        );
        assert_eq!(
            t("{{ {'a': [1, {'b': []}], 'c': {}} | tojson(indent=2) }}"),
            "{\n  \"a\": [\n    1,\n    {\n      \"b\": []\n    }\n  ],\n  \"c\": {}\n}"
        );
        assert_eq!(t("{{ [1] | tojson(indent='\t') }}"), "[\n\t1\n]");
        assert_eq!(
            t("{{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }}"),
            r#"{"a": 2, "b": 1}"#
        );
        assert_eq!(
            t("{{ {'a': [1, 2]} | tojson(separators=(',', ':')) }}"),
            r#"{"a":[1,2]}"#
        );
        assert_eq!(
            t("{{ 'é😀' | tojson(ensure_ascii=true) }}"),
            r#""\u00e9\ud83d\ude00""#
        );
        assert_eq!(t("{{ 'é' | tojson(true) }}"), r#""\u00e9""#);
        assert_eq!(t("{{ '\x01\x08\x0c\t' | tojson }}"), r#""\u0001\b\f\t""#);
        assert_eq!(
            t("{{ {1: 'x', none: 'y'} | tojson }}"),
            r#"{"1": "x", "null": "y"}"#
        );
        assert_eq!(t("{{ 1e20 | tojson }}"), "1e+20");
        assert_eq!(t("{{ [] | tojson(indent=4) }}"), "[]");
        assert!(render_src("{{ nothing | tojson }}", &[]).is_err());
        assert!(render_src("{{ 1 | tojson(bogus=1) }}", &[]).is_err());
    }

    #[test]
    fn tojson_keeps_extra_context_key_order() {
        let t = ChatTemplate::new("{{ tools | tojson }}", "", "").unwrap();
        let extra: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
            r#"{"tools": [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {}}}]}"#,
        )
        .unwrap();
        assert_eq!(
            t.render_with_context(&[], false, &extra).unwrap(),
            r#"[{"type": "function", "function": {"name": "f", "description": "d", "parameters": {}}}]"#
        );
    }
}
