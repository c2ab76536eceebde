//! `jobz::template`: parsing arbitrary template text and rendering it with arbitrary
//! parameter maps. Commands reach `/bin/sh -c` through `render_shell`, so besides "no
//! panic" this checks the property that keeps values out of the shell's syntax: a value
//! rendered alone is exactly one shell word, equal to the value.
//!
//! Input: `template 0xFF name 0xFF value 0xFF name 0xFF value …` (0xFF never occurs in
//! UTF-8, so the seeds are readable and any text, NUL included, can be a template, a
//! name or a value); invalid UTF-8 in a piece is replaced, not dropped.
#![no_main]

use std::collections::BTreeMap;

use jobz::template::{RenderError, Template};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut pieces = data
        .split(|&b| b == 0xff)
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let text = pieces.next().unwrap_or_default();
    let mut values = BTreeMap::new();
    while let (Some(name), Some(value)) = (pieces.next(), pieces.next()) {
        values.insert(name, value);
    }

    // One value alone, shell-rendered: one word, the value itself (or refused for a NUL).
    let Ok(single) = Template::parse("{v}") else {
        panic!("the constant template does not parse");
    };
    for value in values.values() {
        let one = BTreeMap::from([("v".to_owned(), value.clone())]);
        match single.render_shell(&one) {
            Ok(cmd) => assert_eq!(
                shlex::split(&cmd),
                Some(vec![value.clone()]),
                "value {value:?} rendered as {cmd:?}"
            ),
            Err(RenderError::Unquotable(_)) => assert!(value.contains('\0'), "{value:?}"),
            Err(e) => panic!("unexpected error {e} for {value:?}"),
        }
    }

    let Ok(template) = Template::parse(&text) else {
        return;
    };
    // Any template: the placement check answers (no panic, no hang) with a line inside it.
    if let Err(e) = template.check_shell_placement() {
        assert!(e.line <= text.matches('\n').count(), "{e:?} in {text:?}");
    }
    let complete = template.params().iter().all(|p| values.contains_key(*p));
    let plain = template.render_plain(&values);
    let shell = template.render_shell(&values);
    if complete {
        assert!(
            plain.is_ok(),
            "all values given, render_plain failed: {plain:?}"
        );
        if let Err(e) = &shell {
            assert!(matches!(e, RenderError::Unquotable(_)), "{e}");
        }
    } else {
        assert!(matches!(plain, Err(RenderError::Missing(_))), "{plain:?}");
        assert!(shell.is_err(), "{shell:?}");
    }
});
