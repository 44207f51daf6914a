//! The configuration file (`docs/config.md`): one TOML file names every pair this node
//! serves, each as the options of the command that runs it (`protect` or `receive`), so a
//! pair is started by name (`tidemark up NAME`, or the systemd unit `tidemark@NAME`).
//!
//! The file maps onto the command line rather than onto a schema of its own: a pair's key
//! `max-hot-regions = 64` is the option `--max-hot-regions 64`, and the command's own parser
//! checks the values. That keeps one definition of every option (its name, its help, its
//! validation) and the file can never offer what the command cannot do.
//!
//! Every error names the file, the line and the column of the key or value at fault:
//! - syntax errors (from the TOML parser);
//! - structure: an unknown top-level key, a `version` other than 1, a pair without a role,
//!   a pair name that is not a plain word;
//! - options: a key the pair's command does not have, a list for an option given once, a
//!   table as a value, a required option missing (pointing at the pair's header), a value
//!   the command refuses (pointing at the value).
//!
//! This module parses and maps; it knows the commands only through [`CommandSpec`], so the
//! fuzz target (`fuzz/fuzz_targets/config.rs`) runs it without the agent's commands.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use toml_edit::{Document, Item, Table, Value};

/// The file format's version; `version = 1` must be present.
pub const VERSION: i64 = 1;

/// Longest pair name.
pub const MAX_NAME: usize = 64;

/// An option of a command, as the configuration can set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionSpec {
    /// The long option name without `--` (`max-hot-regions`); the file's key.
    pub long: String,
    /// Takes a value (`--spool-mib 64`), as opposed to a flag (`--wait`, key = true).
    pub takes_value: bool,
    /// May be given more than once (a TOML array in the file).
    pub repeatable: bool,
    /// Must be given.
    pub required: bool,
}

/// What the configuration knows of one command (a role): its name and options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSpec {
    /// `protect` or `receive`.
    pub role: String,
    /// The options the file may set.
    pub options: Vec<OptionSpec>,
}

impl CommandSpec {
    fn option(&self, long: &str) -> Option<&OptionSpec> {
        self.options.iter().find(|o| o.long == long)
    }
}

/// One pair of the file, mapped onto its command's arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairConfig {
    /// The pair's name (the `NAME` of `[pair.NAME]`).
    pub name: String,
    /// The command that runs it (`protect` or `receive`).
    pub role: String,
    /// The command's arguments, without the command name: `--option=value` or `--switch`.
    pub args: Vec<String>,
    /// For every option in `args`, where its value came from (to point at it when the
    /// command refuses it).
    pub sources: BTreeMap<String, Span>,
    /// The `[pair.NAME]` header (or the pair's first key).
    pub header: Span,
}

/// A place in the file: byte range, and the 1-based line and column of its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
    pub line: usize,
    pub column: usize,
}

impl Span {
    fn locate(text: &str, range: Range<usize>) -> Self {
        let start = range.start.min(text.len());
        let before = &text.as_bytes()[..start];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
        let column =
            text.get(line_start..start).map_or(start - line_start, |s| s.chars().count()) + 1;
        Self { start, end: range.end.max(start).min(text.len()), line, column }
    }
}

/// A configuration error: what is wrong and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file as the user named it.
    pub file: String,
    /// Where, when the error has a place (a file that cannot be read has none).
    pub at: Option<Span>,
    /// What is wrong, and what was expected.
    pub message: String,
    /// The text of the line at fault, to quote.
    pub line_text: Option<String>,
}

