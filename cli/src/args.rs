//! The commands and flags.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// The command line for a jobz mesh: start runs, watch them, act on them.
#[derive(Debug, Parser)]
#[command(
    name = "jobz",
    version = concat!(env!("CARGO_PKG_VERSION"), "+", env!("JOBZ_COMMIT")),
    after_help = "Exit codes: 0 done (with start --wait: the run succeeded); 1 the run failed \
                  or was cancelled; 2 bad usage or refused by the frontend (4xx); 3 frontend \
                  or broker unavailable (5xx, no connection); 4 start --wait=SECONDS ran out \
                  before the run ended.\n\nThe token comes from JOBZ_TOKEN, else --token-file, \
                  else ~/.config/jobz/token (${XDG_CONFIG_HOME}/jobz/token) if it exists."
)]
pub struct Cli {
    /// The frontend's URL.
    #[arg(
        long,
        env = "JOBZ_URL",
        default_value = "http://127.0.0.1:6769",
        global = true
    )]
    pub url: String,
    /// A file holding the API token (used when JOBZ_TOKEN is not set).
    #[arg(long, env = "JOBZ_TOKEN_FILE", value_name = "FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// PEM file of the CA that signed an https frontend's certificate (else the Mozilla
    /// roots).
    #[arg(long, env = "JOBZ_CA", value_name = "FILE", global = true)]
    pub ca: Option<PathBuf>,
    /// Print the frontend's JSON instead of a table (for scripts).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a run of JOB with parameters NAME=VALUE.
    Start {
        /// The job.
        job: String,
        /// Its parameters, NAME=VALUE each.
        #[arg(value_name = "NAME=VALUE")]
        params: Vec<String>,
        /// Wait for the run to end (at most SECONDS if given); the exit code then says how
        /// it ended.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1)]
        wait: Option<Option<f64>>,
        /// Priority of its steps (higher first).
        #[arg(long, allow_negative_numbers = true)]
        priority: Option<i32>,
        /// Start no earlier than this long from now (`90s`, `5m`, `1h 30m`).
        #[arg(long, conflicts_with = "at")]
        delay: Option<String>,
        /// Start no earlier than this time (RFC 3339).
        #[arg(long)]
        at: Option<String>,
        /// Start once this run has succeeded (repeatable).
        #[arg(long = "depends", value_name = "RUN_ID")]
        depends: Vec<String>,
        /// A label for the run (repeatable).
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        /// The trigger's idempotency key: the same key for the same job within a day gives
        /// the same run (default: a fresh one, so that retries of this command's own
        /// requests never start a second run).
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
    },
    /// List runs, newest first.
    Runs {
        /// Only runs of this job.
        #[arg(long)]
        job: Option<String>,
        /// Only runs in this state (pending, scheduled, waiting, running, succeeded,
        /// failed, cancelled).
        #[arg(long)]
        state: Option<String>,
        /// Only runs with this tag.
        #[arg(long)]
        tag: Option<String>,
        /// At most this many.
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Show a run and its steps.
    Show {
        /// The run.
        run: String,
    },
    /// Print a run's output; with -f, follow it until the run ends.
    Log {
        /// The run.
        run: String,
        /// Follow the output until the run ends.
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Retry a task that failed for good (listed by `jobz dead`): a new run of its job.
    Retry {
        /// The dead task.
        task: String,
    },
    /// List the tasks that failed for good, newest first.
    Dead,
    /// Cancel a run: its running steps are killed.
    Cancel {
        /// The run.
        run: String,
        /// Also when other runs wait for it (they fail).
        #[arg(long)]
        force: bool,
    },
    /// List the workers.
    Workers,
    /// List the jobs and the workers that serve them.
    Jobs,
}
