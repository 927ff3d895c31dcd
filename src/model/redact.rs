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
    // As it appears inside JSON strings (quotes and backslashes escaped).
    for f in forms.clone() {
        if let Ok(json) = serde_json::to_string(&f) {
            let inner = &json[1..json.len() - 1];
            if inner != f {
                forms.push(inner.to_string());
            }
        }
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

/// True for a URL scheme (`postgres`, `sqlite`, ...).
pub fn is_scheme(s: &str) -> bool {
    s.len() <= 32
        && s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '.' | '-'))
}

/// What is shown instead of something that is not a URL (it may be a key=value connection
/// string, or a password pasted into the wrong variable).
pub const NOT_A_URL: &str = "<database URL not shown: it is not a URL>";

/// Registers the secrets in a database URL and returns it with them masked:
/// `postgres://app:***@db:5432/orders?sslmode=require`. Anything that does not parse as a
/// URL is not shown at all, and its `password=` values (and the whole text) are registered.
pub fn redact_url(url: &str) -> String {
    let url = url.trim();
    if let Some((scheme, rest)) = url.split_once("://") {
        if !is_scheme(scheme) {
            return opaque(url);
        }
        let mut out = format!("{scheme}://");
        // The user information ends at the last `@`: a password with an unencoded `@`, `/`
        // or `?` must still be masked whole (over-masking a path is the safe mistake).
        let rest = match rest.rfind('@') {
            Some(at) => {
                let userinfo = &rest[..at];
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
                &rest[at + 1..]
            }
            None => rest,
        };
        out.push_str(&redact_query(rest));
        return out;
    }
    match url.split_once(':') {
        Some((scheme, rest)) if is_scheme(scheme) => format!("{scheme}:{}", redact_query(rest)),
        _ => opaque(url),
    }
}

fn redact_query(s: &str) -> String {
    let Some((head, query)) = s.split_once('?') else {
        return s.to_string();
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if is_secret_param(k) => {
                register_secret(v);
                format!("{k}={MASK}")
            }
            _ => pair.to_string(),
        })
        .collect();
    format!("{head}?{}", pairs.join("&"))
}

fn opaque(text: &str) -> String {
    register_secret(text);
    // A mistyped URL (`postgres//user:pw@host`): what follows the user name.
    if let Some(at) = text.rfind('@') {
        let before = &text[..at];
        let userinfo = before.rsplit('/').next().unwrap_or(before);
        if let Some((_, password)) = userinfo.split_once(':') {
            register_secret(password);
        }
    }
    // libpq-style `password=x` / `password = 'x y'` pairs.
    let lower = text.to_ascii_lowercase();
    let mut from = 0;
    while let Some(i) = lower[from..].find("password") {
        let after = &text[from + i + "password".len()..];
        let value = after.trim_start().strip_prefix('=').map(str::trim_start);
        if let Some(v) = value {
            let secret = match v.strip_prefix('\'') {
                Some(q) => q.split('\'').next().unwrap_or_default(),
                None => v.split_whitespace().next().unwrap_or_default(),
            };
            register_secret(secret);
        }
        from += i + "password".len();
    }
    NOT_A_URL.to_string()
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
    fn malformed_urls_and_key_value_strings_are_never_shown() {
        let shown = redact_url("host=db user=app password=hunter22 dbname=x");
        assert_eq!(shown, NOT_A_URL);
        assert_eq!(redact("echo: hunter22"), "echo: ***");
        assert_eq!(redact_url("postgres//app:pw-typo-123@db/x"), NOT_A_URL);
        assert_eq!(redact("pw-typo-123"), "***");
        // Unencoded `/`, `?` and `@` in a password are masked whole.
        assert_eq!(
            redact_url("postgres://app:ab/c?d@e@db/x"),
            "postgres://app:***@db/x"
        );
        assert_eq!(redact("ab/c?d@e"), "***");
        redact_url("postgres://app:q\"uo\\te@db/x");
        assert_eq!(
            redact(&serde_json::to_string("q\"uo\\te").unwrap()),
            "\"***\""
        );
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
