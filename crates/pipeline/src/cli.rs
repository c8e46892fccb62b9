//! The command line every binary shares: `--config PATH` and repeatable `--set section.key=value`,
//! plus the mode flags a binary accepts (`extract --gc`) and `extract`'s `--shard K/N`.

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
    /// What to do (the default, or a mode flag the binary accepts).
    pub mode: Mode,
    /// `--shard K/N` (checked to be well-formed), where the binary accepts it.
    pub shard: Option<String>,
}

/// What a binary accepts besides `--config`, `--set` and `--help`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Accepts<'a> {
    /// Mode flags (`--gc`).
    pub modes: &'a [Mode],
    /// `--shard K/N` (run as task K of N; `extract`).
    pub shard: bool,
}

/// The help line of `--shard`.
const SHARD_HELP: &str = "      --shard K/N          extract only part K of N (counted from 0), as one task of\n                           \
                          an array job on a shared feature store; default: from\n                           \
                          [extract] shard, SLURM_ARRAY_TASK_ID/_MIN/_COUNT or\n                           \
                          JOB_COMPLETION_INDEX + PIPELINE_SHARD_COUNT\n";

/// What a binary is asked to do besides its default job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// The binary's job.
    #[default]
    Run,
    /// `--gc`: delete the feature store's unreferenced shards (`extract` only).
    Gc,
}

impl Mode {
    /// The flag that selects the mode.
    pub fn flag(self) -> &'static str {
        match self {
            Mode::Run => "",
            Mode::Gc => "--gc",
        }
    }

    /// The help line of the mode's flag.
    fn help(self) -> &'static str {
        match self {
            Mode::Run => "",
            Mode::Gc => {
                "      --gc                 delete the feature store's shards that no dataset\n                           \
                 row map references, and say what was freed\n"
            }
        }
    }
}

/// What the command line asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Run(Args),
    Help,
}

/// Parses the arguments after the program name (no mode flags).
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Parsed> {
    parse_with(args, &[])
}

/// Parses the arguments after the program name, accepting the flags of `modes`.
pub fn parse_with(args: impl IntoIterator<Item = String>, modes: &[Mode]) -> Result<Parsed> {
    parse_for(
        args,
        Accepts {
            modes,
            shard: false,
        },
    )
}

/// Parses the arguments after the program name, accepting what `accepts` lists.
pub fn parse_for(args: impl IntoIterator<Item = String>, accepts: Accepts) -> Result<Parsed> {
    let modes = accepts.modes;
    let mut out = Args {
        config: PathBuf::from("pipeline.toml"),
        overrides: Vec::new(),
        mode: Mode::Run,
        shard: None,
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
                .ok_or_else(|| Error::Usage {
                    argument: name.to_string(),
                    message: "needs a value".into(),
                })
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Parsed::Help),
            "-c" | "--config" => out.config = value("--config")?.into(),
            "-s" | "--set" => out.overrides.push(value("--set")?),
            "--shard" if accepts.shard => {
                let v = value("--shard")?;
                crate::features::parts::Part::parse(&v).map_err(|message| Error::Shard {
                    origin: "--shard".into(),
                    message,
                })?;
                out.shard = Some(v);
            }
            f if inline.is_none() && modes.iter().any(|m| m.flag() == f) => {
                let mode = modes.iter().copied().find(|m| m.flag() == f);
                out.mode = mode.unwrap_or_default();
            }
            _ => {
                return Err(Error::Usage {
                    argument: arg.clone(),
                    message: "unknown argument (try --help)".into(),
                })
            }
        }
    }
    if out.shard.is_some() && out.mode != Mode::Run {
        return Err(Error::Usage {
            argument: "--shard".into(),
            message: format!("cannot be combined with {}", out.mode.flag()),
        });
    }
    Ok(Parsed::Run(out))
}

/// The help text of a binary.
pub fn help(name: &str, about: &str) -> String {
    help_with(name, about, &[])
}

/// The help text of a binary that accepts the flags of `modes`.
pub fn help_with(name: &str, about: &str, modes: &[Mode]) -> String {
    help_for(
        name,
        about,
        Accepts {
            modes,
            shard: false,
        },
    )
}

/// The help text of a binary that accepts what `accepts` lists.
pub fn help_for(name: &str, about: &str, accepts: Accepts) -> String {
    let modes = accepts.modes;
    let mut flags: String = modes.iter().map(|m| format!(" [{}]", m.flag())).collect();
    let mut lines: String = modes.iter().map(|m| m.help()).collect();
    if accepts.shard {
        flags.push_str(" [--shard K/N]");
        lines.push_str(SHARD_HELP);
    }
    format!(
        "{name}: {about}\n\n\
         Usage: {name} [--config PATH] [--set section.key=value]...{flags}\n\n\
         Options:\n  \
         -c, --config PATH        config file (default: ./pipeline.toml)\n  \
         -s, --set KEY=VALUE      override one config key, e.g. --set extract.batch_size=64;\n                           \
         repeatable, wins over the file (values in TOML syntax)\n\
         {lines}  \
         -h, --help               this text\n\n\
         Every key is documented in pipeline.toml.\n"
    )
}

