//! Job files (`jobs.d/*.yaml`): parsing, validation, and the directory loader.
//!
//! Two formats are accepted in one file: the jobz format (`jobs:`, `semaphores:` and
//! `schedules:` lists)
//! and the original jobz job db (`<list name>: [{name, command, on_success, on_failure}]`).
//! A file is accepted or rejected as a whole; [`JobDir`] keeps the last good version of a
//! file that turns bad.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::message::Params;
use crate::schedule::{render_slot_params, Timing};
use crate::template::Template;

/// Pattern a parameter value must match when its declaration gives none.
pub const DEFAULT_PARAM_PATTERN: &str = "^[A-Za-z0-9._:/@+-]{0,256}$";

/// Longest parameter value accepted whatever the pattern says.
pub const MAX_PARAM_VALUE_BYTES: usize = 64 * 1024;

/// Most parameters a run may have.
pub const MAX_PARAMS: usize = 64;

/// How a step is spread over the workers that serve its job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// One task on every live worker that serves the job.
    #[default]
    Broadcast,
    /// One task on exactly one worker.
    Queue,
    /// Only as a successor: on the worker that ran the triggering task, right after it.
    Local,
}

/// A declared parameter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamSpec {
    /// The run is refused without it.
    pub required: bool,
    /// Regular expression the whole value must match.
    pub pattern: String,
}

/// A validated job definition. Also the wire form: workers register their jobs with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Job name and exact topic.
    pub name: String,
    /// Free text for operators.
    #[serde(default)]
    pub description: String,
    /// Command template, run by `/bin/sh -c`.
    pub command: String,
    /// Declared parameters, including those only used as placeholders in the command.
    pub params: BTreeMap<String, ParamSpec>,
    /// Jobs started when the step (or, for `local` ones, the task) succeeded.
    pub on_success: Vec<String>,
    /// Jobs started when it failed.
    pub on_failure: Vec<String>,
    /// How the step is spread over workers.
    pub delivery: Delivery,
    /// Kill the step's process group after this long.
    pub timeout_ms: Option<u64>,
    /// Extra attempts after a failure.
    pub retries: u32,
    /// Wait before the first retry; doubles with each further one (capped at 10 min).
    #[serde(default = "default_retry_backoff_ms")]
    pub retry_backoff_ms: u64,
    /// Free-form labels.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The local user the command runs as (`run_as:`; syntax checked by
    /// [`is_valid_user_name`], existence by the worker when it runs the step). `None`: the
    /// worker's `--default-run-as`, or the worker's own user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as: Option<String>,
    /// Runs of this job start before lower ones and after higher ones when steps wait for
    /// a slot (`priority:`, default 0); a trigger's `priority=` overrides it.
    #[serde(default)]
    pub priority: i32,
    /// At most this many tasks of the job run at once across the mesh (`max_concurrency:`);
    /// `None`: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    /// Resources a step of the job reads (`inputs:`, templates over its parameters): it
    /// starts only once each exists and no step is writing it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<String>,
    /// Resources a step of the job writes (`outputs:`): held exclusively while it runs,
    /// marked written when it succeeds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
    /// How long a written output counts as existing (`output_ttl:`); `None`: until cleared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_ttl_ms: Option<u64>,
    /// Who hears of a run of this job ending (`notify:`), told by the broker.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<Notify>,
}

/// One `notify:` entry: a target and the ends it hears of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notify {
    /// Where the notice goes.
    pub to: NotifyTarget,
    /// Which ends.
    pub on: NotifyOn,
}

/// Where a notice goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyTarget {
    /// A webhook the broker's `--notify` file names (its URL and secret live there, not in
    /// job files that travel the mesh).
    Webhook(String),
    /// An e-mail address, sent through the broker's SMTP server (`--notify` file).
    Email(String),
}

impl NotifyTarget {
    /// What is wrong with the target, if anything: a webhook's name must be a name
    /// (`[A-Za-z0-9_.-]{1,128}`), an address an address ([`is_valid_email`]). The one
    /// check of a target, wherever it comes from: a job file, `notify=`, or a job a worker
    /// registers with the broker.
    pub fn problem(&self) -> Option<String> {
        match self {
            NotifyTarget::Webhook(name) if !is_valid_name(name) => Some(format!(
                "webhook {name:?} must be a name from the broker's --notify file \
                 ([A-Za-z0-9_.-]{{1,128}})"
            )),
            NotifyTarget::Email(address) if !is_valid_email(address) => {
                Some(format!("{address:?} is not an e-mail address"))
            }
            _ => None,
        }
    }

    /// A target as `notify=` writes it: `webhook:NAME`, or an e-mail address.
    pub fn parse(text: &str) -> Result<NotifyTarget, String> {
        let target = match text.strip_prefix("webhook:") {
            Some(name) => NotifyTarget::Webhook(name.to_owned()),
            None => NotifyTarget::Email(text.to_owned()),
        };
        match target.problem() {
            None => Ok(target),
            Some(problem) => Err(problem),
        }
    }
}

/// `webhook:NAME` or the address: what [`NotifyTarget::parse`] reads.
impl std::fmt::Display for NotifyTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotifyTarget::Webhook(name) => write!(f, "webhook:{name}"),
            NotifyTarget::Email(address) => f.write_str(address),
        }
    }
}

/// Which ends of a run a notice is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyOn {
    /// The run failed (the default).
    Failure,
    /// The run succeeded.
    Success,
    /// Every end: succeeded, failed or cancelled.
    Always,
}

impl NotifyOn {
    /// True if a run ending `succeeded` (or failed; `None`: cancelled) is told.
    pub fn matches(self, succeeded: Option<bool>) -> bool {
        match self {
            NotifyOn::Always => true,
            NotifyOn::Failure => succeeded == Some(false),
            NotifyOn::Success => succeeded == Some(true),
        }
    }
}

/// Longest e-mail address a `notify:` entry takes (RFC 5321's path limit).
const MAX_EMAIL: usize = 254;

/// An address `local@domain`: printable ASCII, no spaces, no quotes or angle brackets (it
/// goes into an SMTP envelope as it is).
pub fn is_valid_email(address: &str) -> bool {
    let Some((local, domain)) = address.rsplit_once('@') else {
        return false;
    };
    address.len() <= MAX_EMAIL
        && !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && address
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"<>\"(),;:[]\\".contains(&b))
        && address.matches('@').count() == 1
}

/// Default `retry_backoff`: ten seconds.
pub const DEFAULT_RETRY_BACKOFF_MS: u64 = 10_000;

fn default_retry_backoff_ms() -> u64 {
    DEFAULT_RETRY_BACKOFF_MS
}

/// What a semaphore counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitFor {
    /// The awaited job.
    pub job: String,
    /// How many completions; `None` means `all` (every worker the broadcast reached).
    pub count: Option<u32>,
}

/// A validated semaphore (dependency barrier) definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SemaphoreSpec {
    /// Barrier name.
    pub name: String,
    /// Conditions that must all hold.
    pub wait_for: Vec<WaitFor>,
    /// Key template: completions are counted per rendered key.
    pub key: String,
    /// Jobs started once per key when every condition holds.
    pub then: Vec<String>,
    /// Give up on a key after this long.
    pub timeout_ms: Option<u64>,
    /// Jobs started when a key times out.
    pub on_timeout: Vec<String>,
    /// Jobs started when an awaited job fails (unless `count_failures`).
    pub on_failure: Vec<String>,
    /// Count failed completions too.
    pub count_failures: bool,
}

/// What a schedule does with slots that fell due while no semaphore process was running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CatchUp {
    /// Skip them (the default, as cron does).
    #[default]
    None,
    /// Fire the latest of them once (as anacron does).
    One,
    /// Fire each of them, the latest `backlog` at most (as qless recur does).
    All,
}

impl CatchUp {
    /// The name used in job files and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            CatchUp::None => "none",
            CatchUp::One => "one",
            CatchUp::All => "all",
        }
    }
}

/// Default `backlog`: the most slots `catch_up: all` fires at once.
pub const DEFAULT_BACKLOG: u32 = 100;

/// Largest `backlog` accepted.
pub const MAX_BACKLOG: u32 = 10_000;

/// A validated schedule: a job triggered at every slot of a cron expression or interval.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleSpec {
    /// Schedule name (part of every trigger id it makes).
    pub name: String,
    /// The job it starts.
    pub job: String,
    /// Parameters of each run, as templates of the slot (see
    /// [`crate::schedule::render_slot_value`]).
    pub params: BTreeMap<String, String>,
    /// When it fires.
    pub timing: Timing,
    /// What happens to slots missed while nothing ran.
    pub catch_up: CatchUp,
    /// Most missed slots `catch_up: all` fires.
    pub backlog: u32,
}

impl ScheduleSpec {
    /// The parameters of the run for the slot `slot_ms`.
    pub fn params_for(&self, slot_ms: i64) -> Result<Params, String> {
        let slot = self
            .timing
            .zoned(slot_ms)
            .ok_or_else(|| format!("slot {slot_ms} is out of range"))?;
        render_slot_params(&self.params, &slot)
    }
}

/// Everything a set of job files defines.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobSet {
    /// Jobs by name.
    pub jobs: BTreeMap<String, JobSpec>,
    /// Semaphores by name.
    pub semaphores: BTreeMap<String, SemaphoreSpec>,
    /// Schedules by name.
    pub schedules: BTreeMap<String, ScheduleSpec>,
}

/// A job file that cannot be used (one of its problems).
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("{}{}{}: {reason}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default(),
    line.and(*column).map(|c| format!(":{c}")).unwrap_or_default())]
pub struct InvalidJobFile {
    /// The file.
    pub path: PathBuf,
    /// 1-based line, where known.
    pub line: Option<usize>,
    /// 1-based column, where known: the YAML parser's for a syntax error, the entry's
    /// `name:` for a bad entry.
    pub column: Option<usize>,
    /// What is wrong.
    pub reason: String,
}