impl ConfigError {
    fn new(file: &str, text: &str, at: Option<Span>, message: impl Into<String>) -> Self {
        let line_text = at.and_then(|s| text.lines().nth(s.line - 1).map(str::to_owned));
        Self { file: file.to_owned(), at, message: message.into(), line_text }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.at {
            Some(at) => write!(f, "{}:{}:{}: {}", self.file, at.line, at.column, self.message)?,
            None => write!(f, "{}: {}", self.file, self.message)?,
        }
        if let (Some(at), Some(line)) = (self.at, &self.line_text) {
            let pad: String = line
                .chars()
                .take(at.column - 1)
                .map(|c| if c == '\t' { '\t' } else { ' ' })
                .collect();
            write!(f, "\n  | {line}\n  | {pad}^")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// A consistency group of the file (`[group.NAME]`): pairs of one role whose volumes get
/// one bookmark across all of them and are recovered together
/// (`docs/consistency-groups.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    /// The group's name.
    pub name: String,
    /// Its pairs' names, in the file's order (all of one role).
    pub pairs: Vec<String>,
    /// Their role: `protect` (bookmarks are taken there) or `receive` (recovered there).
    pub role: String,
    /// The `[group.NAME]` header.
    pub header: Span,
    /// Periodic group bookmarks (`bookmark_every`, `bookmark_prefix`; protect groups
    /// only), which `tidemark up NAME` takes.
    pub bookmarks: Option<GroupBookmarks>,
}

/// A group's periodic bookmarks, as the file gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupBookmarks {
    /// The period, unparsed (`15m`); checked by the command's own parser.
    pub every: String,
    /// Where `bookmark_every`'s value is.
    pub every_at: Span,
    /// The names' prefix (`bookmark_prefix`, default `auto`).
    pub prefix: String,
    /// Hooks around each (`bookmark_pre`, `bookmark_post`): `--pre`, `--post`.
    pub pre: Option<String>,
    pub post: Option<String>,
    /// Mountpoints to freeze, one per member in the members' order (`bookmark_freeze`).
    pub freeze: Vec<String>,
}

/// A parsed configuration: the pairs by name, in file order, and the groups of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub pairs: Vec<PairConfig>,
    pub groups: Vec<GroupConfig>,
}

impl PairConfig {
    /// The value the pair gives option `long` (from its own keys or the defaults), when it
    /// gives one.
    pub fn value(&self, long: &str) -> Option<&str> {
        let prefix = format!("--{long}=");
        self.args.iter().rev().find_map(|a| a.strip_prefix(&prefix))
    }
}

impl Config {
    /// The group named `name`, or an error listing the groups the file has.
    pub fn group(&self, name: &str) -> Result<&GroupConfig, String> {
        let names = self.groups.iter().map(|g| g.name.as_str());
        self.groups
            .iter()
            .find(|g| g.name == name)
            .ok_or_else(|| not_found("group", name, names, "no [group.NAME] tables"))
    }

    /// The pair named `name`, or an error listing the pairs the file has.
    pub fn pair(&self, name: &str) -> Result<&PairConfig, String> {
        let names = self.pairs.iter().map(|p| p.name.as_str());
        self.pairs
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| not_found("pair", name, names, "no pairs"))
    }
}

/// "no pair named ...; the file defines: a, b" (or `none` when it defines none).
fn not_found<'a>(
    what: &str,
    name: &str,
    names: impl Iterator<Item = &'a str>,
    none: &str,
) -> String {
    let names: Vec<&str> = names.collect();
    if names.is_empty() {
        format!("no {what} named {name:?}: the file defines {none}")
    } else {
        format!("no {what} named {name:?}; the file defines: {}", names.join(", "))
    }
}

/// An option a pair sets: its value, and where its key and its value are in the file.
type Chosen<'a> = (&'a Item, Option<Range<usize>>, Option<Range<usize>>);

