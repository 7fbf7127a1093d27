//! Loading a policy directory: raw TOML in, a validated [`Policy`] or *every* error out.
//!
//! Layout of a policy directory (installed: `/etc/veil/policies/`):
//!
//! ```text
//! default.toml         required: rules for every user, the `fallback` verdict, default limits
//! users/NAME.toml      optional: rules and limits for user NAME, tried first
//! groups/NAME.toml     optional: rules and limits for members of Unix group NAME
//! ```
//!
//! Parsing is one step from serde structs (`deny_unknown_fields`, with spans) to validated types;
//! each error names file, line, column and field. When the loader enforces ownership (the daemon
//! and `veil check` do, when run as root), every file and directory must be owned by root and not
//! writable by group or others, so a user cannot edit their own policy.

use super::{
    PartialLimits, Policy, Rule, RuleSet, Transport, Verdict, canonical_net, is_non_public,
};
use crate::traffic::TrafficClass;
use ipnet::IpNet;
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::ops::{Range, RangeInclusive};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use toml::Spanned;

/// One thing wrong with a policy directory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// A file or directory cannot be used as it is (unreadable, misplaced, wrong owner or mode).
    #[error("{path}: {message}")]
    Path {
        /// The file or directory.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// A field in a policy file is wrong.
    #[error("{path}:{line}:{column}: {field}: {message}")]
    Field {
        /// The file.
        path: String,
        /// 1-based line of the offending text.
        line: usize,
        /// 1-based column (in characters) of the offending text.
        column: usize,
        /// Dotted path of the field, e.g. `rule[2].networks[0]`.
        field: String,
        /// What was wrong and what was expected.
        message: String,
    },
}

/// Every error found in a policy directory; never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<LoadError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// Which part of the combination a file plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// `default.toml`.
    Default,
    /// `users/NAME.toml` or `groups/NAME.toml`.
    Specific,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    fallback: Option<Spanned<Verdict>>,
    limits: Option<RawLimits>,
    #[serde(default, rename = "rule")]
    rules: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_associations: Option<Spanned<i64>>,
    max_flows_per_association: Option<Spanned<i64>>,
    max_packets_per_second: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Option<String>,
    verdict: Spanned<Verdict>,
    networks: Spanned<Vec<Spanned<String>>>,
    ports: Option<Vec<Spanned<RawPort>>>,
    transport: Option<Spanned<Vec<Transport>>>,
    traffic: Option<Spanned<Vec<TrafficClass>>>,
    expose_user_address_to_peers: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawPort {
    Number(i64),
    Range(String),
}

/// A parsed file: its rules and limits, and for `default.toml` the fallback verdict.
#[derive(Debug)]
struct ParsedFile {
    rules: RuleSet,
    fallback: Option<Verdict>,
}

/// Collects field errors of one file, turning byte spans into line and column.
struct Errors<'a> {
    path: &'a str,
    text: &'a str,
    found: Vec<LoadError>,
}

impl Errors<'_> {
    fn field(&mut self, span: Range<usize>, field: impl Into<String>, message: impl Into<String>) {
        let (line, column) = line_column(self.text, span.start);
        self.found.push(LoadError::Field {
            path: self.path.to_owned(),
            line,
            column,
            field: field.into(),
            message: one_line(&message.into()),
        });
    }
}

/// A message on one line, never empty (the TOML parser's can span lines or say nothing).
fn one_line(message: &str) -> String {
    let joined = message.split_whitespace().collect::<Vec<_>>().join(" ");
    if joined.is_empty() {
        "invalid TOML here".to_owned()
    } else {
        joined
    }
}

/// The largest policy file veil reads: rules, not data.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// Why a policy file's text could not be had.
enum Unreadable {
    /// Reading failed.
    Io(String),
    /// Not UTF-8: where the first invalid byte is.
    NotUtf8 { line: usize, column: usize },
}

/// Reads a policy file, at most [`MAX_FILE_BYTES`] of it (it may grow after its size was
/// checked), as UTF-8.
fn read_text(path: &Path) -> Result<String, Unreadable> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| Unreadable::Io(e.to_string()))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(Unreadable::Io(format!(
            "more than a policy file may hold ({MAX_FILE_BYTES} bytes)"
        )));
    }
    String::from_utf8(bytes).map_err(|e| {
        let valid = e
            .as_bytes()
            .get(..e.utf8_error().valid_up_to())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(valid);
        let (line, column) = line_column(&text, text.len());
        Unreadable::NotUtf8 { line, column }
    })
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