/// A parameter set that a job refuses.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ParamError {
    /// A required parameter is absent.
    #[error("missing required parameter {0:?}")]
    Missing(String),
    /// The job does not declare this parameter.
    #[error("undeclared parameter {0:?}")]
    Undeclared(String),
    /// A value does not match its pattern.
    #[error("parameter {name:?} does not match {pattern:?}")]
    NoMatch {
        /// The parameter.
        name: String,
        /// Its pattern.
        pattern: String,
    },
    /// Too many parameters or a value too long.
    #[error("{0}")]
    TooLarge(String),
}

impl JobSpec {
    /// Names of every job this one can start.
    pub fn successors(&self) -> impl Iterator<Item = &String> {
        self.on_success.iter().chain(&self.on_failure)
    }
}

/// Largest program one parameter pattern may compile to (`RegexBuilder::size_limit`).
/// Patterns job files use need a few KiB (the default pattern 37 KiB); Unicode `\w{100}`
/// needs 5 MB and a third of a second, and is refused.
pub const MAX_PATTERN_PROGRAM_BYTES: usize = 1 << 20;

/// Most memory one pattern's lazy DFA may cache while matching (`dfa_size_limit`): the
/// broker holds every registered job's patterns.
pub const MAX_PATTERN_DFA_BYTES: usize = 256 << 10;

/// A declared pattern that cannot be used.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("parameter {param:?}: bad pattern: {reason}")]
pub struct InvalidPattern {
    /// The parameter.
    pub param: String,
    /// Why its pattern is refused.
    pub reason: String,
}

/// Compiles a parameter pattern so that it must match the whole value, whatever the author
/// wrote: `[a-z]+` is applied as `^(?:[a-z]+)$`, and an anchored pattern stays as it was.
/// A pattern over [`MAX_PATTERN_PROGRAM_BYTES`] is refused.
pub fn compile_param_pattern(pattern: &str) -> Result<Regex, regex::Error> {
    PATTERNS_COMPILED.with(|n| n.set(n.get() + 1));
    let build = |p: &str| {
        RegexBuilder::new(p)
            .size_limit(MAX_PATTERN_PROGRAM_BYTES)
            .dfa_size_limit(MAX_PATTERN_DFA_BYTES)
            .build()
    };
    // Alone first: a pattern that compiles by itself has balanced groups and no trailing
    // escape, so it cannot close the wrapping group and add an unanchored alternative
    // (`a)|(?:.*` would make `^(?:a)|(?:.*)$`).
    build(pattern)?;
    build(&format!("^(?:{pattern})$"))
}

thread_local! {
    static PATTERNS_COMPILED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many parameter patterns this thread has compiled. Compiling is the costly part of a
/// check; this lets a test prove that a hot path (a trigger on the broker's engine thread)
/// compiles none.
pub fn patterns_compiled_on_this_thread() -> u64 {
    PATTERNS_COMPILED.with(|n| n.get())
}

/// A job's declared parameters with their patterns compiled: built once where a job set is
/// loaded (the worker) or registered (the broker's catalog), then used for every check. It
/// lives beside the [`JobSpec`] it was built from; only the spec goes on the wire.
#[derive(Debug, Clone)]
pub struct ParamRules {
    rules: BTreeMap<String, ParamRule>,
}

#[derive(Debug, Clone)]
struct ParamRule {
    required: bool,
    pattern: String,
    regex: Regex,
}

impl ParamRules {
    /// Compiles every pattern `spec` declares; the first that cannot be used is the error.
    pub fn compile(spec: &JobSpec) -> Result<ParamRules, InvalidPattern> {
        let mut rules = BTreeMap::new();
        for (name, param) in &spec.params {
            let regex = compile_param_pattern(&param.pattern).map_err(|e| InvalidPattern {
                param: name.clone(),
                reason: pattern_error_reason(&e),
            })?;
            rules.insert(
                name.clone(),
                ParamRule {
                    required: param.required,
                    pattern: param.pattern.clone(),
                    regex,
                },
            );
        }
        Ok(ParamRules { rules })
    }

    /// Checks a trigger's parameters against the declaration: every one must be declared.
    pub fn validate_params(&self, params: &Params) -> Result<(), ParamError> {
        if let Some(name) = params.keys().find(|n| !self.rules.contains_key(*n)) {
            return Err(ParamError::Undeclared(name.clone()));
        }
        self.validate_declared_params(params)
    }

    /// Checks the parameters a run carries into this job as a successor: the declared ones
    /// must match, required ones must be present; undeclared ones flow on untouched (they
    /// were checked against the triggered job's declaration, reach the command only as
    /// `JOBZ_PARAM_<NAME>`, and cannot appear in its command: a placeholder declares).
    pub fn validate_declared_params(&self, params: &Params) -> Result<(), ParamError> {
        if params.len() > MAX_PARAMS {
            return Err(ParamError::TooLarge(format!(
                "{} parameters, at most {MAX_PARAMS}",
                params.len()
            )));
        }
        for (name, value) in params {
            let Some(rule) = self.rules.get(name) else {
                continue;
            };
            if value.len() > MAX_PARAM_VALUE_BYTES {
                return Err(ParamError::TooLarge(format!(
                    "parameter {name:?} is {} bytes, at most {MAX_PARAM_VALUE_BYTES}",
                    value.len()
                )));
            }
            if !rule.regex.is_match(value) {
                return Err(ParamError::NoMatch {
                    name: name.clone(),
                    pattern: rule.pattern.clone(),
                });
            }
        }
        for (name, rule) in &self.rules {
            if rule.required && !params.contains_key(name) {
                return Err(ParamError::Missing(name.clone()));
            }
        }
        Ok(())
    }
}

/// A pattern's compile error, with what to do about the one a job author can meet by
/// accident: a pattern too big.
fn pattern_error_reason(e: &regex::Error) -> String {
    match e {
        regex::Error::CompiledTooBig(_) => format!(
            "{e} (fewer repetitions, or ASCII classes such as [0-9] or (?-u:\\w) instead of \
             Unicode \\d or \\w, make it smaller)"
        ),
        _ => e.to_string(),
    }
}

/// Is this a valid job or semaphore name (`[A-Za-z0-9_.-]{1,128}`)?
pub fn is_valid_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Longest resource name (after its parameters are filled in).
pub const MAX_RESOURCE_NAME: usize = 200;

/// Is this a valid resource name: 1 to [`MAX_RESOURCE_NAME`] ASCII letters, digits, `_`,
/// `.`, `-` and `:` (no `/`: a name is one segment of `/resources/{name}`).
pub fn is_valid_resource_name(name: &str) -> bool {
    (1..=MAX_RESOURCE_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':'))
}

/// A resource template of a job: its placeholders are declared parameters, and its
/// literal text alone is a valid name (values are checked once filled in, per step).
fn check_resource_template(text: &str, params: &BTreeMap<String, ParamSpec>) -> Result<(), String> {
    let template = Template::parse(text).map_err(|e| format!("{text:?}: {e}"))?;
    for used in template.params() {
        if !params.contains_key(used) {
            return Err(format!(
                "{text:?}: placeholder {{{used}}} is not a parameter of the job (declare it under params:)"
            ));
        }
    }
    let literal: BTreeMap<String, String> = template
        .params()
        .into_iter()
        .map(|p| (p.to_owned(), "x".to_owned()))
        .collect();
    match template.render_plain(&literal) {
        Ok(name) if is_valid_resource_name(&name) => Ok(()),
        _ => Err(format!(
            "{text:?} is not a valid resource name (1 to {MAX_RESOURCE_NAME} of A-Z a-z 0-9 _ . - :)"
        )),
    }
}

/// Is this a plausible local user name for `run_as:` (the portable POSIX form, as
/// `useradd` accepts by default: `[A-Za-z_][A-Za-z0-9_.-]{0,31}`, optionally ending in `$`)?
/// Numeric ids, path separators, NUL and anything a shell would read are refused.
pub fn is_valid_user_name(name: &str) -> bool {
    let body = name.strip_suffix('$').unwrap_or(name);
    let mut bytes = body.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    first_ok
        && body.len() <= 32
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Query names `/job_start` takes for itself: a job may not declare a parameter by one of
/// these names (its value would never reach the job).
pub const RESERVED_QUERY_NAMES: [&str; 7] = [
    "job_name", "wait", "priority", "delay", "at", "depends", "tags",
];

/// Is `name` one of [`RESERVED_QUERY_NAMES`]?
pub fn is_reserved_param_name(name: &str) -> bool {
    RESERVED_QUERY_NAMES.contains(&name)
}

/// Parameter names become `JOBZ_PARAM_<NAME>` and URL query keys: letters, digits and `_`,
/// not starting with a digit, and not one of the names `/job_start` takes for itself
/// ([`RESERVED_QUERY_NAMES`]).
pub fn is_valid_param_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    first_ok
        && name.len() <= 64
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !is_reserved_param_name(name)
}

/// Why `name` cannot be a parameter name, for the error that refuses a job file.
fn param_name_problem(name: &str) -> String {
    if is_reserved_param_name(name) {
        format!(
            "parameter name {name:?} is reserved: /job_start takes {} for itself",
            RESERVED_QUERY_NAMES.join(", ")
        )
    } else {
        format!("parameter name {name:?} must match [A-Za-z_][A-Za-z0-9_]{{0,63}}")
    }
}

// ---- The YAML forms ---------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    name: String,
    #[serde(deserialize_with = "scalar_string")]
    command: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    params: BTreeMap<String, RawParam>,
    #[serde(default)]
    on_success: OneOrMany,
    #[serde(default)]
    on_failure: OneOrMany,
    #[serde(default)]
    delivery: Delivery,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    retries: u32,
    #[serde(default)]
    retry_backoff: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default, deserialize_with = "optional_scalar_string")]
    run_as: Option<String>,
    #[serde(default)]
    priority: i32,
    #[serde(default)]
    max_concurrency: Option<u32>,
    #[serde(default)]
    inputs: Vec<String>,
    #[serde(default)]
    outputs: Vec<String>,
    #[serde(default)]
    output_ttl: Option<String>,
    #[serde(default)]
    notify: Vec<RawNotify>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    #[serde(default)]
    webhook: Option<String>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    on: Option<String>,
}