/// Parses `text` (the contents of `file`) against the commands a pair's `role` can name.
pub fn parse(file: &str, text: &str, commands: &[CommandSpec]) -> Result<Config, ConfigError> {
    let err = |range: Option<Range<usize>>, msg: String| {
        ConfigError::new(file, text, range.map(|r| Span::locate(text, r)), msg)
    };
    let doc = Document::parse(text)
        .map_err(|e| err(e.span(), format!("not valid TOML: {}", e.message())))?;
    let root = doc.as_table();

    let mut version = None;
    for (key, item) in root.iter() {
        let key_span = root.key(key).and_then(|k| k.span());
        match key {
            "version" => version = Some(item),
            "defaults" | "pair" | "group" => {
                if !item.is_table() {
                    return Err(err(
                        key_span,
                        format!(
                            "`{key}` must be a table (`[{key}]`{}), not {}",
                            if key == "defaults" {
                                String::new()
                            } else {
                                format!(" with `[{key}.NAME]` under it")
                            },
                            item.type_name()
                        ),
                    ));
                }
            }
            other => {
                return Err(err(
                    key_span,
                    format!(
                        "unknown top-level key `{other}`: expected `version`, `[defaults]`, `[pair.NAME]` or `[group.NAME]` tables"
                    ),
                ));
            }
        }
    }
    match version {
        None => {
            return Err(err(
                Some(0..0),
                format!("missing `version = {VERSION}` at the top of the file"),
            ));
        }
        Some(item) if item.as_integer() == Some(VERSION) => {}
        Some(item) => {
            return Err(err(
                item.span(),
                format!("`version` is {}: this build reads version {VERSION} only", describe(item)),
            ));
        }
    }

    let empty = Table::new();
    let defaults = root.get("defaults").and_then(Item::as_table).unwrap_or(&empty);
    for (key, item) in defaults.iter() {
        let key_span = defaults.key(key).and_then(|k| k.span());
        let long = option_name(key);
        if long == "role" || long == "pair" {
            return Err(err(
                key_span,
                format!("`{key}` cannot be a default: every pair names its own"),
            ));
        }
        if !commands.iter().any(|c| c.option(&long).is_some()) {
            return Err(err(
                key_span,
                format!("unknown key `{key}` in [defaults]: no command has an option --{long}"),
            ));
        }
        if item.is_table() || item.is_array_of_tables() {
            return Err(err(
                key_span,
                format!("`{key}` in [defaults] must be a value, not a table"),
            ));
        }
    }

    let mut pairs = Vec::new();
    if let Some(pair_table) = root.get("pair").and_then(Item::as_table) {
        parse_pairs(pair_table, defaults, commands, text, &err, &mut pairs)?;
    }
    let groups = match root.get("group").and_then(Item::as_table) {
        Some(t) => parse_groups(t, &pairs, text, &err)?,
        None => Vec::new(),
    };
    Ok(Config { pairs, groups })
}

