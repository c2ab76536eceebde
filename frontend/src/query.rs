//! Strict percent-decoding of request-target components and of the query string; the
//! target as a whole is read by [`crate::route`], which uses these.
//!
//! Parameter values end up in shell commands (shell-quoted by the worker, validated by the
//! broker), so nothing here is lenient. The rules:
//! - the target is at most [`MAX_TARGET_BYTES`] (longer: 414);
//! - the query is split on `&`, each piece at its first `=` (no `=`: the value is empty);
//!   a piece that is empty (`a=1&&b=2`, a trailing `&`) is skipped;
//! - `+` means a space, then `%XX` escapes are decoded; a `%` not followed by two hex digits
//!   is an error (never taken literally), and so is a result that is not UTF-8 (never
//!   replaced by U+FFFD);
//! - an empty key and a repeated key are errors.
//!
//! Path segments are decoded the same way except that `+` stays a `+`.

use std::collections::BTreeMap;

use percent_encoding::percent_decode_str;
use thiserror::Error;

/// Longest request target (path and query) accepted.
pub const MAX_TARGET_BYTES: usize = 64 * 1024;

/// Decoded query parameters, by name.
pub type QueryParams = BTreeMap<String, String>;

/// Why a request target was refused. Every variant maps to a 4xx answer.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum TargetError {
    /// The target is longer than [`MAX_TARGET_BYTES`] (414).
    #[error("request target of {len} bytes exceeds the limit of {MAX_TARGET_BYTES}")]
    TooLong {
        /// Its length.
        len: usize,
    },
    /// Neither `/path` nor `http://host/path`.
    #[error("request target must be /path or http(s)://host/path")]
    NotOriginForm,
    /// A `%` not followed by two hex digits.
    #[error("bad percent-escape {escape:?} in {what} (a '%' must be followed by two hex digits)")]
    BadEscape {
        /// The offending text, up to three characters.
        escape: String,
        /// Where: `the path`, `a parameter name`, `the value of parameter "x"`.
        what: String,
    },
    /// The decoded bytes are not UTF-8.
    #[error("{what} is not valid UTF-8 after percent-decoding")]
    NotUtf8 {
        /// Where, as for `BadEscape`.
        what: String,
    },
    /// `=value` with nothing before the `=`.
    #[error("empty parameter name in the query string")]
    EmptyKey,
    /// The same key twice.
    #[error("parameter {0:?} is given more than once")]
    Repeated(String),
}

impl TargetError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            TargetError::TooLong { .. } => 414,
            _ => 400,
        }
    }
}

/// Parses a query string (without the `?`) by the rules in the module documentation.
pub fn parse_query(raw: &str) -> Result<QueryParams, TargetError> {
    let mut params = QueryParams::new();
    for piece in raw.split('&') {
        if piece.is_empty() {
            continue;
        }
        let (raw_key, raw_value) = piece.split_once('=').unwrap_or((piece, ""));
        let key = decode(raw_key, true, "a parameter name")?;
        if key.is_empty() {
            return Err(TargetError::EmptyKey);
        }
        let value = decode(raw_value, true, &format!("the value of parameter {key:?}"))?;
        if params.contains_key(&key) {
            return Err(TargetError::Repeated(key));
        }
        params.insert(key, value);
    }
    Ok(params)
}