/// The dotted field path at byte `offset`, read from the text around it; used for the errors
/// that serde reports with a span but without the field's name.
fn field_at(text: &str, offset: usize) -> String {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line_end = text
        .get(line_start..)
        .and_then(|s| s.find('\n'))
        .map_or(text.len(), |i| line_start + i);
    let mut key = None;
    let mut table = String::new();
    let mut rule_index = 0usize;
    for (start, line) in line_starts(text) {
        if start > line_end {
            break;
        }
        let trimmed = line.trim();
        if trimmed.starts_with("[[rule]]") {
            rule_index += 1;
            table = format!("rule[{rule_index}]");
            key = None;
        } else if let Some(header) = trimmed.strip_prefix('[') {
            table = header.trim_end_matches(']').trim().to_owned();
            key = None;
        } else if let Some((k, _)) = trimmed.split_once('=')
            && !trimmed.starts_with('#')
        {
            key = Some(k.trim().to_owned());
        }
    }
    match (table.is_empty(), key) {
        (true, Some(k)) => k,
        (false, Some(k)) => format!("{table}.{k}"),
        (_, None) if !table.is_empty() => table,
        _ => "(file)".to_owned(),
    }
}

fn line_starts(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut start = 0;
    text.split_inclusive('\n').map(move |line| {
        let at = start;
        start += line.len();
        (at, line)
    })
}

/// Parses one policy file. `path` is used in errors and in rule labels.
fn parse_file(path: &str, text: &str, kind: FileKind) -> Result<ParsedFile, Vec<LoadError>> {
    let mut errors = Errors {
        path,
        text,
        found: Vec::new(),
    };
    let raw: RawFile = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            let field = field_at(text, span.start);
            errors.field(span, field, e.message().trim());
            return Err(errors.found);
        }
    };

    let fallback = match (kind, raw.fallback) {
        (FileKind::Default, Some(v)) => Some(*v.get_ref()),
        (FileKind::Default, None) => {
            errors.field(
                0..0,
                "fallback",
                "missing: default.toml must say what happens when no rule matches \
                 (fallback = \"relay\", \"block\" or \"direct\")",
            );
            None
        }
        (FileKind::Specific, Some(v)) => {
            errors.field(
                v.span(),
                "fallback",
                "only default.toml may set the fallback verdict",
            );
            None
        }
        (FileKind::Specific, None) => None,
    };

    let limits = raw
        .limits
        .map(|l| {
            let mut limit = |name: &str, value: Option<Spanned<i64>>| {
                let value = value?;
                match u32::try_from(*value.get_ref()) {
                    Ok(n) if n > 0 => Some(n),
                    _ => {
                        errors.field(
                            value.span(),
                            format!("limits.{name}"),
                            format!(
                                "expected a whole number from 1 to {}, found {}",
                                u32::MAX,
                                value.get_ref()
                            ),
                        );
                        None
                    }
                }
            };
            PartialLimits {
                max_associations: limit("max_associations", l.max_associations),
                max_flows_per_association: limit(
                    "max_flows_per_association",
                    l.max_flows_per_association,
                ),
                max_packets_per_second: limit("max_packets_per_second", l.max_packets_per_second),
            }
        })
        .unwrap_or_default();

    let rules = raw
        .rules
        .into_iter()
        .enumerate()
        .filter_map(|(i, raw)| validate_rule(&mut errors, path, i + 1, raw))
        .collect();

    if errors.found.is_empty() {
        Ok(ParsedFile {
            rules: RuleSet { rules, limits },
            fallback,
        })
    } else {
        Err(errors.found)
    }
}