/// The `[group.NAME]` tables: `pairs = ["a", "b", ...]`, at least two distinct pairs of the
/// file, all of one role.
fn parse_groups(
    table: &Table,
    pairs: &[PairConfig],
    text: &str,
    err: &dyn Fn(Option<Range<usize>>, String) -> ConfigError,
) -> Result<Vec<GroupConfig>, ConfigError> {
    let mut groups = Vec::new();
    for (name, item) in table.iter() {
        let (g, header) = named_table(table, name, item, "group", err)?;
        for (key, _) in g.iter() {
            if !GROUP_KEYS.contains(&key) {
                return Err(err(
                    g.key(key).and_then(|k| k.span()),
                    format!(
                        "group `{name}`: unknown key `{key}`; a group has `pairs`, and for \
                         periodic bookmarks `bookmark_every`, `bookmark_prefix`, `bookmark_pre`, \
                         `bookmark_post` and `bookmark_freeze`"
                    ),
                ));
            }
        }
        let string = |key: &str| -> Result<Option<(String, Range<usize>)>, ConfigError> {
            let Some(item) = g.get(key) else { return Ok(None) };
            match item.as_str() {
                Some(v) => Ok(Some((v.to_owned(), item.span().unwrap_or(header.clone())))),
                None => Err(err(
                    item.span(),
                    format!("group `{name}`: `{key}` must be a string, not {}", describe(item)),
                )),
            }
        };
        let (every, prefix) = (string("bookmark_every")?, string("bookmark_prefix")?);
        let (pre, post) = (string("bookmark_pre")?, string("bookmark_post")?);
        let freeze = match g.get("bookmark_freeze") {
            None => None,
            Some(item) => {
                let bad = || {
                    err(
                        item.span(),
                        format!(
                            "group `{name}`: `bookmark_freeze` must be a list of mountpoints, \
                             one per pair in the order of `pairs`, not {}",
                            describe(item)
                        ),
                    )
                };
                let list = item.as_array().ok_or_else(bad)?;
                let paths: Option<Vec<String>> =
                    list.iter().map(|v| v.as_str().map(str::to_owned)).collect();
                Some((paths.ok_or_else(bad)?, item.span().unwrap_or(header.clone())))
            }
        };
        let Some(list_item) = g.get("pairs") else {
            return Err(err(
                Some(header),
                format!("group `{name}` has no `pairs`: expected `pairs = [\"a\", \"b\"]`"),
            ));
        };
        let Some(list) = list_item.as_array() else {
            return Err(err(
                list_item.span(),
                format!(
                    "group `{name}`: `pairs` must be a list of pair names, not {}",
                    describe(list_item)
                ),
            ));
        };
        let mut members: Vec<String> = Vec::new();
        let mut role: Option<&str> = None;
        for v in list.iter() {
            let Some(member) = v.as_str() else {
                return Err(err(
                    v.span(),
                    format!("group `{name}`: a pair name is a string, not {}", v.type_name()),
                ));
            };
            let Some(pair) = pairs.iter().find(|p| p.name == member) else {
                let known = pairs.iter().map(|p| p.name.as_str());
                let why = not_found("pair", member, known, "no pairs");
                return Err(err(v.span(), format!("group `{name}`: {why}")));
            };
            if members.iter().any(|m| m == member) {
                return Err(err(
                    v.span(),
                    format!("group `{name}`: pair {member:?} is listed twice"),
                ));
            }
            match role {
                Some(r) if r != pair.role => {
                    return Err(err(
                        v.span(),
                        format!(
                            "group `{name}`: pair {member:?} has role {:?} but {:?} has {r:?}: a \
                             group's pairs are all sources (protect) or all targets (receive)",
                            pair.role, members[0]
                        ),
                    ));
                }
                _ => role = Some(&pair.role),
            }
            members.push(member.to_owned());
        }
        if members.len() < 2 {
            return Err(err(
                list_item.span(),
                format!("group `{name}`: expected at least two pairs, found {}", members.len()),
            ));
        }
        let role = role.unwrap_or_default().to_owned();
        let extra = [
            ("bookmark_prefix", prefix.as_ref().map(|p| p.1.clone())),
            ("bookmark_pre", pre.as_ref().map(|p| p.1.clone())),
            ("bookmark_post", post.as_ref().map(|p| p.1.clone())),
            ("bookmark_freeze", freeze.as_ref().map(|p| p.1.clone())),
        ];
        if let Some((f, at)) = &freeze {
            if f.len() != members.len() {
                return Err(err(
                    Some(at.clone()),
                    format!(
                        "group `{name}`: `bookmark_freeze` names {} mountpoints for {} pairs; \
                         give one per pair, in the order of `pairs`",
                        f.len(),
                        members.len()
                    ),
                ));
            }
        }
        let bookmarks = match every {
            None => {
                if let Some((key, Some(at))) = extra.into_iter().find(|(_, at)| at.is_some()) {
                    return Err(err(
                        Some(at),
                        format!("group `{name}`: `{key}` without `bookmark_every`"),
                    ));
                }
                None
            }
            Some((every, at)) => {
                if role != "protect" {
                    return Err(err(
                        Some(at),
                        format!(
                            "group `{name}`: periodic bookmarks are taken on the sources; its \
                             pairs have role {role:?}, not \"protect\""
                        ),
                    ));
                }
                Some(GroupBookmarks {
                    every,
                    every_at: Span::locate(text, at),
                    prefix: prefix.map_or_else(|| "auto".to_owned(), |(p, _)| p),
                    pre: pre.map(|(p, _)| p),
                    post: post.map(|(p, _)| p),
                    freeze: freeze.map(|(f, _)| f).unwrap_or_default(),
                })
            }
        };
        groups.push(GroupConfig {
            name: name.to_owned(),
            role,
            pairs: members,
            header: Span::locate(text, header),
            bookmarks,
        });
    }
    Ok(groups)
}

/// The table `[WHAT.NAME]` (`what`: `pair` or `group`) under `parent`, its name checked;
/// with its header's place.
fn named_table<'a>(
    parent: &Table,
    name: &str,
    item: &'a Item,
    what: &str,
    err: &dyn Fn(Option<Range<usize>>, String) -> ConfigError,
) -> Result<(&'a Table, Range<usize>), ConfigError> {
    let name_span = parent.key(name).and_then(|k| k.span());
    let Some(table) = item.as_table() else {
        return Err(err(
            name_span,
            format!(
                "`{what}.{name}` must be a table (`[{what}.{name}]`), not {}",
                item.type_name()
            ),
        ));
    };
    check_name(name)
        .map_err(|m| err(name_span.clone(), m.replacen("pair name", &format!("{what} name"), 1)))?;
    Ok((table, table.span().or(name_span).unwrap_or(0..0)))
}