impl RawNotify {
    fn validate(self) -> Result<Notify, String> {
        let to = match (self.webhook, self.email) {
            (Some(name), None) => NotifyTarget::Webhook(name),
            (None, Some(address)) => NotifyTarget::Email(address),
            _ => return Err("notify: each entry names one webhook: or one email:".into()),
        };
        if let Some(problem) = to.problem() {
            return Err(format!("notify: {problem}"));
        }
        let on = match self.on.as_deref() {
            None | Some("failure") => NotifyOn::Failure,
            Some("success") => NotifyOn::Success,
            Some("always") => NotifyOn::Always,
            Some(other) => {
                return Err(format!(
                    "notify: on {other:?} must be failure, success or always"
                ))
            }
        };
        Ok(Notify { to, on })
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawParam {
    #[serde(default)]
    required: bool,
    #[serde(default)]
    pattern: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSemaphore {
    name: String,
    wait_for: Vec<RawWaitFor>,
    #[serde(default)]
    key: String,
    then: OneOrMany,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    on_timeout: OneOrMany,
    #[serde(default)]
    on_failure: OneOrMany,
    #[serde(default)]
    on: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    name: String,
    job: String,
    #[serde(default)]
    params: BTreeMap<String, serde_yaml::Value>,
    #[serde(default)]
    cron: Option<String>,
    #[serde(default)]
    timezone: Option<String>,
    #[serde(default)]
    every: Option<String>,
    #[serde(default)]
    offset: Option<String>,
    #[serde(default)]
    catch_up: Option<String>,
    #[serde(default)]
    backlog: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWaitFor {
    job: String,
    #[serde(default)]
    count: Option<serde_yaml::Value>,
}

/// `command: true` is a YAML boolean; a command is whatever scalar was written.
fn scalar_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    use serde::de::Error;
    match serde_yaml::Value::deserialize(d)? {
        serde_yaml::Value::String(s) => Ok(s),
        serde_yaml::Value::Bool(b) => Ok(b.to_string()),
        serde_yaml::Value::Number(n) => Ok(n.to_string()),
        other => Err(D::Error::custom(format!(
            "expected a command string, found {other:?}"
        ))),
    }
}

/// `run_as: 1000` is a YAML number: read it as text, so the error names `run_as`.
fn optional_scalar_string<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<String>, D::Error> {
    match Option::<serde_yaml::Value>::deserialize(d)? {
        None | Some(serde_yaml::Value::Null) => Ok(None),
        Some(value) => scalar_string(value)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

/// A place in a job file: 1-based line and column, each where known.
type Place = (Option<usize>, Option<usize>);

/// Deserialises a list entry by entry: the entries that deserialise, and a problem (at the
/// entry's place) for each that does not.
fn parse_list<T: serde::de::DeserializeOwned>(
    text: &str,
    key: &str,
    value: serde_yaml::Value,
) -> (Vec<T>, Vec<(Place, String)>) {
    let key_place = (find_line(text, &format!("{key}:")), Some(1));
    let entries: Vec<serde_yaml::Value> = match value {
        serde_yaml::Value::Null => return (Vec::new(), Vec::new()),
        serde_yaml::Value::Sequence(entries) => entries,
        _ => {
            return (
                Vec::new(),
                vec![(key_place, format!("{key}: expected a list"))],
            )
        }
    };
    let mut good = Vec::new();
    let mut problems = Vec::new();
    for (i, entry) in entries.into_iter().enumerate() {
        let name = entry
            .get("name")
            .and_then(|n| n.as_str())
            .map(str::to_owned);
        match serde_yaml::from_value(entry) {
            Ok(parsed) => good.push(parsed),
            Err(e) => {
                let place = match name.as_deref().and_then(|n| entry_place(text, n)) {
                    Some(place) => place,
                    None => key_place,
                };
                let which = name
                    .map(|n| format!("{n:?}"))
                    .unwrap_or_else(|| format!("#{}", i + 1));
                problems.push((place, format!("{key} entry {which}: {e}")));
            }
        }
    }
    (good, problems)
}

/// `on_success: a` or `on_success: [a, b]`; `null` and absent mean none.
#[derive(Deserialize, Default)]
#[serde(untagged)]
enum OneOrMany {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::None => Vec::new(),
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// Parses one job file's text. `path` is used in error messages only. A file with any
/// problem is refused whole: the first problem is the error ([`check_job_file`] gives
/// them all).
pub fn parse_job_file(path: &Path, text: &str) -> Result<JobSet, InvalidJobFile> {
    let (set, mut problems) = parse_all(path, text);
    match problems.is_empty() {
        true => Ok(set),
        false => Err(problems.swap_remove(0)),
    }
}

/// Every problem of one job file's text, in the order of the file's lists: a YAML syntax
/// error (then nothing more can be read), or each entry that does not deserialise or
/// validate, or is defined twice. Empty: the file is good.
pub fn check_job_file(path: &Path, text: &str) -> Vec<InvalidJobFile> {
    parse_all(path, text).1
}

/// What the file defines (its good entries) and each of its problems.
fn parse_all(path: &Path, text: &str) -> (JobSet, Vec<InvalidJobFile>) {
    let problem = |(line, column): Place, reason: String| InvalidJobFile {
        path: path.to_owned(),
        line,
        column: line.and(column),
        reason,
    };
    let mut set = JobSet::default();
    let root: serde_yaml::Value = match serde_yaml::from_str(text) {
        Ok(root) => root,
        Err(e) => {
            let place = (
                e.location().map(|l| l.line()),
                e.location().map(|l| l.column()),
            );
            return (set, vec![problem(place, e.to_string())]);
        }
    };
    let map = match root {
        serde_yaml::Value::Null => return (set, Vec::new()), // an empty file defines nothing
        serde_yaml::Value::Mapping(map) => map,
        _ => {
            let reason = "expected a mapping with `jobs:`, `semaphores:` and/or `schedules:`";
            return (set, vec![problem((Some(1), Some(1)), reason.into())]);
        }
    };
    let mut problems = Vec::new();
    for (key, value) in map {
        let Some(key) = key.as_str().map(str::to_owned) else {
            problems.push(problem(
                (None, None),
                "top-level keys must be strings".into(),
            ));
            continue;
        };
        let mut found = Vec::new();
        match key.as_str() {
            "semaphores" => parse_named_list(
                text,
                &key,
                value,
                |raw: &RawSemaphore| raw.name.clone(),
                validate_semaphore,
                "semaphore",
                &mut set.semaphores,
                &mut found,
            ),
            "schedules" => parse_named_list(
                text,
                &key,
                value,
                |raw: &RawSchedule| raw.name.clone(),
                validate_schedule,
                "schedule",
                &mut set.schedules,
                &mut found,
            ),
            // `jobs:` is the jobz format; any other list is an original jobz job db list.
            _ => {
                let (raws, bad) = parse_list::<RawJob>(text, &key, value);
                found.extend(bad);
                for raw in raws {
                    let name = raw.name.clone();
                    let entry = entry_place(text, &name).unwrap_or((None, None));
                    match validate_job(raw) {
                        Ok(spec) => {
                            if set.jobs.insert(name.clone(), spec).is_some() {
                                let again = nth_entry_place(text, &name, 1).unwrap_or(entry);
                                found.push((again, format!("job {name:?} defined twice")));
                            }
                        }
                        Err(e) => {
                            // A command's own line when the problem is inside it.
                            let line =
                                e.command_line.zip(entry.0).and_then(|(offset, name_line)| {
                                    command_line(text, name_line, offset)
                                });
                            let place = match line {
                                Some(line) => (Some(line), None),
                                None => entry,
                            };
                            found.push((place, e.reason));
                        }
                    }
                }
            }
        }
        problems.extend(
            found
                .into_iter()
                .map(|(place, reason)| problem(place, reason)),
        );
    }
    (set, problems)
}

/// Parses a list of named definitions (`semaphores:`, `schedules:`) into `into`, each entry
/// validated; each problem at the entry's place goes to `problems`.
#[allow(clippy::too_many_arguments)] // one call per list kind, each naming every part
fn parse_named_list<R: serde::de::DeserializeOwned, S>(
    text: &str,
    key: &str,
    value: serde_yaml::Value,
    name_of: fn(&R) -> String,
    validate: fn(R) -> Result<S, String>,
    what: &str,
    into: &mut BTreeMap<String, S>,
    problems: &mut Vec<(Place, String)>,
) {
    let (raws, bad) = parse_list::<R>(text, key, value);
    problems.extend(bad);
    for raw in raws {
        let name = name_of(&raw);
        let place = entry_place(text, &name).unwrap_or((None, None));
        match validate(raw) {
            Ok(spec) => {
                if into.insert(name.clone(), spec).is_some() {
                    let again = nth_entry_place(text, &name, 1).unwrap_or(place);
                    problems.push((again, format!("{what} {name:?} defined twice")));
                }
            }
            Err(reason) => problems.push((place, reason)),
        }
    }
}

fn find_line(text: &str, needle: &str) -> Option<usize> {
    text.lines().position(|l| l.contains(needle)).map(|i| i + 1)
}

/// The key of a block mapping line (`key: …` or `- key: …`), if it is one.
fn key_of(line: &str) -> Option<&str> {
    let line = line.trim_start();
    let line = line.strip_prefix("- ").unwrap_or(line).trim_start();
    line.split_once(':').map(|(key, _)| key.trim_end())
}

/// The place (line, and the column of its `name` key) of the list entry `name: NAME`, else
/// the first line that mentions `name` (an entry written in flow style).
fn entry_place(text: &str, name: &str) -> Option<Place> {
    nth_entry_place(text, name, 0)
}

/// The place of the `n`th (from 0) entry named `name`: a second definition is the one
/// at fault. The first when there are not that many.
fn nth_entry_place(text: &str, name: &str, n: usize) -> Option<Place> {
    let line = match nth_entry_line(text, name, n) {
        Some(line) => line,
        None => entry_line(text, name)?,
    };
    let column = text
        .lines()
        .nth(line - 1)
        .and_then(|l| l.find("name").or_else(|| l.find(name)))
        .map(|c| c + 1);
    Some((Some(line), column))
}

/// True for a block-mapping line `name: NAME` (or `- name: NAME`).
fn names_entry(line: &str, name: &str) -> bool {
    let value = line.split_once(':').map_or("", |(_, v)| v);
    let value = value.split(" #").next().unwrap_or("").trim();
    key_of(line) == Some("name") && value.trim_matches(['"', '\'']) == name
}

/// The line of the `n`th (from 0) entry `name: NAME`.
fn nth_entry_line(text: &str, name: &str, n: usize) -> Option<usize> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| names_entry(line, name))
        .nth(n)
        .map(|(i, _)| i + 1)
}

/// The line of the list entry `name: NAME`, else the first line that mentions `name` (an
/// entry written in flow style).
fn entry_line(text: &str, name: &str) -> Option<usize> {
    nth_entry_line(text, name, 0).or_else(|| find_line(text, name))
}

/// The file line of line `offset` (from 0) of the command of the list entry whose `name:` is
/// on line `name_line`: counted from its `command:` line, or from the line after it for a
/// block scalar (`|`, `>`). `None` if the entry has no `command:` line of its own.
fn command_line(text: &str, name_line: usize, offset: usize) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |i: usize| lines[i].len() - lines[i].trim_start().len();
    let is_item = |i: usize| lines[i].trim_start().starts_with("- ");
    let named = name_line.checked_sub(1).filter(|&i| i < lines.len())?;
    // The entry: from its `- ` line (the name's own, or the nearest one less indented above
    // it) to the next line as little indented as that dash.
    let start = if is_item(named) {
        named
    } else {
        (0..named)
            .rev()
            .find(|&i| is_item(i) && indent(i) < indent(named))?
    };
    let end = (start + 1..lines.len())
        .find(|&i| {
            let line = lines[i].trim_start();
            !line.is_empty() && !line.starts_with('#') && indent(i) <= indent(start)
        })
        .unwrap_or(lines.len());
    let at = (start..end).find(|&i| key_of(lines[i]) == Some("command"))?;
    let value = lines[at].split_once(':').map_or("", |(_, v)| v.trim());
    let block = value.is_empty() || value.starts_with(['|', '>']);
    let line = at + usize::from(block) + offset;
    Some(if line < end { line + 1 } else { at + 1 })
}

/// Why a list entry is refused; a problem in its command knows its line there.
struct EntryError {
    reason: String,
    /// The line of the command the problem is on, from 0.
    command_line: Option<usize>,
}

impl From<String> for EntryError {
    fn from(reason: String) -> Self {
        EntryError {
            reason,
            command_line: None,
        }
    }
}

fn parse_duration(what: &str, text: Option<String>) -> Result<Option<u64>, String> {
    text.map(|t| {
        humantime::parse_duration(t.trim())
            .map(|d: Duration| d.as_millis() as u64)
            .map_err(|e| format!("{what} {t:?}: {e}"))
    })
    .transpose()
}

fn check_names(what: &str, names: &[String]) -> Result<(), String> {
    match names.iter().find(|n| !is_valid_name(n)) {
        Some(bad) => Err(format!("{what}: {bad:?} is not a valid job name")),
        None => Ok(()),
    }
}

fn validate_job(raw: RawJob) -> Result<JobSpec, EntryError> {
    let name = raw.name;
    if !is_valid_name(&name) {
        return Err(format!("job name {name:?} must match [A-Za-z0-9_.-]{{1,128}}").into());
    }
    let context = |r: String| format!("job {name:?}: {r}");
    let template = Template::parse(&raw.command).map_err(|e| context(format!("command: {e}")))?;
    // Every value is shell-quoted as one word; inside quotes that breaks (`'v={x}'`).
    template.check_shell_placement().map_err(|e| EntryError {
        reason: context(format!("command: {e}")),
        command_line: Some(e.line),
    })?;
    let mut params = BTreeMap::new();
    for (pname, p) in raw.params {
        if !is_valid_param_name(&pname) {
            return Err(context(param_name_problem(&pname)).into());
        }
        let pattern = p
            .pattern
            .unwrap_or_else(|| DEFAULT_PARAM_PATTERN.to_owned());
        params.insert(
            pname,
            ParamSpec {
                required: p.required,
                pattern,
            },
        );
    }
    // A placeholder the file does not declare is a required parameter with the default
    // pattern: the original jobz format declares nothing.
    for used in template.params() {
        if !is_valid_param_name(used) {
            return Err(context(format!(
                "command: placeholder {{{used}}}: {}",
                param_name_problem(used)
            ))
            .into());
        }
        params.entry(used.to_owned()).or_insert_with(|| ParamSpec {
            required: true,
            pattern: DEFAULT_PARAM_PATTERN.to_owned(),
        });
    }
    let on_success = raw.on_success.into_vec();
    let on_failure = raw.on_failure.into_vec();
    check_names("on_success", &on_success).map_err(context)?;
    check_names("on_failure", &on_failure).map_err(context)?;
    if let Some(user) = raw.run_as.as_deref().filter(|u| !is_valid_user_name(u)) {
        return Err(context(format!(
            "run_as {user:?} is not a valid user name ([A-Za-z_][A-Za-z0-9_.-]{{0,31}})"
        ))
        .into());
    }
    if raw.max_concurrency == Some(0) {
        return Err(context(
            "max_concurrency must be at least 1 (leave it out for no limit)".into(),
        )
        .into());
    }
    for (what, names) in [("inputs", &raw.inputs), ("outputs", &raw.outputs)] {
        for name in names {
            check_resource_template(name, &params).map_err(|e| context(format!("{what}: {e}")))?;
        }
    }
    let output_ttl_ms = parse_duration("output_ttl", raw.output_ttl).map_err(context)?;
    let notify = raw
        .notify
        .into_iter()
        .map(RawNotify::validate)
        .collect::<Result<Vec<_>, _>>()
        .map_err(context)?;
    if output_ttl_ms.is_some() && raw.outputs.is_empty() {
        return Err(context("output_ttl without outputs".into()).into());
    }
    let spec = JobSpec {
        timeout_ms: parse_duration("timeout", raw.timeout).map_err(context)?,
        name: name.clone(),
        description: raw.description,
        command: raw.command,
        params,
        on_success,
        on_failure,
        delivery: raw.delivery,
        retries: raw.retries,
        retry_backoff_ms: parse_duration("retry_backoff", raw.retry_backoff)
            .map_err(context)?
            .unwrap_or(DEFAULT_RETRY_BACKOFF_MS),
        tags: raw.tags,
        run_as: raw.run_as,
        priority: raw.priority,
        max_concurrency: raw.max_concurrency,
        inputs: raw.inputs,
        outputs: raw.outputs,
        output_ttl_ms,
        notify,
    };
    // Compiled here to refuse the file now; whoever checks values compiles its own copy once.
    ParamRules::compile(&spec).map_err(|e| context(e.to_string()))?;
    Ok(spec)
}

/// A semaphore's or schedule's own name follows the job-name rule.
fn check_entry_name(what: &str, name: &str) -> Result<(), String> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(format!(
            "{what} name {name:?} must match [A-Za-z0-9_.-]{{1,128}}"
        ))
    }
}

fn validate_semaphore(raw: RawSemaphore) -> Result<SemaphoreSpec, String> {
    let name = raw.name;
    check_entry_name("semaphore", &name)?;
    let context = |r: String| format!("semaphore {name:?}: {r}");
    if raw.wait_for.is_empty() {
        return Err(context("wait_for is empty".into()));
    }
    let mut wait_for = Vec::new();
    for w in raw.wait_for {
        check_names("wait_for", std::slice::from_ref(&w.job)).map_err(context)?;
        let count = match w.count {
            None => Some(1),
            Some(serde_yaml::Value::String(s)) if s == "all" => None,
            Some(serde_yaml::Value::Number(n)) => match n.as_u64() {
                Some(c) if c >= 1 && c <= u32::MAX as u64 => Some(c as u32),
                _ => {
                    return Err(context(format!(
                        "count {n} must be a positive whole number or `all`"
                    )))
                }
            },
            Some(other) => {
                return Err(context(format!(
                    "count {other:?} must be a number or `all`"
                )))
            }
        };
        wait_for.push(WaitFor { job: w.job, count });
    }
    Template::parse(&raw.key).map_err(|e| context(format!("key: {e}")))?;
    let then = raw.then.into_vec();
    if then.is_empty() {
        return Err(context("then is empty".into()));
    }
    check_names("then", &then).map_err(context)?;
    let on_timeout = raw.on_timeout.into_vec();
    check_names("on_timeout", &on_timeout).map_err(context)?;
    let on_failure = raw.on_failure.into_vec();
    check_names("on_failure", &on_failure).map_err(context)?;
    let count_failures = match raw.on.as_deref() {
        None | Some("success") => false,
        Some("finished") => true,
        Some(other) => {
            return Err(context(format!(
                "on: {other:?} must be `success` or `finished`"
            )))
        }
    };
    Ok(SemaphoreSpec {
        timeout_ms: parse_duration("timeout", raw.timeout).map_err(context)?,
        name: name.clone(),
        wait_for,
        key: raw.key,
        then,
        on_timeout,
        on_failure,
        count_failures,
    })
}

fn validate_schedule(raw: RawSchedule) -> Result<ScheduleSpec, String> {
    let name = raw.name;
    check_entry_name("schedule", &name)?;
    let context = |r: String| format!("schedule {name:?}: {r}");
    check_names("job", std::slice::from_ref(&raw.job)).map_err(context)?;
    let timing = match (raw.cron, raw.every) {
        (Some(cron), None) => {
            if raw.offset.is_some() {
                return Err(context("offset goes with every, not cron".into()));
            }
            let zone = raw.timezone.as_deref().unwrap_or("UTC");
            Timing::cron(&cron, zone).map_err(context)?
        }
        (None, Some(every)) => {
            if raw.timezone.is_some() {
                return Err(context(
                    "timezone goes with cron; every counts from the epoch (UTC)".into(),
                ));
            }
            let every_ms = parse_duration("every", Some(every))
                .map_err(context)?
                .unwrap_or(0);
            let offset_ms = parse_duration("offset", raw.offset)
                .map_err(context)?
                .unwrap_or(0);
            Timing::every(every_ms as i64, offset_ms as i64).map_err(context)?
        }
        (Some(_), Some(_)) => return Err(context("give either cron or every, not both".into())),
        (None, None) => return Err(context("give cron or every".into())),
    };
    let catch_up = match raw.catch_up.as_deref() {
        None | Some("none") => CatchUp::None,
        Some("one") => CatchUp::One,
        Some("all") => CatchUp::All,
        Some(other) => {
            return Err(context(format!(
                "catch_up: {other:?} must be `none`, `one` or `all`"
            )))
        }
    };
    let backlog = raw.backlog.unwrap_or(DEFAULT_BACKLOG);
    if !(1..=MAX_BACKLOG).contains(&backlog) {
        return Err(context(format!(
            "backlog {backlog} must be from 1 to {MAX_BACKLOG}"
        )));
    }
    if raw.params.len() > MAX_PARAMS {
        return Err(context(format!("more than {MAX_PARAMS} params")));
    }
    let mut params = BTreeMap::new();
    for (pname, value) in raw.params {
        if !is_valid_param_name(&pname) {
            return Err(context(format!(
                "parameter name {pname:?} must match [A-Za-z_][A-Za-z0-9_]{{0,63}} and not be `job_name` or `wait`"
            )));
        }
        let value = match value {
            serde_yaml::Value::String(s) => s,
            serde_yaml::Value::Bool(b) => b.to_string(),
            serde_yaml::Value::Number(n) => n.to_string(),
            other => {
                return Err(context(format!(
                    "param {pname:?}: expected a string, found {other:?}"
                )))
            }
        };
        params.insert(pname, value);
    }
    let spec = ScheduleSpec {
        name: name.clone(),
        job: raw.job,
        params,
        timing,
        catch_up,
        backlog,
    };
    // Render once now, so a bad placeholder or format is refused with the file.
    let sample = spec.timing.next_after(0).unwrap_or(0);
    let rendered = spec.params_for(sample).map_err(context)?;
    if let Some((pname, _)) = rendered
        .iter()
        .find(|(_, v)| v.len() > MAX_PARAM_VALUE_BYTES)
    {
        return Err(context(format!(
            "param {pname:?} renders longer than {MAX_PARAM_VALUE_BYTES} bytes"
        )));
    }
    Ok(spec)
}

/// Is this a job file: `*.yaml` or `*.yml`, not hidden (editors' temporary files such as
/// `.foo.yaml.swp` or `.#foo.yaml` are not), and a regular file?
pub fn is_job_file(path: &Path) -> bool {
    let yaml = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    );
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'));
    yaml && !hidden && path.is_file()
}