fn validate_rule(errors: &mut Errors<'_>, path: &str, n: usize, raw: RawRule) -> Option<Rule> {
    let before = errors.found.len();
    let field = |name: &str| format!("rule[{n}].{name}");
    let verdict = *raw.verdict.get_ref();

    let networks_span = raw.networks.span();
    let networks: Vec<IpNet> = raw
        .networks
        .into_inner()
        .into_iter()
        .enumerate()
        .filter_map(|(j, s)| match parse_net(s.get_ref()) {
            Ok(net) => Some(canonical_net(net)),
            Err(message) => {
                errors.field(s.span(), field(&format!("networks[{j}]")), message);
                None
            }
        })
        .collect();
    if networks.is_empty() && errors.found.len() == before {
        errors.field(
            networks_span.clone(),
            field("networks"),
            "expected at least one network, e.g. \"0.0.0.0/0\" and \"::/0\" for everything",
        );
    }

    let ports = raw
        .ports
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .filter_map(|(j, p)| match parse_ports(p.get_ref()) {
            Ok(range) => Some(range),
            Err(message) => {
                errors.field(p.span(), field(&format!("ports[{j}]")), message);
                None
            }
        })
        .collect();

    let transport_span = raw.transport.as_ref().map(Spanned::span);
    let transports = raw.transport.map(Spanned::into_inner).unwrap_or_default();
    if let Some(span) = transport_span
        && transports
            .iter()
            .enumerate()
            .any(|(i, t)| transports[..i].contains(t))
    {
        errors.field(span, field("transport"), "a transport is listed twice");
    }
    let traffic = match raw.traffic {
        Some(t) if !transports.is_empty() && !transports.contains(&Transport::Udp) => {
            errors.field(
                t.span(),
                field("traffic"),
                "traffic classes describe UDP flows, but this rule only matches tcp",
            );
            Vec::new()
        }
        Some(t) => t.into_inner(),
        None => Vec::new(),
    };

    let exposes = raw.expose_user_address_to_peers;
    match (&exposes, verdict) {
        (Some(e), v) if *e.get_ref() && v != Verdict::Direct => {
            errors.field(
                e.span(),
                field("expose_user_address_to_peers"),
                "only a direct rule can expose the user's address",
            );
        }
        (exposed, Verdict::Direct) if !exposed.as_ref().is_some_and(|e| *e.get_ref()) => {
            let udp = transports.is_empty() || transports.contains(&Transport::Udp);
            if let Some(public) = networks.iter().find(|n| !is_non_public(n)).filter(|_| udp) {
                errors.field(
                    networks_span,
                    field("networks"),
                    format!(
                        "sends UDP direct to public address space ({public}), which shows the \
                         user's own address to peers; use verdict \"relay\", or set \
                         expose_user_address_to_peers = true if that is really intended"
                    ),
                );
            }
        }
        _ => {}
    }

    if errors.found.len() > before {
        return None;
    }
    let label = match &raw.name {
        Some(name) => format!("{path} rule[{n}] \"{name}\""),
        None => format!("{path} rule[{n}]"),
    };
    Some(Rule {
        label: Arc::from(label),
        verdict,
        networks,
        ports,
        transports,
        traffic,
    })
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    // The address by std's parser (no leading zeros: `010.0.0.1` is not `8.0.0.1` nor
    // `10.0.0.1`), the prefix length as plain digits: a network and an address are read alike.
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) && l.len() <= 3 => {
            (a, l.parse::<u8>().ok())
        }
        Some(_) => ("", None),
        None => (s, None),
    };
    addr.parse::<std::net::IpAddr>()
        .ok()
        .and_then(|ip| match len {
            Some(len) => IpNet::new(ip, len).ok(),
            None if s.contains('/') => None,
            None => Some(IpNet::from(ip)),
        })
        .ok_or(())
        .map_err(|()| {
            format!("expected a CIDR network like \"10.0.0.0/8\" or an address, found {s:?}")
        })
        .and_then(|net| {
            if net.trunc() == net {
                Ok(net)
            } else {
                Err(format!(
                    "{s:?} has host bits set; did you mean \"{}\"?",
                    net.trunc()
                ))
            }
        })
}

