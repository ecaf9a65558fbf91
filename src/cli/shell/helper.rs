//! The line editor's helper: Tab completion (see `complete`), with the
//! schema or HMP's help asked of the session the first time it is needed,
//! on the editor's thread.

use super::complete::{self, Candidate, HmpNames, Schema};
use super::front::Handle;
use crate::cli::args::request;
use rustyline::completion::{Completer, Pair};
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::validate::Validator;
use rustyline::Context;
use std::cell::OnceCell;

pub struct Helper {
    hmp: bool,
    /// QMP's command names (from `query-commands`) and the shell's own.
    commands: Vec<String>,
    handle: Handle,
    /// Asked for once; `None` if that failed (not asked again: each try
    /// could wait).
    schema: OnceCell<Option<Schema>>,
    hmp_names: OnceCell<Option<HmpNames>>,
}

impl Helper {
    pub fn new(hmp: bool, mut commands: Vec<String>, handle: Handle) -> Helper {
        commands.extend(["exit".to_owned(), "help".to_owned()]);
        Helper {
            hmp,
            commands,
            handle,
            schema: OnceCell::new(),
            hmp_names: OnceCell::new(),
        }
    }

    fn schema(&self) -> Option<&Schema> {
        self.schema
            .get_or_init(|| {
                let line = self.handle.fetch(&request("query-qmp-schema", None, None))?;
                Some(Schema::from_return(line.value.get("return")?))
            })
            .as_ref()
    }

    fn hmp_names(&self) -> Option<&HmpNames> {
        self.hmp_names
            .get_or_init(|| {
                Some(HmpNames::from_help(
                    &self.hmp_text("help")?,
                    &self.hmp_text("help info")?,
                ))
            })
            .as_ref()
    }

    /// HMP's answer to `command_line`.
    fn hmp_text(&self, command_line: &str) -> Option<String> {
        let (command, arguments) = crate::cli::args::hmp(command_line);
        let line = self.handle.fetch(&request(&command, Some(&arguments), None))?;
        line.value.get("return")?.as_str().map(str::to_owned)
    }
}

impl Completer for Helper {
    type Candidate = Pair;

    fn complete(&self, line: &str, pos: usize, _: &Context<'_>) -> rustyline::Result<(usize, Vec<Pair>)> {
        let text = line.get(..pos).unwrap_or(line);
        let (start, candidates) = if self.hmp {
            complete::hmp(text, || self.hmp_names())
        } else {
            complete::qmp(text, &self.commands, || self.schema())
        };
        let pairs = candidates
            .into_iter()
            .map(|Candidate { display, replacement }| Pair { display, replacement })
            .collect();
        Ok((start, pairs))
    }
}

impl Hinter for Helper {
    type Hint = String;
}

impl Highlighter for Helper {}

impl Validator for Helper {}

impl rustyline::Helper for Helper {}