/// What a whole-directory check found wrong with one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileProblem {
    /// The file does not read or parse.
    Invalid(InvalidJobFile),
    /// A job this file defines was defined by an earlier file (in name order).
    DuplicateJob {
        /// The job.
        name: String,
        /// The file that defined it first.
        first: PathBuf,
    },
    /// A semaphore this file defines was defined by an earlier file.
    DuplicateSemaphore {
        /// The semaphore.
        name: String,
        /// The file that defined it first.
        first: PathBuf,
    },
    /// A schedule this file defines was defined by an earlier file.
    DuplicateSchedule {
        /// The schedule.
        name: String,
        /// The file that defined it first.
        first: PathBuf,
    },
}

impl std::fmt::Display for FileProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileProblem::Invalid(e) => write!(f, "{e}"),
            FileProblem::DuplicateJob { name, first } => {
                write!(f, "job {name:?} is already defined in {}", first.display())
            }
            FileProblem::DuplicateSemaphore { name, first } => {
                write!(
                    f,
                    "semaphore {name:?} is already defined in {}",
                    first.display()
                )
            }
            FileProblem::DuplicateSchedule { name, first } => {
                write!(
                    f,
                    "schedule {name:?} is already defined in {}",
                    first.display()
                )
            }
        }
    }
}