fn parse_ports(p: &RawPort) -> Result<RangeInclusive<u16>, String> {
    let port = |n: i64| u16::try_from(n).map_err(|_| format!("port {n} is outside 0-65535"));
    match p {
        RawPort::Number(n) => port(*n).map(|p| p..=p),
        RawPort::Range(s) => {
            let (lo, hi) = s.split_once('-').ok_or_else(|| {
                format!("expected a port number or a range like \"10000-20000\", found {s:?}")
            })?;
            let bound = |b: &str| {
                b.trim()
                    .parse::<i64>()
                    .map_err(|_| format!("expected a port number in range {s:?}, found {b:?}"))
                    .and_then(port)
            };
            let (lo, hi) = (bound(lo)?, bound(hi)?);
            if lo > hi {
                return Err(format!("range {s:?} is empty (first port above last)"));
            }
            Ok(lo..=hi)
        }
    }
}

/// Parses one policy file from text, as the loader does; for tests and fuzzing.
pub fn parse_text(path: &str, text: &str, kind: FileKind) -> Result<(), Vec<LoadError>> {
    parse_file(path, text, kind).map(|_| ())
}

/// Builds a policy from in-memory files: `(relative path, text)` pairs laid out as in a policy
/// directory. Collects every error.
pub fn from_files<'a>(
    files: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<Policy, PolicyErrors> {
    let mut errors = Vec::new();
    let mut default = None;
    let mut default_seen = false;
    let mut users = HashMap::new();
    let mut groups = HashMap::new();
    for (path, text) in files {
        let (kind, slot) = match place_of(path) {
            Some(Place::Default) => {
                default_seen = true;
                (FileKind::Default, None)
            }
            Some(Place::User(name)) => (FileKind::Specific, Some((&mut users, name))),
            Some(Place::Group(name)) => (FileKind::Specific, Some((&mut groups, name))),
            None => {
                errors.push(LoadError::Path {
                    path: path.to_owned(),
                    message: "not a policy file: expected default.toml, users/NAME.toml or \
                              groups/NAME.toml"
                        .to_owned(),
                });
                continue;
            }
        };
        match (parse_file(path, text, kind), slot) {
            (Err(e), _) => errors.extend(e),
            (Ok(parsed), None) => default = Some(parsed),
            (Ok(parsed), Some((map, name))) => {
                map.insert(name.to_owned(), parsed.rules);
            }
        }
    }
    let default = match default {
        Some(ParsedFile {
            rules,
            fallback: Some(fallback),
        }) => Some((rules, fallback)),
        Some(_) => None,
        None if default_seen => None,
        None => {
            errors.push(LoadError::Path {
                path: "default.toml".to_owned(),
                message: "missing: every policy directory needs a default.toml".to_owned(),
            });
            None
        }
    };
    match default {
        Some((default, fallback)) if errors.is_empty() => Ok(Policy {
            default,
            fallback,
            fallback_label: Arc::from("default.toml fallback"),
            users,
            groups,
        }),
        _ => Err(PolicyErrors(errors)),
    }
}

enum Place<'a> {
    Default,
    User(&'a str),
    Group(&'a str),
}

fn place_of(path: &str) -> Option<Place<'_>> {
    fn name_of(file: &str) -> Option<&str> {
        file.strip_suffix(".toml")
            .filter(|n| !n.is_empty() && !n.contains('/'))
    }
    if path == "default.toml" {
        Some(Place::Default)
    } else if let Some(file) = path.strip_prefix("users/") {
        name_of(file).map(Place::User)
    } else if let Some(file) = path.strip_prefix("groups/") {
        name_of(file).map(Place::Group)
    } else {
        None
    }
}

