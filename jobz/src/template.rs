//! `{param}` templates: commands, semaphore keys.
//!
//! Syntax follows Python's `str.format` as the original jobz used it: `{name}` is a
//! placeholder, `{{` and `}}` are literal braces. In commands every value is shell-quoted,
//! so no value can add words, redirections or substitutions to what the job file names;
//! that holds only where the shell reads a quoted word as one, so a command with a
//! placeholder inside quotes (`'value={x}'`, the original jobz style), a comment or a
//! here-document is refused ([`Template::check_shell_placement`]).

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

    /// Checks that every placeholder stands where `/bin/sh` reads its shell-quoted value as
    /// one literal word: outside any quotes, backquotes, comment or here-document, and not
    /// right after a backslash or `$`. Inside `$(…)` is fine (`echo "$(cat {f})"`).
    pub fn check_shell_placement(&self) -> Result<(), MisplacedPlaceholder> {
        let mut scan = ShellScan::default();
        for part in &self.parts {
            match part {
                Part::Literal(text) => text.chars().for_each(|c| scan.char(c)),
                Part::Param(name) => {
                    if let Some(placement) = scan.placeholder() {
                        return Err(MisplacedPlaceholder {
                            name: name.clone(),
                            placement,
                            line: scan.line,
                        });
                    }
                }
            }
        }
        Ok(())
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

// ---- Where a placeholder may stand in a command -----------------------------------------

/// Where a placeholder stands in a command, when a shell-quoted value there would not be
/// one literal word as `/bin/sh` reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misplacement {
    /// `'…{x}…'`: the value's own quotes end the author's, so the value is read unquoted.
    SingleQuotes,
    /// `"…{x}…"`: the value's quotes are literal there, and `$(…)` in it would run.
    DoubleQuotes,
    /// `$'…{x}…'`.
    DollarQuotes,
    /// `` `…{x}…` ``: the text is parsed again, backslashes and all.
    Backquotes,
    /// `\{x}`: the backslash makes the value's opening quote literal.
    AfterBackslash,
    /// `${x}` and the like: the value would become a variable name or `$'…'` quoting.
    AfterDollar,
    /// `# …{x}`: a newline in the value would end the comment and start a command.
    Comment,
    /// In a here-document's body or delimiter: the value's quotes are literal there, `$(…)`
    /// in it would run, and a line of it could end the document early.
    HereDocument,
}

impl Misplacement {
    fn describe(self) -> &'static str {
        match self {
            Misplacement::SingleQuotes => "inside single quotes",
            Misplacement::DoubleQuotes => "inside double quotes",
            Misplacement::DollarQuotes => "inside $'...' quotes",
            Misplacement::Backquotes => "inside backquotes",
            Misplacement::AfterBackslash => "right after a backslash",
            Misplacement::AfterDollar => "right after a `$`",
            Misplacement::Comment => "inside a comment",
            Misplacement::HereDocument => "inside a here-document",
        }
    }

    fn advice(self, name: &str) -> String {
        let env = format!("$JOBZ_PARAM_{}", name.to_ascii_uppercase());
        match self {
            Misplacement::SingleQuotes
            | Misplacement::DoubleQuotes
            | Misplacement::DollarQuotes => format!(
                "drop the quotes around it, every value is already shell-quoted as one word \
                 (to join it to quoted text, end the quote before it: \"text \"{{{name}}}; \
                 or write \"{env}\" inside double quotes)"
            ),
            Misplacement::Backquotes => "use $(...) instead of backquotes".into(),
            Misplacement::AfterBackslash => "drop the backslash".into(),
            Misplacement::AfterDollar => {
                format!("for the shell's own ${{{name}}}, double the braces: ${{{{{name}}}}}")
            }
            Misplacement::Comment => "take it out of the comment".into(),
            Misplacement::HereDocument => {
                format!("pass it as an argument, or write {env} in the here-document")
            }
        }
    }
}

