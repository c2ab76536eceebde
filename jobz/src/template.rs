//! `{param}` templates: commands, semaphore keys.
//!
//! Syntax follows Python's `str.format` as the original jobz used it: `{name}` is a
//! placeholder, `{{` and `}}` are literal braces. In commands every value is shell-quoted,
//! so no value can add words, redirections or substitutions to what the job file names.

use std::collections::BTreeMap;

use thiserror::Error;

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Param(String),
}

/// A template that cannot be parsed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TemplateError {
    /// `{` without a matching `}`.
    #[error("unclosed '{{' at byte {0}")]
    Unclosed(usize),
    /// `}` without a preceding `{` (write `}}` for a literal brace).
    #[error("unmatched '}}' at byte {0} (write '}}}}' for a literal brace)")]
    Unmatched(usize),
    /// `{}` or a name with characters other than letters, digits and `_`.
    #[error("bad placeholder name {0:?} (letters, digits and '_' only)")]
    BadName(String),
}

/// A template that cannot be rendered with the given values.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RenderError {
    /// A placeholder has no value.
    #[error("no value for parameter {0:?}")]
    Missing(String),
    /// A value cannot be passed to a shell (it contains a NUL byte).
    #[error("value of parameter {0:?} cannot be shell-quoted (NUL byte)")]
    Unquotable(String),
}

impl Template {
    /// Parses a template.
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, c)| c) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().map(|&(_, c)| c) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some((_, '}')) => break,
                            Some((_, c)) => name.push(c),
                            None => return Err(TemplateError::Unclosed(at)),
                        }
                    }
                    if name.is_empty()
                        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    {
                        return Err(TemplateError::BadName(name));
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Param(name));
                }
                '}' => return Err(TemplateError::Unmatched(at)),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Template { parts })
    }

    /// Names of the placeholders, in order of first use, without repeats.
    pub fn params(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for part in &self.parts {
            if let Part::Param(name) = part {
                if !names.contains(&name.as_str()) {
                    names.push(name);
                }
            }
        }
        names
    }

    /// Renders for `/bin/sh -c`: every value becomes one shell word, quoted.
    pub fn render_shell(&self, values: &BTreeMap<String, String>) -> Result<String, RenderError> {
        self.render_with(values, |name, value| {
            shlex::try_quote(value)
                .map(|q| q.into_owned())
                .map_err(|_| RenderError::Unquotable(name.to_owned()))
        })
    }

    /// Renders values as they are (for keys and names, never for a shell).
    pub fn render_plain(&self, values: &BTreeMap<String, String>) -> Result<String, RenderError> {
        self.render_with(values, |_, value| Ok(value.to_owned()))
    }

    fn render_with(
        &self,
        values: &BTreeMap<String, String>,
        mut value_text: impl FnMut(&str, &str) -> Result<String, RenderError>,
    ) -> Result<String, RenderError> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Param(name) => {
                    let value = values
                        .get(name)
                        .ok_or_else(|| RenderError::Missing(name.clone()))?;
                    out.push_str(&value_text(name, value)?);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_placeholders_and_escaped_braces() {
        let t = Template::parse("a {x} {{lit}} {y}{x}").unwrap();
        assert_eq!(t.params(), vec!["x", "y"]);
        assert_eq!(
            t.render_plain(&values(&[("x", "1"), ("y", "2")])).unwrap(),
            "a 1 {lit} 21"
        );
    }

    #[test]
    fn rejects_malformed_templates() {
        assert_eq!(Template::parse("a {x"), Err(TemplateError::Unclosed(2)));
        assert_eq!(Template::parse("a }"), Err(TemplateError::Unmatched(2)));
        assert!(matches!(
            Template::parse("{}"),
            Err(TemplateError::BadName(_))
        ));
        assert!(matches!(
            Template::parse("{a b}"),
            Err(TemplateError::BadName(_))
        ));
    }

    #[test]
    fn shell_rendering_quotes_every_value_as_one_word() {
        let t = Template::parse("echo {v}").unwrap();
        for hostile in ["; rm -rf /", "$(id)", "`id`", "a'b\"c", "x\ny", "", "a b"] {
            let cmd = t.render_shell(&values(&[("v", hostile)])).unwrap();
            let words = shlex::split(&cmd).unwrap();
            assert_eq!(
                words,
                vec!["echo".to_string(), hostile.to_string()],
                "{cmd}"
            );
        }
    }

    #[test]
    fn missing_and_nul_values_are_errors() {
        let t = Template::parse("echo {v}").unwrap();
        assert_eq!(
            t.render_shell(&values(&[])),
            Err(RenderError::Missing("v".into()))
        );
        assert_eq!(
            t.render_shell(&values(&[("v", "a\0b")])),
            Err(RenderError::Unquotable("v".into()))
        );
    }
}
