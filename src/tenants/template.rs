//! `{{field}}` placeholders in custom recipes: listing them (for validation) and rendering.

use zeroize::Zeroizing;

use crate::tenants::Credentials;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    #[error("unclosed {{{{ placeholder")]
    Unclosed,
    #[error("placeholder names must match [A-Za-z_][A-Za-z0-9_]*")]
    BadName,
    #[error("no credential field named {0}")]
    Missing(String),
}

/// Splits `s` into literal text and placeholder names.
fn parts(s: &str) -> Result<Vec<(bool, &str)>, TemplateError> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find("{{") {
        out.push((false, &rest[..start]));
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or(TemplateError::Unclosed)?;
        let name = after[..end].trim();
        let b = name.as_bytes();
        if b.is_empty()
            || !(b[0].is_ascii_alphabetic() || b[0] == b'_')
            || !b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
        {
            return Err(TemplateError::BadName);
        }
        out.push((true, name));
        rest = &after[end + 2..];
    }
    out.push((false, rest));
    Ok(out)
}

/// The placeholder names `s` uses.
pub fn placeholders(s: &str) -> Result<Vec<&str>, TemplateError> {
    Ok(parts(s)?
        .into_iter()
        .filter_map(|(is_name, t)| is_name.then_some(t))
        .collect())
}

/// Replaces every placeholder with its credential value.
pub fn render(s: &str, creds: &Credentials) -> Result<Zeroizing<String>, TemplateError> {
    let mut out = Zeroizing::new(String::with_capacity(s.len() + 32));
    for (is_name, t) in parts(s)? {
        if is_name {
            out.push_str(
                creds
                    .get(t)
                    .ok_or_else(|| TemplateError::Missing(t.to_owned()))?,
            );
        } else {
            out.push_str(t);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;
    use std::collections::BTreeMap;

    fn creds() -> Credentials {
        Credentials::new(BTreeMap::from([
            ("id".to_string(), SecretString::from("abc")),
            ("secret".to_string(), SecretString::from("s{{x}}")),
        ]))
    }

    #[test]
    fn renders_and_lists() {
        assert_eq!(
            placeholders("Bearer {{ secret }}-{{id}}").unwrap(),
            ["secret", "id"]
        );
        assert_eq!(
            &*render("k={{id}}&s={{secret}}", &creds()).unwrap(),
            "k=abc&s=s{{x}}"
        );
        assert_eq!(&*render("plain", &creds()).unwrap(), "plain");
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(placeholders("{{id").unwrap_err(), TemplateError::Unclosed);
        assert_eq!(placeholders("{{}}").unwrap_err(), TemplateError::BadName);
        assert_eq!(placeholders("{{a-b}}").unwrap_err(), TemplateError::BadName);
        assert_eq!(
            render("{{nope}}", &creds()).unwrap_err(),
            TemplateError::Missing("nope".into())
        );
    }
}