/// A placeholder that stands where its shell-quoted value would not be one literal word.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("placeholder {{{name}}} is {}: {}", .placement.describe(), .placement.advice(.name))]
pub struct MisplacedPlaceholder {
    /// The placeholder's name.
    pub name: String,
    /// Where it stands.
    pub placement: Misplacement,
    /// Its line within the template, from 0.
    pub line: usize,
}

/// What the shell is inside of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Nest {
    /// `$(…)` with its open parentheses, read like the top level. After a `case` word its
    /// patterns' `)` cannot be told from the closing one, so it is then never closed: a
    /// reading that stays inside too long only refuses more.
    Substitution {
        parens: u32,
        saw_case: bool,
    },
    /// `${…}` outside quotes: read like the top level, up to its `}`.
    Brace,
    Single,
    Double,
    DollarSingle,
    Backquote,
    /// `${…}` inside double quotes.
    BraceInDouble,
}

impl Nest {
    /// Where a placeholder inside this quote would stand; `None` if this is not a quote.
    fn quote(self) -> Option<Misplacement> {
        match self {
            Nest::Single => Some(Misplacement::SingleQuotes),
            Nest::Double | Nest::BraceInDouble => Some(Misplacement::DoubleQuotes),
            Nest::DollarSingle => Some(Misplacement::DollarQuotes),
            Nest::Backquote => Some(Misplacement::Backquotes),
            Nest::Substitution { .. } | Nest::Brace => None,
        }
    }
}

/// A here-document whose body starts at the next unquoted newline.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HereDoc {
    delimiter: String,
    strip_tabs: bool,
}

/// The delimiter word after `<<`, while it is read.
#[derive(Debug, Default)]
struct Delimiter {
    word: Option<String>,
    strip_tabs: bool,
    quote: Option<char>,
}

/// A reader of POSIX `sh` quoting, enough to know where each placeholder stands: quotes,
/// escapes, `$(…)`, `${…}`, backquotes, comments and here-documents, not the grammar. Where
/// it cannot tell, it errs towards refusing.
#[derive(Debug, Default)]
struct ShellScan {
    nest: Vec<Nest>,
    escaped: bool,
    dollar: bool,
    /// Right after an unquoted `${`.
    dollar_brace: bool,
    less: bool,
    /// True unless the previous character continues a word (`#` starts a comment only here).
    inside_word: bool,
    /// The unquoted letters of the current word, to see `case`.
    word: String,
    comment: bool,
    delimiter: Option<Delimiter>,
    pending: Vec<HereDoc>,
    /// Inside a here-document's body: which one, and its current line so far.
    body: Option<(HereDoc, String)>,
    line: usize,
}

impl ShellScan {
    /// Where a placeholder at this point would stand, if somewhere it must not.
    fn placeholder(&mut self) -> Option<Misplacement> {
        let misplaced = self.misplacement();
        // The value is a word of its own making: what came before it is settled.
        (self.escaped, self.dollar, self.dollar_brace) = (false, false, false);
        (self.less, self.inside_word) = (false, true);
        self.word.clear();
        misplaced
    }

    fn misplacement(&self) -> Option<Misplacement> {
        if self.body.is_some() || self.delimiter.is_some() {
            return Some(Misplacement::HereDocument);
        }
        if self.comment {
            return Some(Misplacement::Comment);
        }
        if let Some(quote) = self.nest.last().and_then(|n| n.quote()) {
            return Some(quote);
        }
        // Unquoted here, unless a `case` may have hidden where a `$(…)` inside quotes ended.
        if let Some(at) = self.nest.iter().rposition(|n| n.quote().is_some()) {
            let unsure = self.nest[at..]
                .iter()
                .any(|n| matches!(n, Nest::Substitution { saw_case: true, .. }));
            if unsure {
                return self.nest[at].quote();
            }
        }
        if self.escaped {
            Some(Misplacement::AfterBackslash)
        } else if self.dollar || self.dollar_brace {
            Some(Misplacement::AfterDollar)
        } else {
            None
        }
    }