/// Parses the process arguments and loads the config; `None` when help was printed.
pub fn load_config(name: &str, about: &str) -> Result<Option<Config>> {
    Ok(load_config_with(name, about, &[])?.map(|(c, _)| c))
}

/// [`load_config`] for a binary that accepts the flags of `modes`: also returns the mode.
pub fn load_config_with(name: &str, about: &str, modes: &[Mode]) -> Result<Option<(Config, Mode)>> {
    let accepts = Accepts {
        modes,
        shard: false,
    };
    Ok(load_config_for(name, about, accepts)?.map(|(c, a)| (c, a.mode)))
}

/// [`load_config`] for a binary that accepts what `accepts` lists: also returns the arguments.
pub fn load_config_for(
    name: &str,
    about: &str,
    accepts: Accepts,
) -> Result<Option<(Config, Args)>> {
    match parse_for(std::env::args().skip(1), accepts)? {
        Parsed::Help => {
            print!("{}", help_for(name, about, accepts));
            Ok(None)
        }
        Parsed::Run(args) => Ok(Some((Config::load(&args.config, &args.overrides)?, args))),
    }
}

/// A binary's whole `main`: parse arguments, load the config, run, print any error and map it
/// to a non-zero exit code.
pub fn main(name: &str, about: &str, run: impl FnOnce(&Config) -> Result<()>) -> ExitCode {
    main_with_modes(name, about, &[], |config, _| run(config))
}

/// [`main`] for a binary that accepts the flags of `modes`; `run` gets the chosen mode.
pub fn main_with_modes(
    name: &str,
    about: &str,
    modes: &[Mode],
    run: impl FnOnce(&Config, Mode) -> Result<()>,
) -> ExitCode {
    let accepts = Accepts {
        modes,
        shard: false,
    };
    main_for(name, about, accepts, |config, args| run(config, args.mode))
}

/// [`main`] for a binary that accepts what `accepts` lists; `run` gets the parsed arguments.
pub fn main_for(
    name: &str,
    about: &str,
    accepts: Accepts,
    run: impl FnOnce(&Config, &Args) -> Result<()>,
) -> ExitCode {
    crate::allocator::keep_freed_memory();
    let result = load_config_for(name, about, accepts).and_then(|c| match c {
        Some((config, args)) => run(&config, &args),
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
    fn mode_flags_are_accepted_only_where_offered() {
        let Ok(Parsed::Run(a)) = parse_with(
            ["--gc", "-c", "x.toml"].iter().map(|s| s.to_string()),
            &[Mode::Gc],
        ) else {
            panic!("should parse");
        };
        assert_eq!((a.mode, a.config), (Mode::Gc, PathBuf::from("x.toml")));
        let Ok(Parsed::Run(a)) = parse_with(["-c", "x.toml"].map(String::from), &[Mode::Gc]) else {
            panic!("should parse");
        };
        assert_eq!(a.mode, Mode::Run);
        assert!(p(&["--gc"]).is_err(), "binaries without modes refuse --gc");
        assert!(help_with("extract", "x", &[Mode::Gc]).contains("--gc"));
        assert!(!help("train-head", "x").contains("--gc"));
    }

    #[test]
    fn shard_is_accepted_only_where_offered_and_checked() {
        let extract = Accepts {
            modes: &[Mode::Gc],
            shard: true,
        };
        let parse = |args: &[&str]| parse_for(args.iter().map(|s| s.to_string()), extract);
        let Ok(Parsed::Run(a)) = parse(&["--shard", "2/4", "-c", "x.toml"]) else {
            panic!("should parse");
        };
        assert_eq!((a.shard.as_deref(), a.mode), (Some("2/4"), Mode::Run));
        let Ok(Parsed::Run(a)) = parse(&["--shard=0/1"]) else {
            panic!("should parse");
        };
        assert_eq!(a.shard.as_deref(), Some("0/1"));
        for bad in [&["--shard", "4/4"][..], &["--shard", "x"], &["--shard"]] {
            let err = parse(bad).expect_err("malformed");
            assert!(err.to_string().contains("--shard"), "{err}");
        }
        let err = parse(&["--gc", "--shard", "1/2"]).expect_err("gc and shard");
        assert!(err.to_string().contains("cannot be combined"), "{err}");
        assert!(
            p(&["--shard", "1/2"]).is_err(),
            "binaries without --shard refuse it"
        );
        assert!(help_for("extract", "x", extract).contains("--shard K/N"));
        assert!(!help("train-head", "x").contains("--shard"));
    }

    #[test]
    fn rejects_unknown_and_incomplete_arguments() {
        assert!(p(&["--bogus"]).is_err());
        assert!(p(&["--set"]).is_err());
        assert_eq!(p(&["-h"]).ok(), Some(Parsed::Help));
    }
}
