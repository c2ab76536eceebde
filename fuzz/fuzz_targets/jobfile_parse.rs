//! `jobz::jobfile::parse_job_file` on arbitrary text: both formats (the jobz `jobs:` /
//! `semaphores:` lists and the original jobz job db) go through this one entry point, and
//! job files are written by operators and shipped by Ansible, so a bad file must be an
//! error naming a line, never a panic or a hang. Accepted jobs are then checked against a
//! parameter set taken from the same input, with the rules the broker compiles at registration.
#![no_main]

use std::path::Path;

use jobz::jobfile::{parse_job_file, ParamRules};
use jobz::message::Params;
use jobz::template::Template;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Job files are read as UTF-8; invalid bytes are a read error before the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(set) = parse_job_file(Path::new("fuzz.yaml"), text) else {
        return;
    };
    // Every line of the input as a `name=value` parameter.
    let params: Params = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    for job in set.jobs.values() {
        // The parser compiled these patterns: compiling them again cannot fail.
        let rules = match ParamRules::compile(job) {
            Ok(rules) => rules,
            Err(e) => panic!("accepted job {:?} does not compile: {e}", job.name),
        };
        let _ = rules.validate_params(&params);
        let _ = rules.validate_declared_params(&params);
        // The parser accepted the command: it must parse as a template again, and every
        // placeholder in it must be a declared parameter.
        let template = match Template::parse(&job.command) {
            Ok(t) => t,
            Err(e) => panic!("accepted command {:?} does not parse: {e}", job.command),
        };
        assert!(
            template.check_shell_placement().is_ok(),
            "accepted command {:?} has a misplaced placeholder",
            job.command
        );
        for used in template.params() {
            assert!(
                job.params.contains_key(used),
                "placeholder {used:?} undeclared"
            );
        }
    }
    for semaphore in set.semaphores.values() {
        assert!(
            Template::parse(&semaphore.key).is_ok(),
            "accepted key {:?} does not parse",
            semaphore.key
        );
    }
});