/// One file of a whole-directory check.
#[derive(Debug, Clone)]
pub struct FileCheck {
    /// The file.
    pub path: PathBuf,
    /// What it defines, if it parsed.
    pub set: Option<JobSet>,
    /// What is wrong with it; empty if it is good.
    pub problems: Vec<FileProblem>,
}

/// Checks every job file of `dir` at once, in name order, as the `--check` modes do before
/// a deployment: each file must parse, and no job, semaphore or schedule may be defined twice.
/// Fails only if the directory itself cannot be read.
pub fn check_dir(dir: &Path) -> std::io::Result<Vec<FileCheck>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if is_job_file(&path) {
            files.push(path);
        }
    }
    files.sort();
    let mut first_job: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut first_semaphore: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut first_schedule: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut checks = Vec::new();
    for path in files {
        // Every problem of the file, each with its place: a deployment fixes them in one go.
        let parsed = match std::fs::read_to_string(&path) {
            Ok(text) => parse_all(&path, &text),
            Err(e) => (
                JobSet::default(),
                vec![InvalidJobFile {
                    path: path.clone(),
                    line: None,
                    column: None,
                    reason: e.to_string(),
                }],
            ),
        };
        let mut problems: Vec<FileProblem> =
            parsed.1.into_iter().map(FileProblem::Invalid).collect();
        let set = problems.is_empty().then_some(parsed.0);
        if let Some(set) = &set {
            let mut note =
                |names: Vec<&String>,
                 first: &mut BTreeMap<String, PathBuf>,
                 problem: fn(String, PathBuf) -> FileProblem| {
                    for name in names {
                        match first.get(name) {
                            Some(earlier) => problems.push(problem(name.clone(), earlier.clone())),
                            None => {
                                first.insert(name.clone(), path.clone());
                            }
                        }
                    }
                };
            note(set.jobs.keys().collect(), &mut first_job, |name, first| {
                FileProblem::DuplicateJob { name, first }
            });
            note(
                set.semaphores.keys().collect(),
                &mut first_semaphore,
                |name, first| FileProblem::DuplicateSemaphore { name, first },
            );
            note(
                set.schedules.keys().collect(),
                &mut first_schedule,
                |name, first| FileProblem::DuplicateSchedule { name, first },
            );
        }
        checks.push(FileCheck {
            path,
            set,
            problems,
        });
    }
    Ok(checks)
}

/// A name a file refers to that no file of the directory defines: not an error (the job may
/// be served by another host's jobs.d), but worth a warning before a deployment, since a
/// typo in `on_success:` or `then:` only shows when the run needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownTarget {
    /// The file that refers to it.
    pub path: PathBuf,
    /// What refers to it: `job import: on_success`, `semaphore publish: then`, …
    pub referrer: String,
    /// The job named.
    pub job: String,
}

impl fmt::Display for UnknownTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} names job `{}`, which no file here defines (fine if another host's jobs.d does)",
            self.referrer, self.job
        )
    }
}

/// Every job named by a successor (`on_success`, `on_failure`), a semaphore (`wait_for`,
/// `then`, `on_timeout`, `on_failure`) or a schedule (`job`) of the parsed files of
/// `checks` that none of them defines, in file order.
pub fn unknown_targets(checks: &[FileCheck]) -> Vec<UnknownTarget> {
    let defined: BTreeSet<&str> = checks
        .iter()
        .filter_map(|c| c.set.as_ref())
        .flat_map(|set| set.jobs.keys().map(String::as_str))
        .collect();
    let mut unknown = Vec::new();
    for check in checks {
        let Some(set) = &check.set else { continue };
        // (what refers, its name, the field, the jobs it names)
        let mut references: Vec<(&str, &str, &str, Vec<&String>)> = Vec::new();
        for (name, job) in &set.jobs {
            references.push(("job", name, "on_success", job.on_success.iter().collect()));
            references.push(("job", name, "on_failure", job.on_failure.iter().collect()));
        }
        for (name, semaphore) in &set.semaphores {
            let waited = semaphore.wait_for.iter().map(|w| &w.job).collect();
            references.push(("semaphore", name, "wait_for", waited));
            for (field, jobs) in [
                ("then", &semaphore.then),
                ("on_timeout", &semaphore.on_timeout),
                ("on_failure", &semaphore.on_failure),
            ] {
                references.push(("semaphore", name, field, jobs.iter().collect()));
            }
        }
        for (name, schedule) in &set.schedules {
            references.push(("schedule", name, "job", vec![&schedule.job]));
        }
        for (kind, name, field, jobs) in references {
            for job in jobs.into_iter().filter(|j| !defined.contains(j.as_str())) {
                unknown.push(UnknownTarget {
                    path: check.path.clone(),
                    referrer: format!("{kind} {name}: {field}"),
                    job: job.clone(),
                });
            }
        }
    }
    unknown
}

