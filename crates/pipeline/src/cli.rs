//! The command line every binary shares: `--config PATH` and repeatable `--set section.key=value`.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::Config;
use crate::error::{Error, Result};

/// Parsed common arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// Default: ./pipeline.toml.
    pub config: PathBuf,
    /// `section.key=value` overrides, in order; later ones win.
    pub overrides: Vec<String>,
}

/// What the command line asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Run(Args),
    Help,
}

/// Parses the arguments after the program name.
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Parsed> {
    let mut out = Args {
        config: PathBuf::from("pipeline.toml"),
        overrides: Vec::new(),
    };
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| Error::Usage(format!("{name} needs a value")))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Parsed::Help),
            "-c" | "--config" => out.config = value("--config")?.into(),
            "-s" | "--set" => out.overrides.push(value("--set")?),
            _ => {
                return Err(Error::Usage(format!(
                    "unknown argument `{arg}` (try --help)"
                )))
            }
        }
    }
    Ok(Parsed::Run(out))
}

/// The help text of a binary.
pub fn help(name: &str, about: &str) -> String {
    format!(
        "{name}: {about}\n\n\
         Usage: {name} [--config PATH] [--set section.key=value]...\n\n\
         Options:\n  \
         -c, --config PATH        config file (default: ./pipeline.toml)\n  \
         -s, --set KEY=VALUE      override one config key, e.g. --set extract.batch_size=64;\n                           \
         repeatable, wins over the file (values in TOML syntax)\n  \
         -h, --help               this text\n\n\
         Every key is documented in pipeline.toml.\n"
    )
}

/// Parses the process arguments and loads the config; `None` when help was printed.
pub fn load_config(name: &str, about: &str) -> Result<Option<Config>> {
    match parse(std::env::args().skip(1))? {
        Parsed::Help => {
            print!("{}", help(name, about));
            Ok(None)
        }
        Parsed::Run(args) => Config::load(&args.config, &args.overrides).map(Some),
    }
}

/// A binary's whole `main`: parse arguments, load the config, run, print any error and map it
/// to a non-zero exit code.
pub fn main(name: &str, about: &str, run: impl FnOnce(&Config) -> Result<()>) -> ExitCode {
    crate::allocator::keep_freed_memory();
    let result = load_config(name, about).and_then(|c| match c {
        Some(config) => run(&config),
        None => Ok(()),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Parsed> {
        parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parses_config_and_repeated_sets() {
        let Ok(Parsed::Run(a)) = p(&["--config", "x.toml", "--set", "a.b=1", "--set=c.d=2"]) else {
            panic!("should parse");
        };
        assert_eq!(a.config, PathBuf::from("x.toml"));
        assert_eq!(a.overrides, vec!["a.b=1", "c.d=2"]);
    }

    #[test]
    fn rejects_unknown_and_incomplete_arguments() {
        assert!(p(&["--bogus"]).is_err());
        assert!(p(&["--set"]).is_err());
        assert_eq!(p(&["-h"]).ok(), Some(Parsed::Help));
    }
}
