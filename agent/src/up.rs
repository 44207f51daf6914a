//! `tidemark up NAME --config FILE` and `tidemark config check FILE`: a pair run from the
//! configuration file (`docs/config.md`, parser in `src/config.rs`). `up` turns the pair's
//! section into the arguments of its command and runs that command in this process, so a
//! pair started from the file behaves exactly as the same command typed by hand. `up` of a
//! group with `bookmark_every` runs its periodic group bookmarks the same way
//! (`tidemark bookmark PREFIX --group NAME --every PERIOD`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{CommandFactory, Parser};
use tidemark::config::{
    self, CommandSpec, Config, ConfigError, GroupConfig, OptionSpec, PairConfig,
};

use crate::Cli;

/// The default configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/tidemark/tidemark.toml";

/// The commands a pair's `role` can name.
pub const ROLES: &[&str] = &["protect", "receive"];

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// The pair's name: the `NAME` of its `[pair.NAME]` section; or a group's, to run its
    /// periodic bookmarks (`[group.NAME]` with `bookmark_every`).
    name: String,
    /// The configuration file.
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Check the pair and print the command it runs, without running it.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Validate a configuration file: every pair, every value; print the command each
    /// pair runs. Exits non-zero on the first error, which names its line and column.
    Check {
        /// The configuration file.
        #[arg(default_value = DEFAULT_CONFIG)]
        file: PathBuf,
    },
}

/// What the file may say of each role: the options of its command, read off the command
/// line parser itself (so the file and the command line can never disagree).
fn command_specs() -> Vec<CommandSpec> {
    let cli = Cli::command();
    ROLES
        .iter()
        .map(|&role| {
            let cmd = cli.find_subcommand(role).expect("every role is a subcommand");
            let options = cmd
                .get_arguments()
                .filter_map(|a| {
                    let long = a.get_long()?;
                    if matches!(long, "help" | "version") {
                        return None;
                    }
                    Some(OptionSpec {
                        long: long.to_owned(),
                        takes_value: a.get_action().takes_values(),
                        repeatable: matches!(a.get_action(), clap::ArgAction::Append),
                        required: a.is_required_set(),
                    })
                })
                .collect();
            CommandSpec { role: role.to_owned(), options }
        })
        .collect()
}

/// Reads and parses `file`.
fn load(file: &Path) -> anyhow::Result<(String, Config)> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("read the configuration file {}", file.display()))?;
    let config = config::parse(&file.display().to_string(), &text, &command_specs())?;
    Ok((text, config))
}

/// A member of a consistency group from the configuration file: the pair's name, its
/// directory (`state` of a protect pair, `dir` of a receive pair) and its control socket
/// when the pair names one.
#[derive(Debug, Clone)]
pub struct GroupMember {
    pub name: String,
    pub dir: PathBuf,
    pub control: Option<PathBuf>,
}

/// The pairs of group `name` in `file`, which must have role `role`. Each member's pair is
/// checked by its command's parser, as `tidemark up` would run it.
pub fn group_members(file: &Path, name: &str, role: &str) -> anyhow::Result<Vec<GroupMember>> {
    let (text, config) = load(file)?;
    let group = config.group(name).map_err(|m| anyhow::anyhow!("{}: {m}", file.display()))?;
    if group.role != role {
        anyhow::bail!(
            "{}:{}:{}: group `{name}` is a group of {} pairs; this command needs {role} pairs \
             (the group as this node's {role} side names it)",
            file.display(),
            group.header.line,
            group.header.column,
            group.role
        );
    }
    let key = if role == "protect" { "state" } else { "dir" };
    group
        .pairs
        .iter()
        .map(|p| {
            let pair = config.pair(p).map_err(|m| anyhow::anyhow!("{m}"))?;
            to_command(file, &text, pair)?;
            let dir = pair.value(key).with_context(|| format!("pair {p} has no {key}"))?;
            Ok(GroupMember {
                name: p.clone(),
                dir: PathBuf::from(dir),
                control: pair.value("control").map(PathBuf::from),
            })
        })
        .collect()
}

/// The pair's arguments through the command line parser: the command to run, or the
/// refusal pointed at the value in the file.
fn to_command(file: &Path, text: &str, pair: &PairConfig) -> Result<Cli, ConfigError> {
    let argv = ["tidemark", pair.role.as_str()]
        .into_iter()
        .map(str::to_owned)
        .chain(pair.args.iter().cloned());
    Cli::try_parse_from(argv).map_err(|e| {
        // The option clap names, e.g. "--size <SIZE>" -> "size".
        let long = e.get(clap::error::ContextKind::InvalidArg).and_then(|v| match v {
            clap::error::ContextValue::String(s) => Some(s.clone()),
            clap::error::ContextValue::Strings(s) => s.first().cloned(),
            _ => None,
        });
        let long = long
            .as_deref()
            .and_then(|s| s.strip_prefix("--"))
            .map(|s| s.split([' ', '=', '<']).next().unwrap_or(s).to_owned());
        // A value clap refused is quoted back; the file's own place for it follows.
        let rendered = e.to_string();
        let first = rendered.lines().next().unwrap_or("refused").trim_start_matches("error: ");
        config::value_error(&file.display().to_string(), text, pair, long.as_deref(), first)
    })
}