    fn char(&mut self, c: char) {
        if c == '\n' {
            self.line += 1;
        }
        if self.body.is_some() {
            return self.body_char(c);
        }
        if self.comment {
            if c == '\n' {
                self.comment = false;
                self.newline();
            }
            return;
        }
        if self.delimiter.is_some() && self.delimiter_char(c) {
            return;
        }
        match self.nest.last().copied() {
            Some(Nest::Single) => {
                if c == '\'' {
                    self.nest.pop();
                }
            }
            Some(Nest::DollarSingle) => self.escapable_until(c, '\''),
            Some(Nest::Backquote) => self.escapable_until(c, '`'),
            Some(nest @ (Nest::Double | Nest::BraceInDouble)) => self.double_char(c, nest),
            None | Some(Nest::Substitution { .. } | Nest::Brace) => self.unquoted_char(c),
        }
    }

    /// Inside `$'…'` or backquotes: a backslash escapes the next character.
    fn escapable_until(&mut self, c: char, end: char) {
        if std::mem::take(&mut self.escaped) {
            return;
        }
        if c == '\\' {
            self.escaped = true;
        } else if c == end {
            self.nest.pop();
        }
    }

    fn double_char(&mut self, c: char, nest: Nest) {
        if std::mem::take(&mut self.escaped) {
            return;
        }
        if std::mem::take(&mut self.dollar) {
            match c {
                '(' => return self.open_substitution(),
                '{' => return self.nest.push(Nest::BraceInDouble),
                _ => {}
            }
        }
        match c {
            '\\' => self.escaped = true,
            '$' => self.dollar = true,
            '`' => self.nest.push(Nest::Backquote),
            '"' if nest == Nest::Double => {
                self.nest.pop();
            }
            '"' => self.nest.push(Nest::Double),
            '}' if nest == Nest::BraceInDouble => {
                self.nest.pop();
            }
            _ => {}
        }
    }

    fn unquoted_char(&mut self, c: char) {
        let inside_word = std::mem::replace(&mut self.inside_word, true);
        let less = std::mem::take(&mut self.less);
        self.dollar_brace = false;
        if c.is_ascii_alphabetic() && !self.escaped && !self.dollar {
            self.word.push(c);
        } else {
            self.end_word();
        }
        if std::mem::take(&mut self.escaped) {
            return;
        }
        if std::mem::take(&mut self.dollar) {
            match c {
                '\'' => return self.nest.push(Nest::DollarSingle),
                '(' => return self.open_substitution(),
                '{' => {
                    self.dollar_brace = true;
                    return self.nest.push(Nest::Brace);
                }
                _ => {}
            }
        }
        match c {
            '\\' => self.escaped = true,
            '\'' => self.nest.push(Nest::Single),
            '"' => self.nest.push(Nest::Double),
            '`' => self.nest.push(Nest::Backquote),
            '$' => self.dollar = true,
            '#' if !inside_word => self.comment = true,
            '<' if less => self.delimiter = Some(Delimiter::default()),
            '<' => {
                self.less = true;
                self.inside_word = false;
            }
            '}' if self.nest.last() == Some(&Nest::Brace) => {
                self.nest.pop();
            }
            '(' | ')' => {
                self.inside_word = false;
                if let Some(Nest::Substitution { parens, saw_case }) = self.nest.last_mut() {
                    match c {
                        '(' => *parens += 1,
                        _ if *saw_case => {}
                        _ => {
                            *parens -= 1;
                            if *parens == 0 {
                                self.nest.pop();
                            }
                        }
                    }
                }
            }
            '\n' => {
                self.inside_word = false;
                self.newline();
            }
            ' ' | '\t' | ';' | '&' | '|' | '>' => self.inside_word = false,
            _ => {}
        }
    }

    fn open_substitution(&mut self) {
        self.inside_word = false;
        self.nest.push(Nest::Substitution {
            parens: 1,
            saw_case: false,
        });
    }