/// The `[pair.NAME]` tables, appended to `pairs`.
fn parse_pairs(
    pair_table: &Table,
    defaults: &Table,
    commands: &[CommandSpec],
    text: &str,
    err: &dyn Fn(Option<Range<usize>>, String) -> ConfigError,
    pairs: &mut Vec<PairConfig>,
) -> Result<(), ConfigError> {
    for (name, item) in pair_table.iter() {
        let (table, header) = named_table(pair_table, name, item, "pair", err)?;

        let Some(role_item) = table.get("role") else {
            let roles: Vec<&str> = commands.iter().map(|c| c.role.as_str()).collect();
            return Err(err(
                Some(header),
                format!("pair `{name}` has no `role`: expected one of {}", quoted(&roles)),
            ));
        };
        let role = role_item.as_str().unwrap_or("");
        let Some(command) = commands.iter().find(|c| c.role == role) else {
            let roles: Vec<&str> = commands.iter().map(|c| c.role.as_str()).collect();
            return Err(err(
                role_item.span(),
                format!(
                    "pair `{name}`: role is {}, expected one of {}",
                    describe(role_item),
                    quoted(&roles)
                ),
            ));
        };

        // The pair's own keys override the defaults; an option appears once in `args`.
        let mut chosen: BTreeMap<String, Chosen<'_>> = BTreeMap::new();
        for (key, item) in defaults.iter() {
            let long = option_name(key);
            if command.option(&long).is_some() {
                chosen.insert(long, (item, defaults.key(key).and_then(|k| k.span()), item.span()));
            }
        }
        let mut own = std::collections::BTreeSet::new();
        for (key, item) in table.iter() {
            if key == "role" {
                continue;
            }
            let key_span = table.key(key).and_then(|k| k.span());
            let long = option_name(key);
            if command.option(&long).is_none() {
                let mut known: Vec<&str> =
                    command.options.iter().map(|o| o.long.as_str()).collect();
                known.sort_unstable();
                return Err(err(
                    key_span,
                    format!(
                        "pair `{name}`: `{key}` is not an option of `tidemark {role}`; it has: {}",
                        known.join(", ")
                    ),
                ));
            }
            if !own.insert(long.clone()) {
                return Err(err(
                    key_span,
                    format!(
                        "pair `{name}`: `{key}` given twice (as `{long}` and with underscores)"
                    ),
                ));
            }
            chosen.insert(long, (item, key_span, item.span()));
        }

        let mut args = Vec::new();
        let mut sources = BTreeMap::new();
        for (long, (item, key_span, value_span)) in &chosen {
            let spec = command.option(long).expect("checked above");
            let at = value_span.clone().or(key_span.clone());
            let here = |m: String| err(at.clone(), format!("pair `{name}`: {m}"));
            let values: Vec<&Value> = match item {
                Item::Value(Value::Array(list)) => {
                    if !spec.repeatable {
                        return Err(here(format!("`{long}` takes one value, not a list")));
                    }
                    list.iter().collect()
                }
                Item::Value(v) => vec![v],
                _ => return Err(here(format!("`{long}` must be a value, not a table"))),
            };
            for value in values {
                if spec.takes_value {
                    let text = scalar(value).ok_or_else(|| {
                        here(format!(
                            "`{long}` must be a string, a number or a boolean, not {}",
                            value.type_name()
                        ))
                    })?;
                    // One argument, so that a value starting with '-' is never taken for an option.
                    args.push(format!("--{long}={text}"));
                } else {
                    match value.as_bool() {
                        Some(true) => args.push(format!("--{long}")),
                        Some(false) => {}
                        None => {
                            return Err(here(format!(
                                "`{long}` is a switch: write `{long} = true` (or false), not {}",
                                value.type_name()
                            )));
                        }
                    }
                }
            }
            sources.insert(long.clone(), Span::locate(text, at.unwrap_or(header.clone())));
        }
        let header_span = Span::locate(text, header.clone());
        let missing: Vec<&str> = command
            .options
            .iter()
            .filter(|o| o.required && !chosen.contains_key(&o.long))
            .map(|o| o.long.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(err(
                Some(header),
                format!(
                    "pair `{name}` (role {role}) lacks required key{}: {}",
                    if missing.len() == 1 { "" } else { "s" },
                    missing.join(", ")
                ),
            ));
        }
        pairs.push(PairConfig {
            name: name.to_owned(),
            role: role.to_owned(),
            args,
            sources,
            header: header_span,
        });
    }
    Ok(())
}