/// Shell-quotes an argument for display.
fn quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./:=@,+".contains(&b))
    {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

fn command_line(pair: &PairConfig) -> String {
    let mut line = format!("tidemark {}", pair.role);
    for arg in &pair.args {
        line.push(' ');
        line.push_str(&quote(arg));
    }
    line
}

/// The command of a group's periodic bookmarks: `tidemark bookmark PREFIX --group NAME
/// --config FILE --every PERIOD`, through the command line parser (a bad period is refused
/// pointing at `bookmark_every`). `None` when the group has none.
fn group_command(
    file: &Path,
    text: &str,
    group: &GroupConfig,
) -> Result<Option<(Cli, String)>, ConfigError> {
    let Some(b) = &group.bookmarks else { return Ok(None) };
    if let Err(e) = crate::source_control::check_prefix(&b.prefix) {
        let why = format!("bookmark_prefix {:?}: {}", b.prefix, e.root_cause());
        return Err(config::group_error(&file.display().to_string(), text, group, None, &why));
    }
    let args = [
        "bookmark".to_owned(),
        b.prefix.clone(),
        "--group".to_owned(),
        group.name.clone(),
        "--config".to_owned(),
        file.display().to_string(),
        "--every".to_owned(),
        b.every.clone(),
    ]
    .into_iter()
    .chain(b.pre.iter().flat_map(|p| ["--pre".to_owned(), p.clone()]))
    .chain(b.post.iter().flat_map(|p| ["--post".to_owned(), p.clone()]))
    .chain(b.freeze.iter().flat_map(|m| ["--freeze".to_owned(), m.clone()]))
    .collect::<Vec<_>>();
    let line = format!("tidemark {}", args.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" "));
    let cli =
        Cli::try_parse_from(std::iter::once("tidemark".to_owned()).chain(args)).map_err(|e| {
            let rendered = e.to_string();
            let first = rendered.lines().next().unwrap_or("refused").trim_start_matches("error: ");
            // Whichever value clap refused (the period, or the prefix as a name), it says so.
            config::group_error(&file.display().to_string(), text, group, Some(b.every_at), first)
        })?;
    Ok(Some((cli, line)))
}

pub fn up(args: UpArgs) -> anyhow::Result<()> {
    let (text, config) = load(&args.config)?;
    let file = args.config.display();
    let pair = config.pair(&args.name);
    let group = config.group(&args.name);
    let (cli, what, line) = match (pair, group) {
        (Ok(_), Ok(_)) => {
            anyhow::bail!("{file}: both a pair and a group are named {:?}; rename one", args.name)
        }
        (Ok(pair), Err(_)) => (to_command(&args.config, &text, pair)?, "pair", command_line(pair)),
        (Err(_), Ok(group)) => match group_command(&args.config, &text, group)? {
            Some((cli, line)) => (cli, "group", line),
            None => anyhow::bail!(
                "{file}:{}:{}: group `{}` has nothing to run: `up` runs a group's periodic \
                 bookmarks, given by `bookmark_every = \"15m\"` in its table",
                group.header.line,
                group.header.column,
                group.name
            ),
        },
        (Err(p), Err(g)) => anyhow::bail!("{file}: {p}; {g}"),
    };
    if args.dry_run {
        println!("{what} {}: {line}", args.name);
        return Ok(());
    }
    eprintln!("{what} {} from {file}: {line}", args.name);
    crate::run(cli)
}

pub fn config(command: ConfigCommand) -> anyhow::Result<()> {
    match command {
        ConfigCommand::Check { file } => {
            let (text, config) = load(&file)?;
            for pair in &config.pairs {
                to_command(&file, &text, pair)?;
            }
            println!(
                "{}: version {}, {} pair(s), all valid",
                file.display(),
                config::VERSION,
                config.pairs.len()
            );
            for pair in &config.pairs {
                println!("  pair {}: {}", pair.name, command_line(pair));
            }
            for group in &config.groups {
                println!("  group {} ({}): {}", group.name, group.role, group.pairs.join(", "));
                if let Some((_, line)) = group_command(&file, &text, group)? {
                    println!("    bookmarks: {line}");
                }
            }
            Ok(())
        }
    }
}