/// Adds `from`'s definitions to `into`; a name `into` has already keeps its first
/// definition, and the later one is reported as a conflict of `path`.
fn merge_first<T: Clone>(
    into: &mut BTreeMap<String, T>,
    from: &BTreeMap<String, T>,
    what: &str,
    path: &Path,
    conflicts: &mut Vec<InvalidJobFile>,
) {
    for (name, definition) in from {
        if into.contains_key(name) {
            conflicts.push(InvalidJobFile {
                path: path.to_owned(),
                line: None,
                column: None,
                reason: format!("{what} {name:?} is already defined in another file; ignored here"),
            });
        } else {
            into.insert(name.clone(), definition.clone());
        }
    }
}

// ---- The directory ----------------------------------------------------------------------

/// The job files of one directory, re-read on change, each kept at its last good version.
#[derive(Debug, Default)]
pub struct JobDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, LoadedFile>,
}

#[derive(Debug)]
struct LoadedFile {
    modified: Option<SystemTime>,
    len: u64,
    /// Last good content; `None` if the file never parsed.
    good: Option<JobSet>,
}

/// What one [`JobDir::refresh`] found.
#[derive(Debug, Default)]
pub struct Refresh {
    /// Files that were read again (added or changed) and accepted.
    pub loaded: Vec<PathBuf>,
    /// Files that disappeared.
    pub removed: Vec<PathBuf>,
    /// Files rejected; their previous good version, if any, stays in force.
    pub rejected: Vec<InvalidJobFile>,
}

impl Refresh {
    /// True if the effective job set may have changed.
    pub fn changed(&self) -> bool {
        !self.loaded.is_empty() || !self.removed.is_empty()
    }
}