/// Decodes one component strictly: bad escapes and non-UTF-8 results are errors.
/// `what` names the component in the error (`the path`, `a parameter name`).
pub(crate) fn decode(raw: &str, plus_is_space: bool, what: &str) -> Result<String, TargetError> {
    let bytes = raw.as_bytes();
    let mut i = 0;
    while let Some(offset) = bytes[i..].iter().position(|&b| b == b'%') {
        let at = i + offset;
        let valid = bytes.len() >= at + 3
            && bytes[at + 1].is_ascii_hexdigit()
            && bytes[at + 2].is_ascii_hexdigit();
        if !valid {
            let escape = raw[at..].chars().take(3).collect();
            return Err(TargetError::BadEscape {
                escape,
                what: what.to_owned(),
            });
        }
        i = at + 3;
    }
    let spaced;
    let raw = if plus_is_space && raw.contains('+') {
        spaced = raw.replace('+', " ");
        &spaced
    } else {
        raw
    };
    let decoded: Vec<u8> = percent_decode_str(raw).collect();
    String::from_utf8(decoded).map_err(|_| TargetError::NotUtf8 {
        what: what.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(raw: &str) -> Result<QueryParams, TargetError> {
        parse_query(raw)
    }

    fn one(raw: &str) -> String {
        q(&format!("v={raw}")).unwrap()["v"].clone()
    }

    #[test]
    fn splits_on_ampersand_then_first_equals() {
        let p = q("job_name=build&date=2026_01_02&expr=a=b").unwrap();
        assert_eq!(p["job_name"], "build");
        assert_eq!(p["date"], "2026_01_02");
        assert_eq!(p["expr"], "a=b");
    }

    #[test]
    fn key_without_equals_has_empty_value_and_empty_pieces_are_skipped() {
        let p = q("&a&&b=&").unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p["a"], "");
        assert_eq!(p["b"], "");
        assert!(q("").unwrap().is_empty());
    }

    #[test]
    fn plus_is_space_but_encoded_plus_is_plus() {
        assert_eq!(one("a+b"), "a b");
        assert_eq!(one("a%2Bb"), "a+b");
        assert_eq!(q("my+key=1").unwrap()["my key"], "1");
    }

    #[test]
    fn hostile_shell_text_is_passed_through_verbatim() {
        // The frontend does not judge values (the broker's patterns do); it must only
        // deliver exactly what was sent.
        assert_eq!(one("%3Brm%20-rf%20%2F"), ";rm -rf /");
        assert_eq!(one(";rm+-rf+/"), ";rm -rf /");
        assert_eq!(one("$(id)"), "$(id)");
        assert_eq!(one("%24%28id%29"), "$(id)");
        assert_eq!(one("`id`"), "`id`");
        assert_eq!(one("%60id%60"), "`id`");
        assert_eq!(one("'\"'%22%27"), "'\"'\"'");
        assert_eq!(one("a%0ab%0d%0Ac"), "a\nb\r\nc");
        assert_eq!(one("%00"), "\0");
        assert_eq!(one("caf%C3%A9"), "café");
    }

    #[test]
    fn long_values_survive_intact() {
        let value = "x".repeat(10_000);
        assert_eq!(one(&value), value);
        let encoded = "%41".repeat(2_000);
        assert_eq!(one(&encoded), "A".repeat(2_000));
    }

    #[test]
    fn non_utf8_is_refused_not_replaced() {
        let err = q("date=%ff%fe").unwrap_err();
        assert_eq!(
            err,
            TargetError::NotUtf8 {
                what: "the value of parameter \"date\"".into()
            }
        );
        assert_eq!(err.status(), 400);
        assert!(matches!(q("%ff=1"), Err(TargetError::NotUtf8 { .. })));
        // A truncated multi-byte sequence.
        assert!(matches!(q("v=%C3"), Err(TargetError::NotUtf8 { .. })));
    }

    #[test]
    fn bad_escapes_are_refused_not_taken_literally() {
        for raw in ["v=%zz", "v=%", "v=%4", "v=abc%", "v=%%41", "v=%g0", "%zz=1"] {
            let err = q(raw).unwrap_err();
            assert!(matches!(err, TargetError::BadEscape { .. }), "{raw}: {err}");
            assert_eq!(err.status(), 400);
        }
        let err = q("v=ab%zzcd").unwrap_err();
        assert_eq!(
            err.to_string(),
            "bad percent-escape \"%zz\" in the value of parameter \"v\" (a '%' must be followed by two hex digits)"
        );
    }

    #[test]
    fn bad_escape_at_a_multibyte_character_does_not_panic() {
        assert!(matches!(
            q("v=%é"),
            Err(TargetError::BadEscape { escape, .. }) if escape == "%é"
        ));
        assert!(matches!(q("v=%aé"), Err(TargetError::BadEscape { .. })));
    }

    #[test]
    fn empty_and_repeated_keys_are_refused() {
        assert_eq!(q("=1").unwrap_err(), TargetError::EmptyKey);
        assert_eq!(q("a=1&=2").unwrap_err(), TargetError::EmptyKey);
        assert_eq!(
            q("a=1&b=2&a=3").unwrap_err(),
            TargetError::Repeated("a".into())
        );
        // Repetition is judged after decoding.
        assert_eq!(
            q("a=1&%61=2").unwrap_err(),
            TargetError::Repeated("a".into())
        );
    }
}