    /// A word of unquoted letters ended: a `case` marks the `$(…)` it is in (any `case`
    /// word, keyword or not: taking too many only refuses more).
    fn end_word(&mut self) {
        if self.word == "case" {
            let innermost = self
                .nest
                .iter_mut()
                .rev()
                .find(|n| matches!(n, Nest::Substitution { .. }));
            if let Some(Nest::Substitution { saw_case, .. }) = innermost {
                *saw_case = true;
            }
        }
        self.word.clear();
    }

    /// One character after `<<`; false if it ended the delimiter word and is to be read as
    /// usual.
    fn delimiter_char(&mut self, c: char) -> bool {
        let Some(d) = &mut self.delimiter else {
            return false;
        };
        if d.word.is_none() {
            match c {
                '-' if !d.strip_tabs => {
                    d.strip_tabs = true;
                    return true;
                }
                ' ' | '\t' => return true,
                _ => d.word = Some(String::new()),
            }
        }
        let word = d.word.get_or_insert_with(String::new);
        match (d.quote, c) {
            (Some(q), c) if c == q => d.quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => d.quote = Some(c),
            (None, '\\') => {}
            (None, ' ' | '\t' | '\n' | ';' | '&' | '|' | '<' | '>' | '(' | ')') => {
                let doc = HereDoc {
                    delimiter: std::mem::take(word),
                    strip_tabs: d.strip_tabs,
                };
                self.delimiter = None;
                if !doc.delimiter.is_empty() {
                    self.pending.push(doc);
                }
                return false;
            }
            (None, c) => word.push(c),
        }
        true
    }

    fn body_char(&mut self, c: char) {
        let Some((doc, line)) = &mut self.body else {
            return;
        };
        if c != '\n' {
            return line.push(c);
        }
        let text = if doc.strip_tabs {
            line.trim_start_matches('\t')
        } else {
            line.as_str()
        };
        if text == doc.delimiter {
            self.body = self.next_body();
        } else {
            line.clear();
        }
    }

    /// An unquoted newline: the bodies of the line's here-documents start here.
    fn newline(&mut self) {
        if self.body.is_none() {
            self.body = self.next_body();
        }
    }