impl JobDir {
    /// A loader for `dir`; nothing is read until [`JobDir::refresh`].
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        JobDir {
            dir: dir.into(),
            files: BTreeMap::new(),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Re-reads files that were added, changed or removed since the last call.
    /// Fails only if the directory itself cannot be read.
    pub fn refresh(&mut self) -> std::io::Result<Refresh> {
        let mut report = Refresh::default();
        let mut seen = BTreeSet::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if !is_job_file(&path) {
                continue;
            }
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            seen.insert(path.clone());
            let modified = meta.modified().ok();
            if let Some(f) = self.files.get(&path) {
                if f.modified == modified && f.len == meta.len() {
                    continue;
                }
            }
            let parsed = std::fs::read_to_string(&path)
                .map_err(|e| InvalidJobFile {
                    path: path.clone(),
                    line: None,
                    column: None,
                    reason: e.to_string(),
                })
                .and_then(|text| parse_job_file(&path, &text));
            let previous = self.files.remove(&path).and_then(|f| f.good);
            let good = match parsed {
                Ok(set) => {
                    report.loaded.push(path.clone());
                    Some(set)
                }
                Err(e) => {
                    report.rejected.push(e);
                    previous
                }
            };
            self.files.insert(
                path,
                LoadedFile {
                    modified,
                    len: meta.len(),
                    good,
                },
            );
        }
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !seen.contains(*p))
            .cloned()
            .collect();
        for path in gone {
            self.files.remove(&path);
            report.removed.push(path);
        }
        Ok(report)
    }

    /// The effective job set: every file's good version, in file-name order. A name defined
    /// in two files keeps the first; the later definition is reported as rejected.
    pub fn job_set(&self) -> (JobSet, Vec<InvalidJobFile>) {
        let mut set = JobSet::default();
        let mut conflicts = Vec::new();
        for (path, file) in &self.files {
            let Some(good) = &file.good else { continue };
            merge_first(&mut set.jobs, &good.jobs, "job", path, &mut conflicts);
            merge_first(
                &mut set.semaphores,
                &good.semaphores,
                "semaphore",
                path,
                &mut conflicts,
            );
            merge_first(
                &mut set.schedules,
                &good.schedules,
                "schedule",
                path,
                &mut conflicts,
            );
        }
        (set, conflicts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<JobSet, InvalidJobFile> {
        parse_job_file(Path::new("t.yaml"), text)
    }

    const SPEC_EXAMPLE: &str = r#"
jobs:
  - name: import_category_dump
    command: "/opt/etl/import.sh --date {date}"
    params:
      date: { required: true, pattern: '^[0-9]{4}_[0-9]{2}_[0-9]{2}$' }
    on_success: [reindex_search]
    on_failure: alert_ops
    delivery: broadcast
    timeout: 30m
    retries: 3
semaphores:
  - name: all_reindexed
    wait_for: [{ job: reindex_search, count: 10 }]
    key: "{date}"
    then: publish_site
    timeout: 2h
    on_timeout: alert_ops
"#;

    #[test]
    fn spec_example_parses() {
        let set = parse(SPEC_EXAMPLE).unwrap();
        let job = &set.jobs["import_category_dump"];
        assert_eq!(job.on_success, vec!["reindex_search"]);
        assert_eq!(job.on_failure, vec!["alert_ops"]);
        assert_eq!(job.timeout_ms, Some(30 * 60 * 1000));
        assert_eq!(job.retries, 3);
        assert!(job.params["date"].required);
        let sem = &set.semaphores["all_reindexed"];
        assert_eq!(
            sem.wait_for,
            vec![WaitFor {
                job: "reindex_search".into(),
                count: Some(10)
            }]
        );
        assert_eq!(sem.then, vec!["publish_site"]);
        assert_eq!(sem.timeout_ms, Some(2 * 3600 * 1000));
    }

    #[test]
    fn original_jobz_db_parses_with_implicit_params() {
        let set = parse(
            "sqoop_jobs:\n  - name: bfd_sync\n    command: /opt/sync.sh {date}\n    on_success: done_job\n    on_failure:\n",
        )
        .unwrap();
        let job = &set.jobs["bfd_sync"];
        assert_eq!(job.on_success, vec!["done_job"]);
        assert!(job.on_failure.is_empty());
        assert_eq!(job.params["date"].pattern, DEFAULT_PARAM_PATTERN);
        assert!(job.params["date"].required);
    }

    const SCHEDULES: &str = "\
schedules:
  - name: nightly_import
    job: import
    cron: '30 2 * * *'
    timezone: Europe/Berlin
    params: { date: '{slot:%Y_%m_%d}', note: 7 }
    catch_up: one
  - name: tick
    job: heartbeat
    every: 2s
    offset: 1s
    catch_up: all
    backlog: 5
";

    #[test]
    fn schedules_parse_with_their_defaults() {
        let set = parse(SCHEDULES).unwrap();
        let nightly = &set.schedules["nightly_import"];
        assert_eq!(nightly.job, "import");
        assert_eq!(nightly.timing.cron_expr(), Some("30 2 * * *"));
        assert_eq!(nightly.timing.zone_name(), "Europe/Berlin");
        assert_eq!(nightly.catch_up, CatchUp::One);
        assert_eq!(nightly.backlog, DEFAULT_BACKLOG);
        // 2026-03-29 02:30 does not exist in Berlin: the slot is 03:00 local.
        let slot = crate::schedule::parse_instant_ms("2026-03-29T01:00:00Z").unwrap();
        let params = nightly.params_for(slot).unwrap();
        assert_eq!(params["date"], "2026_03_29");
        assert_eq!(params["note"], "7");
        let tick = &set.schedules["tick"];
        assert_eq!(tick.timing, Timing::every(2000, 1000).unwrap());
        assert_eq!((tick.catch_up, tick.backlog), (CatchUp::All, 5));
        assert!(tick.params.is_empty());
        assert!(set.jobs.is_empty() && set.semaphores.is_empty());
    }

    #[test]
    fn bad_schedules_are_refused_naming_the_line_and_reason() {
        let bad = |entry: &str, says: &str| {
            let text = format!("schedules:\n  - name: ok\n    job: j\n    every: 1m\n{entry}");
            let err = parse(&text).unwrap_err();
            assert_eq!(err.line, Some(5), "{entry}: {err}");
            assert!(err.reason.contains(says), "{entry}: {err}");
        };
        bad("  - name: s\n    job: j\n", "give cron or every");
        bad(
            "  - name: s\n    job: j\n    cron: '@daily'\n    every: 1h\n",
            "not both",
        );
        bad(
            "  - name: s\n    job: j\n    cron: '0 0 * * 8'\n",
            "outside 0-7",
        );
        bad(
            "  - name: s\n    job: j\n    cron: '0 0 * *'\n",
            "five fields",
        );
        bad(
            "  - name: s\n    job: j\n    cron: '@daily'\n    timezone: Europe/Nowhere\n",
            "unknown time zone",
        );
        bad(
            "  - name: s\n    job: j\n    cron: '@daily'\n    offset: 1s\n",
            "offset goes with every",
        );
        bad(
            "  - name: s\n    job: j\n    every: 1h\n    timezone: UTC\n",
            "timezone goes with cron",
        );
        bad(
            "  - name: s\n    job: j\n    every: 500ms\n",
            "whole seconds",
        );
        bad(
            "  - name: s\n    job: j\n    every: 1h\n    offset: 2h\n",
            "less than every",
        );
        bad(
            "  - name: s\n    job: j\n    every: soon\n",
            "every \"soon\"",
        );
        bad(
            "  - name: s\n    job: j\n    every: 1h\n    catch_up: some\n",
            "catch_up",
        );
        bad(
            "  - name: s\n    job: j\n    every: 1h\n    backlog: 0\n",
            "backlog 0",
        );
        bad(
            "  - name: s\n    job: 'no such'\n    every: 1h\n",
            "not a valid job name",
        );
        bad(
            "  - name: s\n    job: j\n    every: 1h\n    params: { job_name: x }\n",
            "parameter name",
        );
        bad(
            "  - name: s\n    job: j\n    every: 1h\n    params: { d: '{today}' }\n",
            "unknown placeholder",
        );
        bad(
            "  - name: s\n    job: j\n    every: 1h\n    params: { d: [1] }\n",
            "expected a string",
        );
        bad(
            "  - name: s\n    job: j\n    every: 1h\n    when: now\n",
            "when",
        );
        let err = parse(&format!(
            "{SCHEDULES}  - name: tick\n    job: x\n    every: 1h\n"
        ))
        .unwrap_err();
        assert!(err.reason.contains("defined twice"), "{err}");
    }

    #[test]
    fn a_schedule_defined_in_two_files_is_a_check_problem_and_the_first_wins() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), SCHEDULES).unwrap();
        std::fs::write(
            dir.path().join("b.yaml"),
            "schedules:\n  - name: tick\n    job: other\n    every: 1h\n",
        )
        .unwrap();
        let checks = check_dir(dir.path()).unwrap();
        assert!(checks[0].problems.is_empty());
        assert!(
            matches!(&checks[1].problems[..], [FileProblem::DuplicateSchedule { name, .. }] if name == "tick")
        );
        let mut loaded = JobDir::new(dir.path());
        loaded.refresh().unwrap();
        let (set, conflicts) = loaded.job_set();
        assert_eq!(set.schedules["tick"].job, "heartbeat");
        assert_eq!(conflicts.len(), 1);
    }

    #[test]
    fn errors_name_the_line_and_reason() {
        let err =
            parse("jobs:\n  - name: ok\n    command: true\n  - name: bad job\n    command: x\n")
                .unwrap_err();
        assert_eq!(err.line, Some(4));
        assert!(err.reason.contains("bad job"), "{err}");
        let err = parse("jobs:\n  - name: a\n    command: x\n    on_sucess: b\n").unwrap_err();
        assert!(err.reason.contains("on_sucess"), "{err}");
        assert_eq!(err.line, Some(2));
        let err = parse("jobs: [\n").unwrap_err();
        assert!(err.line.is_some(), "{err}");
        let err = parse("jobs:\n  - name: a\n    command: 'x {'\n").unwrap_err();
        assert!(err.reason.contains("unclosed"), "{err}");
        let err =
            parse("jobs:\n  - name: a\n    command: x\n    params: { d: { pattern: '(' } }\n")
                .unwrap_err();
        assert!(err.reason.contains("bad pattern"), "{err}");
    }

    #[test]
    fn params_are_validated() {
        let set = parse(SPEC_EXAMPLE).unwrap();
        let job = ParamRules::compile(&set.jobs["import_category_dump"]).unwrap();
        let p = |pairs: &[(&str, &str)]| -> Params {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(job.validate_params(&p(&[("date", "2026_11_23")])), Ok(()));
        assert_eq!(
            job.validate_params(&p(&[])),
            Err(ParamError::Missing("date".into()))
        );
        assert!(matches!(
            job.validate_params(&p(&[("date", "2026_11_23\n")])),
            Err(ParamError::NoMatch { .. })
        ));
        assert!(matches!(
            job.validate_params(&p(&[("date", "$(id)")])),
            Err(ParamError::NoMatch { .. })
        ));
        assert_eq!(
            job.validate_params(&p(&[("date", "2026_11_23"), ("x", "1")])),
            Err(ParamError::Undeclared("x".into()))
        );
        // As a successor, undeclared parameters flow on; declared ones are still checked.
        assert_eq!(
            job.validate_declared_params(&p(&[("date", "2026_11_23"), ("x", "1")])),
            Ok(())
        );
        assert!(job
            .validate_declared_params(&p(&[("date", "bad"), ("x", "1")]))
            .is_err());
        assert!(job.validate_declared_params(&p(&[("x", "1")])).is_err());
    }

    #[test]
    fn an_unanchored_pattern_must_match_the_whole_value() {
        let set = parse(
            "jobs:\n  - name: a\n    command: 'echo {v} {w} {x}'\n    params:\n      v: { pattern: '[a-z]+' }\n      w: { pattern: 'ab|cd' }\n      x: { pattern: '(?m)^[a-z]+$' }\n",
        )
        .unwrap();
        // Kept as the author wrote it; anchoring is how it is applied, not a rewrite.
        assert_eq!(set.jobs["a"].params["v"].pattern, "[a-z]+");
        let job = ParamRules::compile(&set.jobs["a"]).unwrap();
        let p =
            |name: &str, value: &str| -> Params { [(name.to_owned(), value.to_owned())].into() };
        for (name, good) in [("v", "abc"), ("w", "ab"), ("w", "cd"), ("x", "abc")] {
            assert_eq!(
                job.validate_declared_params(&p(name, good)),
                Ok(()),
                "{name}={good:?}"
            );
        }
        for (name, hostile) in [
            ("v", "a ../../etc/passwd $(id) ';"),
            ("v", "$(id)abc"),
            ("v", "abc\n"),
            // A naive `^ab|cd$` would take these: each alternative is anchored at one end.
            ("w", "abX"),
            ("w", "Xcd"),
            // `(?m)` inside the pattern does not let a line stand for the whole value.
            ("x", "abc\n$(id)"),
            ("x", "$(id)\nabc"),
        ] {
            assert!(
                matches!(
                    job.validate_declared_params(&p(name, hostile)),
                    Err(ParamError::NoMatch { .. })
                ),
                "{name}={hostile:?} must be refused"
            );
        }
        // A pattern cannot close the wrapping group to add an unanchored alternative.
        for escape in [r"a)|(?:.*", r"a)|(.*", "a\\"] {
            let text = format!(
                "jobs:\n  - name: a\n    command: 'echo {{v}}'\n    params: {{ v: {{ pattern: '{escape}' }} }}\n"
            );
            let err = parse(&text).unwrap_err();
            assert!(err.reason.contains("bad pattern"), "{escape}: {err}");
        }
    }

    #[test]
    fn a_pattern_over_the_size_limit_is_refused_when_the_file_is_loaded() {
        // Unicode `\w` a hundred times over: megabytes of program, compiled in ~0.3 s.
        let err = parse(
            "jobs:\n  - name: a\n    command: x\n    params: { v: { pattern: '^\\w{100}$' } }\n",
        )
        .unwrap_err();
        assert!(err.reason.contains("parameter \"v\": bad pattern"), "{err}");
        assert!(err.reason.contains("size limit"), "{err}");
        assert_eq!(err.line, Some(2), "{err}");
        // What job files really use stays well inside it.
        for fine in [
            DEFAULT_PARAM_PATTERN,
            "^[0-9]{4}_[0-9]{2}_[0-9]{2}$",
            r"^\d{4}-\d{2}-\d{2}$",
            "(?s)^.*$",
            "[a-z]{1,1000}",
            r"^(?-u:\w){100}$",
        ] {
            assert!(compile_param_pattern(fine).is_ok(), "{fine}");
        }
    }

    #[test]
    fn a_placeholder_inside_quotes_is_refused_naming_the_line() {
        let text = "jobs:\n  - name: ok\n    command: echo {x} 'literal'\n  - name: quoted\n    description: sends x\n    command: \"notify 'value={x}'\"\n";
        assert!(parse("jobs:\n  - name: ok\n    command: echo {x} 'literal'\n").is_ok());
        let err = parse(text).unwrap_err();
        assert_eq!(err.line, Some(6), "{err}");
        assert!(err.reason.contains("job \"quoted\""), "{err}");
        assert!(err.reason.contains("{x}"), "{err}");
        assert!(err.reason.contains("single quotes"), "{err}");
        assert!(err.reason.contains("drop the quotes"), "{err}");

        // In a block, the line of the placeholder itself.
        let text =
            "jobs:\n  - name: block\n    command: |\n      echo {x}\n      echo \"value: {x}\"\n";
        let err = parse(text).unwrap_err();
        assert_eq!(err.line, Some(5), "{err}");
        assert!(err.reason.contains("double quotes"), "{err}");

        // `command:` before `name:`, after a nested list; and a flow-style entry.
        let text = "jobs:\n  - name: first\n    command: 'true'\n  - on_success:\n      - first\n    command: echo '{x}'\n    name: second\n";
        assert_eq!(parse(text).unwrap_err().line, Some(6));
        let text = "jobs:\n  - { name: flow, command: \"echo '{x}'\" }\n";
        assert_eq!(parse(text).unwrap_err().line, Some(2));
    }

    #[test]
    fn the_original_job_db_style_of_quoting_a_placeholder_is_refused() {
        // As original jobz files wrote it: the value was pasted in, so authors quoted it.
        // Here every value is already quoted: inside quotes, `$(...)` in a value would run.
        let text = "etl:\n  - name: sync\n    command: /opt/sync.sh {date}\n    on_failure: notify_failure\n  - name: notify_failure\n    command: /usr/local/bin/notify --channel etl \"jobz step failed on {date}\"\n";
        let err = parse(text).unwrap_err();
        assert_eq!(err.line, Some(6), "{err}");
        assert!(err.reason.contains("{date}"), "{err}");
    }

    #[test]
    fn run_as_is_read_from_both_formats_and_its_syntax_checked() {
        let set = parse("jobs:\n  - name: a\n    command: id -u\n    run_as: nobody\n").unwrap();
        assert_eq!(set.jobs["a"].run_as.as_deref(), Some("nobody"));
        let set = parse("etl:\n  - name: b\n    command: id -u\n    run_as: svc_etl-1\n").unwrap();
        assert_eq!(set.jobs["b"].run_as.as_deref(), Some("svc_etl-1"));
        let set = parse("jobs:\n  - name: c\n    command: true\n").unwrap();
        assert_eq!(set.jobs["c"].run_as, None);
        for bad in [
            "''",
            "../root",
            "/etc/passwd",
            "0",
            "1000",
            "-rf",
            "'a b'",
            "'a;id'",
            "'a\\0b'",
            "'$(id)'",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", // 33 characters
        ] {
            let text = format!("jobs:\n  - name: a\n    command: x\n    run_as: {bad}\n");
            let err = parse(&text).unwrap_err();
            assert!(err.reason.contains("run_as"), "{bad}: {err}");
            assert_eq!(err.line, Some(2), "{bad}: {err}");
        }
        assert!(
            is_valid_user_name("nobody") && is_valid_user_name("_x") && is_valid_user_name("host$")
        );
        assert!(
            !is_valid_user_name("a\0b") && !is_valid_user_name("a/b") && !is_valid_user_name("$")
        );
    }

    #[test]
    fn a_job_spec_without_run_as_decodes_and_encodes_as_before() {
        // Heartbeats carry JobSpecs: an older worker's (no `run_as`) must still decode.
        let set = parse(SPEC_EXAMPLE).unwrap();
        let job = set.jobs["import_category_dump"].clone();
        let mut old = serde_json::to_value(&job).unwrap();
        assert!(old.get("run_as").is_none(), "None is not sent");
        old.as_object_mut().unwrap().remove("run_as");
        let back: JobSpec = serde_json::from_value(old).unwrap();
        assert_eq!(back, job);
    }

    #[test]
    fn parameter_names_are_restricted() {
        assert!(is_valid_param_name("date") && is_valid_param_name("_x9"));
        for bad in ["", "9a", "a-b", "a=b", &"p".repeat(65)] {
            assert!(!is_valid_param_name(bad), "{bad:?}");
        }
        let err =
            parse("jobs:\n  - name: a\n    command: x\n    params: { a-b: {} }\n").unwrap_err();
        assert!(err.reason.contains("a-b"), "{err}");
        assert!(parse("jobs:\n  - name: a\n    command: 'x {wait}'\n").is_err());
    }

    #[test]
    fn a_job_declaring_a_parameter_named_like_a_job_start_argument_is_refused_at_load() {
        for reserved in RESERVED_QUERY_NAMES {
            assert!(!is_valid_param_name(reserved), "{reserved}");
            let declared =
                format!("jobs:\n  - name: a\n    command: x\n    params: {{ {reserved}: {{}} }}\n");
            let err = parse(&declared).unwrap_err();
            assert!(
                err.reason.contains(&format!("{reserved:?} is reserved"))
                    && err
                        .reason
                        .contains("job_name, wait, priority, delay, at, depends, tags"),
                "{reserved}: {err}"
            );
            // A placeholder declares a parameter too.
            let placeholder = format!("jobs:\n  - name: a\n    command: 'echo {{{reserved}}}'\n");
            let err = parse(&placeholder).unwrap_err();
            assert!(err.reason.contains("is reserved"), "{reserved}: {err}");
        }
        // A name that only starts like one is fine.
        assert!(parse("jobs:\n  - name: a\n    command: 'x {at_date} {tags_x}'\n").is_ok());
    }

    #[test]
    fn inputs_outputs_and_output_ttl_are_read_and_checked_at_load() {
        let set = parse(
            "jobs:\n  - name: a\n    command: x {day}\n    inputs: [\"raw.{day}\"]\n    outputs: [\"clean.{day}\", done]\n    output_ttl: 1h\n",
        )
        .unwrap();
        let a = &set.jobs["a"];
        assert_eq!(a.inputs, vec!["raw.{day}".to_string()]);
        assert_eq!(
            a.outputs,
            vec!["clean.{day}".to_string(), "done".to_string()]
        );
        assert_eq!(a.output_ttl_ms, Some(3_600_000));
        for (bad, needle) in [
            ("inputs: [\"raw.{nope}\"]", "not a parameter"),
            ("outputs: [\"a/b\"]", "not a valid resource name"),
            ("outputs: [\"\"]", "not a valid resource name"),
            ("outputs: [\"a b\"]", "not a valid resource name"),
            ("output_ttl: 1h", "output_ttl without outputs"),
            ("outputs: [x]\n    output_ttl: soon", "output_ttl"),
        ] {
            let text = format!("jobs:\n  - name: a\n    command: x\n    {bad}\n");
            let err = parse(&text).unwrap_err();
            assert!(err.reason.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn priority_and_max_concurrency_are_read_and_default_to_none() {
        let set = parse(
            "jobs:\n  - name: a\n    command: x\n    priority: -5\n    max_concurrency: 2\n  - name: b\n    command: x\n",
        )
        .unwrap();
        assert_eq!(
            (set.jobs["a"].priority, set.jobs["a"].max_concurrency),
            (-5, Some(2))
        );
        assert_eq!(
            (set.jobs["b"].priority, set.jobs["b"].max_concurrency),
            (0, None)
        );
        let err =
            parse("jobs:\n  - name: a\n    command: x\n    max_concurrency: 0\n").unwrap_err();
        assert!(err.reason.contains("max_concurrency"), "{err}");
        for bad in ["priority: high", "priority: 1.5", "max_concurrency: -1"] {
            let text = format!("jobs:\n  - name: a\n    command: x\n    {bad}\n");
            assert!(parse(&text).is_err(), "{bad}");
        }
        // A spec from an older worker (without either field) still decodes.
        let mut old = serde_json::to_value(&set.jobs["b"]).unwrap();
        old.as_object_mut().unwrap().remove("priority");
        let back: JobSpec = serde_json::from_value(old).unwrap();
        assert_eq!(back, set.jobs["b"]);
    }

    #[test]
    fn names_are_restricted() {
        assert!(is_valid_name("import_category_dump.v2-a"));
        for bad in ["", "a b", "a/b", "a\0", "ä", &"x".repeat(129)] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn dir_keeps_last_good_version_and_drops_removed_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        std::fs::write(&file, "jobs:\n  - name: a\n    command: 'true'\n").unwrap();
        let mut jd = JobDir::new(dir.path());
        let r = jd.refresh().unwrap();
        assert!(r.changed() && r.rejected.is_empty());
        assert!(jd.job_set().0.jobs.contains_key("a"));

        std::fs::write(
            &file,
            "jobs:\n  - name: a\n    command: 'true'\n  - name: b b\n    command: x\n",
        )
        .unwrap();
        let r = jd.refresh().unwrap();
        assert_eq!(r.rejected.len(), 1);
        assert!(!r.changed());
        assert!(
            jd.job_set().0.jobs.contains_key("a"),
            "last good version stays"
        );

        std::fs::remove_file(&file).unwrap();
        let r = jd.refresh().unwrap();
        assert_eq!(r.removed.len(), 1);
        assert!(jd.job_set().0.jobs.is_empty());
    }

    #[test]
    fn a_duplicate_across_files_keeps_the_first() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            "jobs:\n  - name: x\n    command: a\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("b.yaml"),
            "jobs:\n  - name: x\n    command: b\n",
        )
        .unwrap();
        let mut jd = JobDir::new(dir.path());
        jd.refresh().unwrap();
        let (set, conflicts) = jd.job_set();
        assert_eq!(set.jobs["x"].command, "a");
        assert_eq!(conflicts.len(), 1);
    }

    #[test]
    fn notify_entries_name_a_webhook_or_an_address_and_the_ends_they_hear_of() {
        let text = "jobs:\n  - name: a\n    command: x\n    notify:\n      - webhook: ops\n      - email: oncall@example.com\n        on: always\n";
        let set = parse(text).unwrap();
        let a = &set.jobs["a"];
        assert_eq!(
            a.notify,
            [
                Notify {
                    to: NotifyTarget::Webhook("ops".into()),
                    on: NotifyOn::Failure
                },
                Notify {
                    to: NotifyTarget::Email("oncall@example.com".into()),
                    on: NotifyOn::Always
                },
            ]
        );
        assert!(NotifyOn::Failure.matches(Some(false)) && !NotifyOn::Failure.matches(None));
        assert!(NotifyOn::Success.matches(Some(true)) && !NotifyOn::Success.matches(Some(false)));
        assert!(NotifyOn::Always.matches(None));
        for (bad, needle) in [
            (
                "- webhook: ops\n        email: a@b.c",
                "one webhook: or one email:",
            ),
            ("- {}", "one webhook: or one email:"),
            ("- webhook: \"a b\"", "must be a name"),
            ("- email: nobody", "not an e-mail address"),
            (
                "- email: \"a@b.c>\\nRCPT TO:<x@y.z\"",
                "not an e-mail address",
            ),
            (
                "- email: a@b.c\n        on: sometimes",
                "failure, success or always",
            ),
            ("- url: http://x", "unknown field"),
        ] {
            let text = format!("jobs:\n  - name: a\n    command: x\n    notify:\n      {bad}\n");
            let err = parse(&text).unwrap_err();
            assert!(err.reason.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn check_names_every_problem_of_a_file_at_its_line_and_column() {
        let text = "\
# build runs after fetch; fetch has a typo below
jobs:
  - name: fetch
    command: x
    retries: many
  - name: build
    command: y
    on_success: [\"no such name!\"]
  - name: ok
    command: z
  - name: ok
    command: z
";
        let problems = check_job_file(Path::new("t.yaml"), text);
        let places: Vec<(Option<usize>, Option<usize>)> =
            problems.iter().map(|p| (p.line, p.column)).collect();
        assert_eq!(
            places,
            [(Some(3), Some(5)), (Some(6), Some(5)), (Some(11), Some(5))],
            "{problems:?}"
        );
        assert!(problems[0].reason.contains("\"fetch\""), "{}", problems[0]);
        assert!(problems[1].reason.contains("on_success"), "{}", problems[1]);
        assert!(
            problems[2].reason.contains("defined twice"),
            "{}",
            problems[2]
        );
        assert_eq!(
            problems[0]
                .to_string()
                .split(':')
                .take(3)
                .collect::<Vec<_>>(),
            ["t.yaml", "3", "5"]
        );
        // Loading takes the first; a good file has none.
        assert_eq!(parse(text).unwrap_err(), problems[0]);
        assert!(
            check_job_file(Path::new("t.yaml"), "jobs:\n  - name: a\n    command: x\n").is_empty()
        );
        // A syntax error: the parser's own line and column.
        let bad = check_job_file(Path::new("t.yaml"), "jobs:\n  - name: a\n   command: [x\n");
        assert_eq!(bad.len(), 1);
        assert!(
            bad[0].line.is_some() && bad[0].column.is_some(),
            "{}",
            bad[0]
        );
    }
}
