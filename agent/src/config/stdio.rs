//! `[[stdio_server]]`: which programs a governed job starts are stdio MCP servers, whose
//! stdin/stdout the agent relays through the pipeline (`crate::stdio`).
//!
//! A program is one when its stdin and stdout are pipes or sockets and either its executable
//! (the file the `execve` names, resolved in the process's own root) matches one of `exe`, or
//! one of its arguments matches one of `args`. The shipped defaults ([`DEFAULTS`], on unless
//! `stdio_defaults = false`) name the well-known launchers. The name is the "backend" policies
//! and records use.

use globset::{GlobSet, GlobSetBuilder};
use serde::Deserialize;

/// One `[[stdio_server]]`, compiled.
#[derive(Debug, Clone)]
pub struct StdioServer {
    pub name: String,
    /// The patterns as written, for `check-config` and records.
    pub exe_patterns: Vec<String>,
    pub arg_patterns: Vec<String>,
    exe: GlobSet,
    args: GlobSet,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStdioServer {
    name: String,
    #[serde(default)]
    exe: Vec<String>,
    #[serde(default)]
    args: Vec<String>,
}

/// The launchers shipped as defaults: `(name, exe patterns, argument patterns)`.
pub const DEFAULTS: &[(&str, &[&str], &[&str])] = &[(
    "stdio-mcp",
    &["*/mcp-server-*"],
    &[
        "@modelcontextprotocol/server-*",
        "*/@modelcontextprotocol/server-*",
        "mcp-server-*",
        "*/mcp-server-*",
    ],
)];

impl StdioServer {
    /// Compile one entry; the error names what is wrong.
    pub fn new(name: &str, exe: &[String], args: &[String]) -> Result<StdioServer, String> {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "stdio server name `{name}` must be non-empty printable ASCII without spaces"
            ));
        }
        if exe.is_empty() && args.is_empty() {
            return Err(format!(
                "stdio server `{name}` matches nothing: give `exe` or `args` patterns"
            ));
        }
        let set = |patterns: &[String]| -> Result<GlobSet, String> {
            let mut b = GlobSetBuilder::new();
            for p in patterns {
                let glob = globset::GlobBuilder::new(p)
                    .literal_separator(false)
                    .build()
                    .map_err(|e| format!("stdio server `{name}`: pattern `{p}`: {e}"))?;
                b.add(glob);
            }
            b.build().map_err(|e| format!("stdio server `{name}`: {e}"))
        };
        Ok(StdioServer {
            name: name.to_owned(),
            exe_patterns: exe.to_vec(),
            arg_patterns: args.to_vec(),
            exe: set(exe)?,
            args: set(args)?,
        })
    }

    /// Whether a program started as `exe` with `argv` is this server.
    pub fn matches(&self, exe: &str, argv: &[String]) -> bool {
        self.exe.is_match(exe) || argv.iter().any(|a| self.args.is_match(a))
    }
}

/// The shipped launcher patterns alone.
pub fn default_stdio_servers() -> Vec<StdioServer> {
    validate(Vec::new(), true).unwrap_or_default()
}

/// The configured entries, then the defaults unless turned off.
pub(super) fn validate(
    raw: Vec<RawStdioServer>,
    defaults: bool,
) -> Result<Vec<StdioServer>, String> {
    let mut out = Vec::new();
    for r in raw {
        if out.iter().any(|s: &StdioServer| s.name == r.name) {
            return Err(format!("stdio server `{}` is named twice", r.name));
        }
        out.push(StdioServer::new(&r.name, &r.exe, &r.args)?);
    }
    if defaults {
        for (name, exe, args) in DEFAULTS {
            let owned = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
            if !out.iter().any(|s| s.name == *name) {
                out.push(StdioServer::new(name, &owned(exe), &owned(args))?);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_well_known_launchers_and_not_a_shell() {
        let all = validate(Vec::new(), true).unwrap();
        let m = |exe: &str, argv: &[&str]| {
            let argv: Vec<String> = argv.iter().map(|s| (*s).to_owned()).collect();
            all.iter().any(|s| s.matches(exe, &argv))
        };
        assert!(m(
            "/usr/bin/npx",
            &["npx", "-y", "@modelcontextprotocol/server-everything"]
        ));
        assert!(m(
            "/usr/bin/node",
            &[
                "node",
                "/root/.npm/_npx/x/node_modules/@modelcontextprotocol/server-everything/dist/index.js"
            ]
        ));
        assert!(m("/root/.local/bin/uvx", &["uvx", "mcp-server-fetch"]));
        assert!(m("/opt/venv/bin/mcp-server-git", &["mcp-server-git"]));
        assert!(!m("/bin/sh", &["sh", "-c", "ls"]));
        assert!(!m("/usr/bin/python3", &["python3", "server.py"]));
    }

    #[test]
    fn bad_entries_are_refused_with_their_name() {
        let raw = |name: &str, exe: &[&str]| RawStdioServer {
            name: name.into(),
            exe: exe.iter().map(|s| (*s).to_owned()).collect(),
            args: Vec::new(),
        };
        let e = validate(vec![raw("files", &[])], false).unwrap_err();
        assert!(e.contains("`files` matches nothing"), "{e}");
        let e = validate(vec![raw("a b", &["x"])], false).unwrap_err();
        assert!(e.contains("without spaces"), "{e}");
        let e = validate(vec![raw("x", &["a[b"])], false).unwrap_err();
        assert!(e.contains("pattern `a[b`"), "{e}");
        let e = validate(vec![raw("x", &["a"]), raw("x", &["b"])], false).unwrap_err();
        assert!(e.contains("named twice"), "{e}");
        let custom = validate(vec![raw("py", &["*/server.py"])], false).unwrap();
        assert_eq!(custom.len(), 1);
        assert!(custom[0].matches("/srv/mcp/server.py", &[]));
    }
}