    fn next_body(&mut self) -> Option<(HereDoc, String)> {
        (!self.pending.is_empty()).then(|| (self.pending.remove(0), String::new()))
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

    fn placement(command: &str) -> Result<(), (String, Misplacement, usize)> {
        Template::parse(command)
            .unwrap()
            .check_shell_placement()
            .map_err(|e| (e.name, e.placement, e.line))
    }

    #[test]
    fn placeholders_outside_quotes_are_accepted() {
        for command in [
            "echo {x} 'literal'",
            "echo {x} \"literal\" {y}",
            "printf '%s' {v} > {out}",
            "echo \"a\"{x}\"b\" 'c'{x}'d'",
            "echo \"$(cat /data/{x}/file)\" $(printf %s {x})",
            "echo it\\'s {x}",
            "echo \"it's\" {x} 'say \"hi\"' {x}",
            "echo 'a\\' {x}",
            "echo a#b {x}",
            "echo x # it's a comment\necho {x}",
            "cat <<EOF\nit's {{x}} \"\nEOF\necho {x}",
            "cat <<-'EOF' >/dev/null\n\tbody ' \"\n\tEOF\necho {x}",
            "echo ${{HOME}} \"${{HOME}}\" ${{y:-'a)b}}c'}} {x}",
            "case {x} in a) echo {x};; esac",
            "echo $(case a in a) echo {x};; esac) {x}",
            "cat <<< {x}",
            "echo {{x}} '{{y}}' \"{{z}}\"",
            "echo $$ {x}",
        ] {
            assert_eq!(placement(command), Ok(()), "{command:?}");
        }
    }

    #[test]
    fn placeholders_inside_quotes_and_the_like_are_refused() {
        use Misplacement::*;
        for (command, expected) in [
            ("notify 'value={x}'", SingleQuotes),
            ("echo \"value={x}\"", DoubleQuotes),
            ("echo 'a' \"b {x}\"", DoubleQuotes),
            ("echo \"a\\\" {x}\"", DoubleQuotes),
            ("echo \"$(echo \"{x}\")\"", DoubleQuotes),
            ("echo \"${{y:-{x}}}\"", DoubleQuotes),
            ("echo $'a{x}'", DollarQuotes),
            ("echo `echo {x}`", Backquotes),
            ("echo \"`echo {x}`\"", Backquotes),
            ("echo \\{x}", AfterBackslash),
            ("echo ${x}", AfterDollar),
            ("echo ${{{x}}}", AfterDollar),
            ("echo ok # {x}", Comment),
            ("echo ok\n# note {x}", Comment),
            ("cat <<EOF\n{x}\nEOF", HereDocument),
            ("cat <<'EOF'\nline {x}\nEOF", HereDocument),
            ("cat <<-EOF\n\tEOF not yet\n\t{x}\n\tEOF", HereDocument),
            ("cat <<{x}", HereDocument),
            // After a `case` inside quoted `$(…)`, where the `$(…)` ends is not told: refused.
            ("echo \"$(case a in a) echo {x};; esac)\"", DoubleQuotes),
            ("echo \"$(case a in a) echo;; esac) {x}\"", DoubleQuotes),
            ("echo \"$(case a in a) echo \"{x}\";; esac)\"", DoubleQuotes),
        ] {
            let got = placement(command);
            assert_eq!(got.map_err(|(_, p, _)| p), Err(expected), "{command:?}");
        }
    }

    #[test]
    fn a_misplaced_placeholder_is_named_with_its_line_and_what_to_do() {
        let err = Template::parse("echo ok {date}\necho \"day {date}\"")
            .unwrap()
            .check_shell_placement()
            .unwrap_err();
        assert_eq!((err.name.as_str(), err.line), ("date", 1));
        let text = err.to_string();
        assert!(text.contains("{date} is inside double quotes"), "{text}");
        assert!(text.contains("drop the quotes"), "{text}");
        assert!(text.contains("\"text \"{date}"), "{text}");
        assert!(text.contains("\"$JOBZ_PARAM_DATE\""), "{text}");
        let err = Template::parse("echo ${home}")
            .unwrap()
            .check_shell_placement()
            .unwrap_err();
        assert!(err.to_string().contains("${{home}}"), "{err}");
    }

    /// What the scanner accepts, `/bin/sh` reads as intended: a hostile value stays one
    /// literal word.
    #[test]
    fn accepted_placements_keep_a_hostile_value_literal_in_sh() {
        let hostile = "a  b'\"$(echo INJECTED)`echo INJECTED`;# \\ ${HOME} \nEOF\n)";
        for (command, expected) in [
            ("printf '[%s]' {x}", format!("[{hostile}]")),
            ("printf '[%s]' \"a\"{x}'b'", format!("[a{hostile}b]")),
            ("printf '[%s]' \"$(printf %s {x})\"", format!("[{hostile}]")),
            ("printf '[%s]' ${{UNSET:-{x}}}", format!("[{hostile}]")),
            (
                "cat <<EOF >/dev/null\nit's {{x}}\nEOF\nprintf '[%s]' {x}",
                format!("[{hostile}]"),
            ),
            (
                "case {x} in *) printf '[%s]' {x};; esac # it's {{x}}",
                format!("[{hostile}]"),
            ),
        ] {
            let template = Template::parse(command).unwrap();
            assert_eq!(template.check_shell_placement(), Ok(()), "{command:?}");
            let rendered = template.render_shell(&values(&[("x", hostile)])).unwrap();
            let out = std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(&rendered)
                .env_remove("UNSET")
                .output()
                .unwrap();
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                expected,
                "{command:?} rendered as {rendered:?}"
            );
        }
    }
}
