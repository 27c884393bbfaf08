//! Step 2 of loading: every scalar of the YAML tree becomes text with `${NAME}` and
//! `${NAME:-default}` replaced from the environment, so the types are converted afterwards.

use serde_norway::Value;

/// Turns every scalar into text with `${VAR}` expanded. Returns the key path and message of the
/// first error.
pub(super) fn expand_tree(
    value: &mut Value,
    path: &mut Vec<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), (String, String)> {
    match value {
        Value::Mapping(map) => {
            for (key, child) in map.iter_mut() {
                let name = match key {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => return Err((join(path), "keys must be plain scalars".into())),
                };
                path.push(name);
                expand_tree(child, path, env)?;
                path.pop();
            }
            // Keys that YAML read as numbers or booleans are text too.
            let entries = std::mem::take(map);
            for (key, child) in entries {
                let key = match key {
                    Value::Number(n) => Value::String(n.to_string()),
                    Value::Bool(b) => Value::String(b.to_string()),
                    other => other,
                };
                map.insert(key, child);
            }
        }
        Value::Sequence(items) => {
            for (index, item) in items.iter_mut().enumerate() {
                path.push(index.to_string());
                expand_tree(item, path, env)?;
                path.pop();
            }
        }
        Value::String(text) => {
            *text = expand_vars(text, env).map_err(|message| (join(path), message))?;
        }
        Value::Number(number) => *value = Value::String(number.to_string()),
        Value::Bool(flag) => *value = Value::String(flag.to_string()),
        Value::Null => {}
        Value::Tagged(_) => return Err((join(path), "YAML tags are not supported".into())),
    }
    Ok(())
}

pub(super) fn join(path: &[String]) -> String {
    if path.is_empty() {
        ".".to_owned()
    } else {
        path.join(".")
    }
}

/// Expands `${NAME}` and `${NAME:-default}` in `text`. `$$` is a literal `$`; any other `$` is
/// kept as is.
///
/// # Errors
/// An unset variable without a default, an unterminated `${`, or a bad variable name.
pub fn expand_vars(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| format!("unterminated ${{ in {text:?}"))?;
            let inner = &body[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (inner, None),
            };
            let valid = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!("bad variable name {name:?} in ${{{inner}}}"));
            }
            match (env(name), default) {
                (Some(value), Some(default)) if value.is_empty() => out.push_str(default),
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => {
                    return Err(format!("environment variable {name} is not set"));
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}
