//! Keeping secrets out of every output.
//!
//! Database URLs are shown with their password replaced by `***`, and every text the process
//! writes (results, errors, logs, the summary file) passes through [`redact`], which also
//! removes any registered secret wherever it appears: belt and braces for messages from
//! drivers that might echo what they were given.

use std::borrow::Cow;
use std::sync::RwLock;

static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Shortest secret scrubbed from free text: shorter ones would mangle ordinary words. The
/// URL itself is always shown redacted, whatever the password's length.
const MIN_SCRUB_LEN: usize = 4;

/// What replaces a secret.
pub const MASK: &str = "***";

/// Registers a secret (and its percent-decoded form) to be removed from all output.
pub fn register_secret(secret: &str) {
    let mut forms = vec![secret.to_string()];
    let decoded = percent_decode(secret);
    if decoded != secret {
        forms.push(decoded);
    }
    let Ok(mut secrets) = SECRETS.write() else {
        return;
    };
    for s in forms {
        if s.len() >= MIN_SCRUB_LEN && !secrets.contains(&s) {
            secrets.push(s);
        }
    }
    // Longest first, so a secret containing another is removed whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
}

/// Removes every registered secret from `text`.
pub fn redact(text: &str) -> Cow<'_, str> {
    let Ok(secrets) = SECRETS.read() else {
        return Cow::Owned(String::from(
            "<output withheld: secret registry unavailable>",
        ));
    };
    if !secrets.iter().any(|s| text.contains(s.as_str())) {
        return Cow::Borrowed(text);
    }
    let mut out = text.to_string();
    for s in secrets.iter() {
        out = out.replace(s.as_str(), MASK);
    }
    Cow::Owned(out)
}

/// Query parameters whose values are secrets.
fn is_secret_param(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    matches!(
        k.as_str(),
        "password" | "pass" | "pwd" | "sslpassword" | "passfile"
    ) || k.contains("secret")
        || k.contains("token")
}

/// Registers the secrets in a database URL and returns it with them masked:
/// `postgres://app:***@db:5432/orders?sslmode=require`.
pub fn redact_url(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    match head.split_once("://") {
        Some((scheme, rest)) => {
            let auth_end = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(auth_end);
            out.push_str(scheme);
            out.push_str("://");
            match authority.rsplit_once('@') {
                Some((userinfo, host)) => {
                    match userinfo.split_once(':') {
                        Some((user, password)) => {
                            register_secret(password);
                            out.push_str(user);
                            out.push(':');
                            out.push_str(MASK);
                        }
                        None => out.push_str(userinfo),
                    }
                    out.push('@');
                    out.push_str(host);
                }
                None => out.push_str(authority),
            }
            out.push_str(path);
        }
        None => out.push_str(head),
    }
    if let Some(query) = query {
        out.push('?');
        let mut first = true;
        for pair in query.split('&') {
            if !first {
                out.push('&');
            }
            first = false;
            match pair.split_once('=') {
                Some((k, v)) if is_secret_param(k) => {
                    register_secret(v);
                    out.push_str(k);
                    out.push('=');
                    out.push_str(MASK);
                }
                _ => out.push_str(pair),
            }
        }
    }
    out
}

/// Decodes `%XX` escapes (invalid escapes are kept as written).
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_masked_and_their_secrets_scrubbed_everywhere() {
        let url = "postgres://app:S3cr%40t-pw@db.example:5432/orders?sslmode=require&password=Other-Secret";
        let shown = redact_url(url);
        assert_eq!(
            shown,
            "postgres://app:***@db.example:5432/orders?sslmode=require&password=***"
        );
        assert_eq!(
            redact("auth failed for S3cr@t-pw and S3cr%40t-pw"),
            "auth failed for *** and ***"
        );
        assert_eq!(redact("also Other-Secret here"), "also *** here");
        assert_eq!(redact("nothing to hide"), "nothing to hide");
    }

    #[test]
    fn urls_without_passwords_are_unchanged() {
        for url in [
            "postgres://app@db/orders",
            "postgres://db/orders",
            "sqlite:app.db",
            "sqlite::memory:",
            "sqlite://./data/app.db?mode=rwc",
        ] {
            assert_eq!(redact_url(url), url);
        }
    }

    #[test]
    fn percent_decoding_tolerates_bad_escapes() {
        assert_eq!(percent_decode("a%20b%zz%4"), "a b%zz%4");
        assert_eq!(percent_decode("%"), "%");
    }
}