/// Points at the place a refused value came from: `long` is the option the command named
/// (without `--`); the pair's header when it is not one the file set.
pub fn value_error(
    file: &str,
    text: &str,
    pair: &PairConfig,
    long: Option<&str>,
    message: &str,
) -> ConfigError {
    let at = long.and_then(|l| pair.sources.get(l)).copied().unwrap_or(pair.header);
    ConfigError::new(file, text, Some(at), format!("pair `{}`: {message}", pair.name))
}

/// An error of group `group` at `at` (its header when `None`).
pub fn group_error(
    file: &str,
    text: &str,
    group: &GroupConfig,
    at: Option<Span>,
    message: &str,
) -> ConfigError {
    ConfigError::new(
        file,
        text,
        Some(at.unwrap_or(group.header)),
        format!("group `{}`: {message}", group.name),
    )
}

/// The keys of a `[group.NAME]` table.
const GROUP_KEYS: &[&str] = &[
    "pairs",
    "bookmark_every",
    "bookmark_prefix",
    "bookmark_pre",
    "bookmark_post",
    "bookmark_freeze",
];

/// A file key as an option name: `max_hot_regions` and `max-hot-regions` are the same;
/// `id` is the pair id, the commands' `--pair`.
fn option_name(key: &str) -> String {
    let long = normalise(key);
    if long == "id" { "pair".to_owned() } else { long }
}

fn normalise(key: &str) -> String {
    key.replace('_', "-")
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(format!("pair name {name:?}: expected 1 to {MAX_NAME} characters"));
    }
    if let Some(c) =
        name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "pair name {name:?}: {c:?} is not allowed (letters, digits, '-', '_' and '.' only: the name is a systemd instance and a file name)"
        ));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(format!("pair name {name:?}: must start with a letter, a digit or '_'"));
    }
    Ok(())
}

fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.value().clone()),
        Value::Integer(i) => Some(i.value().to_string()),
        Value::Float(f) => Some(f.value().to_string()),
        Value::Boolean(b) => Some(b.value().to_string()),
        Value::Datetime(d) => Some(d.value().to_string()),
        Value::Array(_) | Value::InlineTable(_) => None,
    }
}

fn describe(item: &Item) -> String {
    match item.as_value().and_then(scalar) {
        Some(s) if item.is_str() => format!("{s:?}"),
        Some(s) => s,
        None => format!("a {}", item.type_name()),
    }
}

fn quoted(names: &[&str]) -> String {
    names.iter().map(|n| format!("\"{n}\"")).collect::<Vec<_>>().join(", ")
}

/// The commands the fuzz target and the unit tests parse against: the shape of `protect`
/// and `receive` (a required value, an optional value, a switch, a repeatable option).
pub fn sample_commands() -> Vec<CommandSpec> {
    let opt = |long: &str, takes_value, repeatable, required| OptionSpec {
        long: long.to_owned(),
        takes_value,
        repeatable,
        required,
    };
    vec![
        CommandSpec {
            role: "protect".to_owned(),
            options: vec![
                opt("image", true, false, true),
                opt("state", true, false, true),
                opt("pair", true, false, true),
                opt("key", true, false, true),
                opt("max-hot-regions", true, false, false),
                opt("wait", false, false, false),
                opt("tier", true, true, false),
            ],
        },
        CommandSpec {
            role: "receive".to_owned(),
            options: vec![
                opt("dir", true, false, true),
                opt("pair", true, false, true),
                opt("key", true, false, true),
                opt("size", true, false, true),
            ],
        },
    ]
}