/// Loads the policy directory `dir`. With `enforce_ownership`, every entry must be owned by root
/// and not writable by group or others. Returns every error found.
pub fn load_dir(dir: &Path, enforce_ownership: bool) -> Result<Policy, PolicyErrors> {
    let mut errors = Vec::new();
    let mut files: Vec<(String, String)> = Vec::new();
    let shown = |rel: &str| dir.join(rel).display().to_string();

    let check = |path: &Path, meta: &fs::Metadata, errors: &mut Vec<LoadError>| {
        if !enforce_ownership {
            return;
        }
        let mut problems = Vec::new();
        if meta.uid() != 0 {
            problems.push(format!(
                "owned by uid {}, must be owned by root",
                meta.uid()
            ));
        }
        if meta.mode() & 0o022 != 0 {
            problems.push(format!(
                "mode {:o} lets group or others write it, must not",
                meta.mode() & 0o7777
            ));
        }
        if !problems.is_empty() {
            errors.push(LoadError::Path {
                path: path.display().to_string(),
                message: problems.join("; "),
            });
        }
    };

    let visit = |rel_dir: &str, errors: &mut Vec<LoadError>| -> Vec<String> {
        let path = if rel_dir.is_empty() {
            dir.to_path_buf()
        } else {
            dir.join(rel_dir)
        };
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => m,
            Ok(_) => {
                errors.push(LoadError::Path {
                    path: path.display().to_string(),
                    message: "expected a directory".to_owned(),
                });
                return Vec::new();
            }
            Err(e) => {
                errors.push(LoadError::Path {
                    path: path.display().to_string(),
                    message: e.to_string(),
                });
                return Vec::new();
            }
        };
        check(&path, &meta, errors);
        let entries = match fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(e) => {
                errors.push(LoadError::Path {
                    path: path.display().to_string(),
                    message: e.to_string(),
                });
                return Vec::new();
            }
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.') && !n.ends_with(".md"))
            .collect();
        names.sort();
        names
            .into_iter()
            .map(|n| {
                if rel_dir.is_empty() {
                    n
                } else {
                    format!("{rel_dir}/{n}")
                }
            })
            .collect()
    };

    let mut unreadable: Vec<String> = Vec::new();
    let mut entries = visit("", &mut errors);
    for sub in ["users", "groups"] {
        if entries.iter().any(|e| e == sub) {
            entries.retain(|e| e != sub);
            entries.extend(visit(sub, &mut errors));
        }
    }
    for rel in entries {
        let path = dir.join(&rel);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() && meta.len() > MAX_FILE_BYTES => {
                unreadable.push(rel.clone());
                errors.push(LoadError::Path {
                    path: shown(&rel),
                    message: format!(
                        "{} bytes is more than a policy file may hold ({MAX_FILE_BYTES})",
                        meta.len()
                    ),
                });
            }
            Ok(meta) if meta.is_file() => {
                check(&path, &meta, &mut errors);
                match read_text(&path) {
                    Ok(text) => files.push((rel, text)),
                    Err(message) => {
                        unreadable.push(rel.clone());
                        errors.push(match message {
                            Unreadable::Io(message) => LoadError::Path {
                                path: shown(&rel),
                                message,
                            },
                            Unreadable::NotUtf8 { line, column } => LoadError::Field {
                                path: shown(&rel),
                                line,
                                column,
                                field: "(file)".to_owned(),
                                message: "not UTF-8 text".to_owned(),
                            },
                        });
                    }
                }
            }
            Ok(_) => errors.push(LoadError::Path {
                path: shown(&rel),
                message: "expected a regular file (symbolic links and other kinds are refused)"
                    .to_owned(),
            }),
            Err(e) => errors.push(LoadError::Path {
                path: shown(&rel),
                message: e.to_string(),
            }),
        }
    }

    let parsed = from_files(files.iter().map(|(p, t)| (p.as_str(), t.as_str()))).map_err(
        |PolicyErrors(found)| {
            // A default.toml that is there but unreadable is not also "missing".
            PolicyErrors(
                found
                    .into_iter()
                    .filter(|e| {
                        let missing_default = matches!(e, LoadError::Path { path, message }
                            if path == "default.toml" && message.starts_with("missing"));
                        !(missing_default && unreadable.iter().any(|u| u == "default.toml"))
                    })
                    .collect(),
            )
        },
    );
    // Errors name files relative to the directory; show them as the user typed the directory.
    let relocate = |e: LoadError| match e {
        LoadError::Path { path, message } => LoadError::Path {
            path: shown(&path),
            message,
        },
        LoadError::Field {
            path,
            line,
            column,
            field,
            message,
        } => LoadError::Field {
            path: shown(&path),
            line,
            column,
            field,
            message,
        },
    };
    match parsed {
        Ok(policy) if errors.is_empty() => Ok(policy),
        Ok(_) => Err(PolicyErrors(errors)),
        Err(PolicyErrors(more)) => {
            errors.extend(more.into_iter().map(relocate));
            Err(PolicyErrors(errors))
        }
    }
}
