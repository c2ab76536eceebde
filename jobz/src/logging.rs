//! `tracing` set-up shared by every binary: `--log-file`, `--log-format text|json`.

use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::Context;

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The logging flags every binary takes.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Append logs to this file instead of standard error.
    #[arg(long, env = "JOBZ_LOG_FILE", value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// Log line format.
    #[arg(long, env = "JOBZ_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl LogArgs {
    /// Installs the global subscriber as these flags say.
    pub fn init(&self) -> anyhow::Result<()> {
        init(self.log_file.as_ref(), self.log_format)
    }
}

/// Installs the global subscriber. `RUST_LOG` overrides the level (default `info`).
pub fn init(file: Option<&PathBuf>, format: LogFormat) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let result = match (file, format) {
        (None, LogFormat::Text) => {
            use std::io::IsTerminal;
            let ansi = std::io::stderr().is_terminal();
            builder
                .with_ansi(ansi)
                .with_writer(std::io::stderr)
                .try_init()
        }
        // Each line names its spans once, in `spans` (the default would repeat the
        // innermost one as `span`).
        (None, LogFormat::Json) => builder
            .json()
            .with_current_span(false)
            .with_writer(std::io::stderr)
            .try_init(),
        (Some(path), format) => {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating log directory {}", parent.display()))?;
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening log file {}", path.display()))?;
            let writer = Mutex::new(file);
            match format {
                LogFormat::Text => builder.with_ansi(false).with_writer(writer).try_init(),
                LogFormat::Json => builder
                    .json()
                    .with_current_span(false)
                    .with_writer(writer)
                    .try_init(),
            }
        }
    };
    result.map_err(|e| anyhow::anyhow!("installing the logger: {e}"))
}
