//! The Lua scripts, each prefixed with the shared prelude. `redis::Script` sends EVALSHA and falls back to EVAL
//! after a restart flushed the script cache.
//!
//! The consumer group's name is [`GROUP`] and is written nowhere else: the loader puts `local GROUP = '…'` before
//! the prelude. It does so once, at load time, so each script's text (and SHA) stays the same for a build.

use redis::Script;

use super::keys::GROUP;

const PRELUDE: &str = include_str!("lua/prelude.lua");

/// `body` as loaded: the group's name, the prelude, then the script.
fn with_prelude(body: &str) -> String {
    format!("local GROUP = {}\n{PRELUDE}\n{body}", lua_string(GROUP))
}

fn script(body: &str) -> Script {
    Script::new(&with_prelude(body))
}

/// `s` as a Lua string literal. Every byte but an ASCII letter, digit, `-` or `_` is written as a decimal escape,
/// so no name can end the literal or break the script.
fn lua_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("\\{b:03}"));
        }
    }
    out.push('\'');
    out
}

#[derive(Debug)]
pub struct Scripts {
    pub enqueue: Script,
    pub claim: Script,
    pub abandon: Script,
    pub complete: Script,
    pub fail: Script,
    pub release: Script,
    pub progress: Script,
    pub promote: Script,
    pub reclaim: Script,
    pub cancel: Script,
    pub retry_dead: Script,
    pub restore: Script,
    pub stats: Script,
    pub maintain: Script,
    /// Application channel publish with history (no prelude).
    pub publish: Script,
    /// Not prefixed by the prelude: the gateway membership touches no job keys.
    pub members: Script,
}

impl Scripts {
    pub fn new() -> Self {
        Self {
            enqueue: script(include_str!("lua/enqueue.lua")),
            claim: script(include_str!("lua/claim.lua")),
            abandon: script(include_str!("lua/abandon.lua")),
            complete: script(include_str!("lua/complete.lua")),
            fail: script(include_str!("lua/fail.lua")),
            release: script(include_str!("lua/release.lua")),
            progress: script(include_str!("lua/progress.lua")),
            promote: script(include_str!("lua/promote.lua")),
            reclaim: script(include_str!("lua/reclaim.lua")),
            cancel: script(include_str!("lua/cancel.lua")),
            retry_dead: script(include_str!("lua/retry_dead.lua")),
            restore: script(include_str!("lua/restore.lua")),
            stats: script(include_str!("lua/stats.lua")),
            maintain: script(include_str!("lua/maintain.lua")),
            publish: Script::new(include_str!("lua/publish.lua")),
            members: Script::new(include_str!("lua/members.lua")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every Lua file of `lua/`, read from the source tree (so a new script is covered without being listed).
    fn lua_files() -> Vec<(String, String)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/redis/lua");
        let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("a directory entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "lua"))
            .map(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{name}: {e}"));
                (name, text)
            })
            .collect();
        files.sort();
        assert!(
            files.len() >= 18,
            "expected the scripts under {}",
            dir.display()
        );
        files
    }

    #[test]
    fn the_group_is_named_only_by_the_rust_constant() {
        for (name, text) in lua_files() {
            for quoted in [
                format!("'{GROUP}'"),
                format!("\"{GROUP}\""),
                format!("[[{GROUP}]]"),
            ] {
                assert!(
                    !text.contains(&quoted),
                    "{name} spells the group as {quoted}: use GROUP (keys::GROUP, set by the loader)"
                );
            }
        }
        // The loaded text binds GROUP from the constant before anything else.
        let loaded = with_prelude("return GROUP");
        assert!(
            loaded.starts_with(&format!("local GROUP = '{GROUP}'\n")),
            "{loaded}"
        );
    }

    /// Does `text` use `name` as a Lua identifier (not inside a word, nor quoted)?
    fn uses_identifier(text: &str, name: &str) -> bool {
        let word =
            |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || "_'\"".contains(c));
        text.match_indices(name).any(|(i, _)| {
            !word(text[..i].chars().last()) && !word(text[i + name.len()..].chars().next())
        })
    }

    #[test]
    fn only_scripts_with_the_prelude_use_the_group() {
        // publish, members and missed are loaded without the prelude, so GROUP is not defined there: Redis would
        // refuse the global at run time.
        for (name, body) in [
            ("publish.lua", include_str!("lua/publish.lua")),
            ("members.lua", include_str!("lua/members.lua")),
            ("missed.lua", include_str!("lua/missed.lua")),
        ] {
            assert!(!uses_identifier(body, "GROUP"), "{name}");
        }
        assert!(uses_identifier(include_str!("lua/claim.lua"), "GROUP"));
        assert!(!uses_identifier(
            "redis.call('XREADGROUP', 'GROUP', g)",
            "GROUP"
        ));
    }

    #[test]
    fn names_are_quoted_safely() {
        assert_eq!(lua_string("workers"), "'workers'");
        assert_eq!(lua_string("a'b\\c d"), "'a\\039b\\092c\\032d'");
    }
}
