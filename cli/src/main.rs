//! `jobz`: see the library's docs (`jobz_cli`).

use std::process::ExitCode;

use clap::Parser;
use jobz_cli::args::Cli;
use jobz_cli::client::{default_token_file, token, Client};
use jobz_cli::commands;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_file = default_token_file(
        std::env::var("XDG_CONFIG_HOME").ok(),
        std::env::var("HOME").ok(),
    );
    let token = token(
        std::env::var("JOBZ_TOKEN").ok(),
        cli.token_file.as_deref(),
        default_file,
    );
    let outcome = token
        .and_then(|token| Client::new(&cli.url, token, cli.ca.as_deref()))
        .and_then(|client| commands::run(&cli, &client, &mut std::io::stdout().lock()));
    match outcome {
        Ok(code) => ExitCode::from(code as u8),
        Err(failure) => {
            eprintln!("jobz: {}", failure.message);
            ExitCode::from(failure.code as u8)
        }
    }
}