/// Fuzz entry point (`fuzz/fuzz_targets/config.rs`): parses `data` as a configuration file
/// against [`sample_commands`]. Never panics; an error always has a message, and a place
/// inside the text when it has one; a parsed pair's arguments are `--option=value` or
/// `--switch`, naming only options of its command, values only where the option takes one.
pub fn fuzz_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let commands = sample_commands();
    match parse("fuzz.toml", text, &commands) {
        Err(e) => {
            assert!(!e.message.is_empty());
            if let Some(at) = e.at {
                assert!(at.start <= text.len() && at.end <= text.len() && at.line >= 1);
            }
            let _ = e.to_string();
        }
        Ok(config) => {
            for pair in &config.pairs {
                let command = commands.iter().find(|c| c.role == pair.role).expect("role");
                for arg in &pair.args {
                    let arg = arg.strip_prefix("--").expect("an option");
                    let (long, value) = match arg.split_once('=') {
                        Some((long, value)) => (long, Some(value)),
                        None => (arg, None),
                    };
                    let spec = command.option(long).expect("an option of the command");
                    assert_eq!(spec.takes_value, value.is_some(), "--{long}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_sample(text: &str) -> Result<Config, ConfigError> {
        parse("tidemark.toml", text, &sample_commands())
    }

    fn error(text: &str) -> ConfigError {
        parse_sample(text).expect_err("the file must be refused")
    }

    const GOOD: &str = r#"version = 1

[defaults]
key = "/etc/tidemark/node.key"

[pair.db]
role = "protect"
id = "5eed0123456789abcdef0123456789ab"
image = "/srv/db.img"
state = "/var/lib/tidemark/db"
max_hot_regions = 64
wait = true
tier = ["1h:1m", "1d:1h"]

[pair.db-dr]
role = "receive"
id = "5eed0123456789abcdef0123456789ab"
dir = "/srv/tidemark/db"
key = "/etc/tidemark/dr.key"
size = 268435456
"#;

    #[test]
    fn a_good_file_maps_every_key_onto_its_option() {
        let config = parse_sample(GOOD).unwrap();
        assert_eq!(config.pairs.len(), 2);
        let db = config.pair("db").unwrap();
        assert_eq!(db.role, "protect");
        assert_eq!(
            db.args,
            [
                "--image=/srv/db.img",
                "--key=/etc/tidemark/node.key",
                "--max-hot-regions=64",
                "--pair=5eed0123456789abcdef0123456789ab",
                "--state=/var/lib/tidemark/db",
                "--tier=1h:1m",
                "--tier=1d:1h",
                "--wait",
            ]
        );
        assert_eq!(db.header.line, 6);
        assert_eq!(db.sources["max-hot-regions"].line, 11);
        // The pair's own key wins over the default.
        let dr = config.pair("db-dr").unwrap();
        assert!(dr.args.iter().any(|a| a == "--key=/etc/tidemark/dr.key"), "{:?}", dr.args);
        assert_eq!(dr.sources["key"].line, 19);
        let missing = config.pair("web").unwrap_err();
        assert!(missing.contains("db, db-dr"), "{missing}");
    }

    const GROUPS: &str = r#"version = 1

[pair.a]
role = "protect"
id = "5eed0123456789abcdef0123456789ab"
image = "/srv/a.img"
state = "/var/lib/tidemark/a"
key = "k"

[pair.b]
role = "protect"
id = "5eed0123456789abcdef0123456789ac"
image = "/srv/b.img"
state = "/var/lib/tidemark/b"
key = "k"

[pair.c]
role = "receive"
id = "5eed0123456789abcdef0123456789ad"
dir = "/srv/c"
key = "k"
size = 4096

[group.shop]
pairs = ["a", "b"]
"#;

    #[test]
    fn groups_name_pairs_of_one_role() {
        let config = parse_sample(GROUPS).unwrap();
        let g = config.group("shop").unwrap();
        assert_eq!(
            (g.pairs.as_slice(), g.role.as_str()),
            (["a", "b"].map(String::from).as_slice(), "protect")
        );
        assert_eq!(g.header.line, 24);
        assert_eq!(config.pair("b").unwrap().value("state"), Some("/var/lib/tidemark/b"));
        assert!(config.group("nope").unwrap_err().contains("shop"));
        let cases: [(&str, &str, usize, usize); 6] = [
            (r#"pairs = ["a", "x"]"#, "no pair named \"x\"", 25, 15),
            (r#"pairs = ["a", "c"]"#, "has role \"receive\"", 25, 15),
            (r#"pairs = ["a", "a"]"#, "listed twice", 25, 15),
            (r#"pairs = ["a"]"#, "at least two pairs", 25, 9),
            (r#"pairs = "a""#, "must be a list", 25, 9),
            (r#"members = ["a", "b"]"#, "unknown key `members`", 25, 1),
        ];
        for (line, want, l, c) in cases {
            let text = GROUPS.replace(r#"pairs = ["a", "b"]"#, line);
            let e = parse_sample(&text).expect_err(line);
            assert!(e.message.contains(want), "{line}: {e}");
            let at = e.at.expect("a place");
            assert_eq!((at.line, at.column), (l, c), "{line}: {e}");
        }
        let e = parse_sample(&GROUPS.replace("[group.shop]\n", "[group.\"s p\"]\n")).unwrap_err();
        assert!(e.message.contains("group name"), "{e}");
    }

    #[test]
    fn a_false_switch_is_left_out() {
        let text = GOOD.replace("wait = true", "wait = false");
        let config = parse_sample(&text).unwrap();
        assert!(!config.pair("db").unwrap().args.iter().any(|a| a == "--wait"));
    }

    #[test]
    fn errors_point_at_the_line_and_column_at_fault() {
        let cases: &[(&str, &str, usize, usize, &str)] = &[
            ("syntax", "version = 1\n[pair.db\n", 2, 0, "not valid TOML"),
            ("no version", "[pair.db]\nrole = \"protect\"\n", 1, 1, "missing `version = 1`"),
            ("version 2", "version = 2\n", 1, 11, "this build reads version 1 only"),
            ("top-level typo", "version = 1\npairs = 3\n", 2, 1, "unknown top-level key `pairs`"),
            ("no role", "version = 1\n[pair.db]\nimage = \"x\"\n", 2, 1, "has no `role`"),
            ("bad role", "version = 1\n[pair.db]\nrole = \"mirror\"\n", 3, 8, "role is \"mirror\""),
            (
                "unknown option",
                "version = 1\n[pair.db]\nrole = \"receive\"\nimage = \"/x\"\n",
                4,
                1,
                "`image` is not an option of `tidemark receive`",
            ),
            (
                "list for a single option",
                "version = 1\n[pair.db]\nrole = \"receive\"\nsize = [1, 2]\n",
                4,
                8,
                "`size` takes one value, not a list",
            ),
            (
                "switch with a value",
                "version = 1\n[pair.db]\nrole = \"protect\"\nwait = \"yes\"\n",
                4,
                8,
                "`wait` is a switch",
            ),
            (
                "missing required",
                "version = 1\n[pair.db]\nrole = \"receive\"\ndir = \"/d\"\n",
                2,
                1,
                "lacks required keys: pair, key, size",
            ),
            (
                "bad name",
                "version = 1\n[pair.\"a b\"]\nrole = \"receive\"\n",
                2,
                7,
                "' ' is not allowed",
            ),
            (
                "role default",
                "version = 1\n[defaults]\nrole = \"protect\"\n",
                3,
                1,
                "cannot be a default",
            ),
            (
                "default typo",
                "version = 1\n[defaults]\nkye = \"/k\"\n",
                3,
                1,
                "unknown key `kye` in [defaults]",
            ),
            (
                "same option twice",
                "version = 1\n[pair.db]\nrole = \"protect\"\nmax_hot_regions = 1\nmax-hot-regions = 2\n",
                5,
                1,
                "given twice",
            ),
        ];
        for &(what, text, line, column, needle) in cases {
            let e = error(text);
            let at = e.at.unwrap_or_else(|| panic!("{what}: no place in {e}"));
            assert_eq!(at.line, line, "{what}: {e}");
            if column != 0 {
                assert_eq!(at.column, column, "{what}: {e}");
            }
            assert!(e.message.contains(needle), "{what}: {e}");
            let shown = e.to_string();
            assert!(shown.starts_with(&format!("tidemark.toml:{line}:")), "{what}: {shown}");
        }
    }

    #[test]
    fn a_refused_value_is_shown_where_it_was_written() {
        let config = parse_sample(GOOD).unwrap();
        let dr = config.pair("db-dr").unwrap();
        let e = value_error("tidemark.toml", GOOD, dr, Some("size"), "invalid value for --size");
        assert_eq!(e.at.unwrap().line, 20);
        assert!(e.to_string().contains("size = 268435456"), "{e}");
        let e = value_error("tidemark.toml", GOOD, dr, None, "something else");
        assert_eq!(e.at.unwrap().line, 15);
    }

    #[test]
    fn the_fuzz_entry_point_takes_anything() {
        for text in [
            GOOD,
            "",
            "version = 1",
            "\u{0}",
            "[pair]\n[pair.x]\nrole=1",
            "version = 1\n[[pair]]\n",
        ] {
            fuzz_config(text.as_bytes());
        }
    }
}
