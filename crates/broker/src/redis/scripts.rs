//! The Lua scripts, each prefixed with the shared prelude (but `publish`, `members` and `missed`), and the layout
//! of their arguments. `redis::Script` sends EVALSHA and falls back to EVAL after a restart flushed the script
//! cache.
//!
//! The consumer group's name is [`GROUP`] and is written nowhere else: the loader puts `local GROUP = '…'` before
//! the prelude. It does so once, at load time, so each script's text (and SHA) stays the same for a build.
//!
//! Arguments are tied by name, not by position. Each script opens with its declaration block, one line per
//! argument and nothing else: `local jobs_key = KEYS[4]`, `local n = tonumber(ARGV[1])`, the priority streams as
//! `local streams = { KEYS[1], KEYS[2], KEYS[3] }`, and for a batch `local FIRST, EACH = 4, 6` (the items start at
//! `ARGV[FIRST]`, `EACH` values apiece). Past the block the script reaches KEYS only through those names, and ARGV
//! only through them or through `local <item's names> = unpack(ARGV, i, i + EACH - 1)`. On the Rust side, one
//! `call!` per script declares a struct whose fields are its KEYS then its ARGV (and an item struct for a batch);
//! the struct writes them in declaration order, and a call site names every field, so it depends on no position.
//! A unit test parses every script's block and requires the same names, in the same order, as the struct's.

use redis::{Cmd, Pipeline, Script, ScriptInvocation, ToRedisArgs};

use super::keys::GROUP;

const PRELUDE: &str = include_str!("lua/prelude.lua");

/// `body` as loaded: the group's name, the prelude, then the script.
fn with_prelude(body: &str) -> String {
    format!("local GROUP = {}\n{PRELUDE}\n{body}", lua_string(GROUP))
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

/// One script's argument layout as its `call!` struct writes it.
#[derive(Debug, Clone, Copy)]
// The names are there for the layout test: a build reads only the text and the key count.
#[cfg_attr(not(test), allow(dead_code))]
pub(super) struct Layout {
    pub file: &'static str,
    pub source: &'static str,
    /// Loaded after the prelude (and GROUP).
    pub prelude: bool,
    /// Field names of KEYS in order, with how many keys each writes (the priority streams: three).
    pub keys: &'static [(&'static str, usize)],
    pub argv: &'static [&'static str],
    /// One batch item's ARGV names, written `n` times after `argv`; empty for a script without items.
    pub each: &'static [&'static str],
}

impl Layout {
    /// The script's text as Redis gets it.
    pub(super) fn text(&self) -> String {
        if self.prelude {
            with_prelude(self.source)
        } else {
            self.source.to_owned()
        }
    }

    fn load(&self) -> Script {
        Script::new(&self.text())
    }

    fn key_count(&self) -> usize {
        self.keys.iter().map(|(_, n)| n).sum()
    }
}

/// How many KEYS a field of a call writes.
pub(super) trait Key: ToRedisArgs + Copy {
    const WIDTH: usize;
}

impl Key for &str {
    const WIDTH: usize = 1;
}

impl<const N: usize> Key for &[String; N] {
    const WIDTH: usize = N;
}

/// Where a call's KEYS and ARGV are written: a prepared EVALSHA, or an EVAL command in a pipeline.
pub(super) trait Sink {
    fn key(&mut self, key: impl ToRedisArgs);
    fn arg(&mut self, arg: impl ToRedisArgs);
}

impl Sink for ScriptInvocation<'_> {
    fn key(&mut self, key: impl ToRedisArgs) {
        ScriptInvocation::key(self, key);
    }
    fn arg(&mut self, arg: impl ToRedisArgs) {
        ScriptInvocation::arg(self, arg);
    }
}

impl Sink for Cmd {
    // EVAL takes the keys, then the arguments, in one list after their count.
    fn key(&mut self, key: impl ToRedisArgs) {
        Cmd::arg(self, key);
    }
    fn arg(&mut self, arg: impl ToRedisArgs) {
        Cmd::arg(self, arg);
    }
}

/// A call of one script, built by `call!`.
pub(super) trait Call {
    const LAYOUT: Layout;

    /// KEYS, then ARGV, in layout order.
    fn write(&self, out: &mut impl Sink);

    /// `EVAL <text> <numkeys> KEYS… ARGV…` as one command of `pipe`: for a script sent with other commands in
    /// one round trip (EVALSHA's fallback cannot run inside a pipeline).
    fn eval_in(&self, pipe: &mut Pipeline) {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(Self::LAYOUT.text()).arg(Self::LAYOUT.key_count());
        self.write(&mut cmd);
        pipe.add_command(cmd);
    }
}

/// A call of a script loaded in [`Scripts`].
pub(super) trait Loaded: Call {
    fn script(scripts: &Scripts) -> &Script;

    /// EVALSHA of this call's script with its KEYS and ARGV; a batch's items follow through their `push`.
    fn invoke<'s>(&self, scripts: &'s Scripts) -> ScriptInvocation<'s> {
        let mut inv = Self::script(scripts).prepare_invoke();
        self.write(&mut inv);
        inv
    }
}

/// Declares one script's call: a struct whose fields are the script's KEYS then its ARGV (every field of a key is a
/// `&str`, or `&[String; 3]` for the three priority streams), written in that order; for a batch, an item struct
/// whose fields are one item's ARGV; and the [`Layout`] naming them, which the unit test holds to the script's
/// declaration block. `script: field` names the [`Scripts`] field that loads it (none for a script sent by EVAL).
macro_rules! call {
    (
        $(#[$meta:meta])*
        $name:ident($file:literal, prelude: $prelude:literal $(, script: $field:ident)?) {
            keys { $($key:ident: $kty:ty),* $(,)? }
            argv { $($arg:ident: $aty:ty),* $(,)? }
            $(
                $(#[$imeta:meta])*
                each $item:ident { $($ifield:ident: $ity:ty),* $(,)? }
            )?
        }
    ) => {
        $(#[$meta])*
        pub(super) struct $name<'a> {
            $(pub $key: $kty,)*
            $(pub $arg: $aty,)*
        }

        impl<'a> Call for $name<'a> {
            const LAYOUT: Layout = Layout {
                file: $file,
                source: include_str!(concat!("lua/", $file)),
                prelude: $prelude,
                keys: &[$((stringify!($key), <$kty as Key>::WIDTH)),*],
                argv: &[$(stringify!($arg)),*],
                each: &[$($(stringify!($ifield)),*)?],
            };

            fn write(&self, out: &mut impl Sink) {
                $(out.key(self.$key);)*
                $(out.arg(&self.$arg);)*
            }
        }

        $(
            impl Loaded for $name<'_> {
                fn script(scripts: &Scripts) -> &Script {
                    &scripts.$field
                }
            }
        )?

        $(
            $(#[$imeta])*
            pub(super) struct $item<'a> {
                $(pub $ifield: $ity,)*
            }

            impl $item<'_> {
                /// Append this item's values to the call.
                pub(super) fn push(&self, inv: &mut ScriptInvocation<'_>) {
                    $(inv.arg(&self.$ifield);)*
                }
            }
        )?
    };
}

call! {
    /// lua/enqueue.lua: a batch of jobs into one queue.
    Enqueue("enqueue.lua", prelude: true, script: enqueue) {
        keys {
            streams: &'a [String; 3], jobs_key: &'a str, sched_key: &'a str, events_key: &'a str,
            queues_key: &'a str,
        }
        argv { queue: &'a str, n: usize, evmax: usize, idem_ttl_ms: u64 }
        /// One job: queued (`q`) or scheduled (`s`); `a1`, `a2`, `a3` as the script's header says.
        each EnqueueJob {
            mode: &'a str, p: usize, run_at: u64, idem: &'a str, x: &'a str, j: &'a str,
            a1: &'a str, a2: &'a str, a3: &'a str,
        }
    }
}

call! {
    /// lua/complete_claim.lua: complete a batch (`n` items), then lease up to `max` jobs of the same queue; `claim`
    /// is it with no items, `complete` with `max` 0.
    CompleteClaim("complete_claim.lua", prelude: true, script: complete_claim) {
        keys {
            streams: &'a [String; 3], jobs_key: &'a str, paused_key: &'a str, events_key: &'a str,
            claim_key: &'a str, done_key: &'a str,
        }
        argv {
            n: usize, evmax: usize, actor: &'a str, consumer: &'a str, max: usize, claim_ttl_ms: u64,
            drop_recorded: &'a str,
        }
        /// One completion, fenced by its lease (`p`, `eid`).
        each CompleteJob {
            p: usize, eid: &'a str, id: &'a str, att: u32, m: &'a str, result: &'a str,
        }
    }
}

call! {
    /// lua/abandon.lua
    Abandon("abandon.lua", prelude: true, script: abandon) {
        keys {
            streams: &'a [String; 3], jobs_key: &'a str, events_key: &'a str, claim_key: &'a str,
        }
        argv { evmax: usize, mark_ttl_ms: u64, actor: &'a str }
    }
}

call! {
    /// lua/fail.lua
    Fail("fail.lua", prelude: true, script: fail) {
        keys {
            streams: &'a [String; 3], jobs_key: &'a str, sched_key: &'a str, events_key: &'a str,
            dead_key: &'a str,
        }
        argv { n: usize, evmax: usize, deadmax: usize, actor: &'a str }
        /// One failed attempt, fenced by its lease; `run_at` 0 dead-letters it.
        each FailJob {
            p: usize, eid: &'a str, id: &'a str, att: u32, m: &'a str, err: &'a str, run_at: u64,
        }
    }
}

call! {
    /// lua/release.lua
    Release("release.lua", prelude: true, script: release) {
        keys { streams: &'a [String; 3], jobs_key: &'a str, events_key: &'a str }
        argv { n: usize, evmax: usize, actor: &'a str }
        /// One lease given back.
        each ReleaseJob { p: usize, eid: &'a str, id: &'a str, m: &'a str }
    }
}

call! {
    /// lua/progress.lua
    Progress("progress.lua", prelude: true, script: progress) {
        keys { stream_key: &'a str, events_key: &'a str }
        argv { evmax: usize, eid: &'a str, att: u32, m: &'a str, data: &'a str, actor: &'a str }
    }
}

call! {
    /// lua/promote.lua
    Promote("promote.lua", prelude: true, script: promote) {
        keys {
            streams: &'a [String; 3], jobs_key: &'a str, sched_key: &'a str, events_key: &'a str,
        }
        argv { max: usize, evmax: usize }
    }
}

call! {
    /// lua/reclaim.lua
    Reclaim("reclaim.lua", prelude: true, script: reclaim) {
        keys { streams: &'a [String; 3], jobs_key: &'a str, events_key: &'a str, dead_key: &'a str }
        argv { min_idle_ms: u64, max: usize, evmax: usize, deadmax: usize }
    }
}

call! {
    /// lua/cancel.lua
    Cancel("cancel.lua", prelude: true, script: cancel) {
        keys {
            streams: &'a [String; 3], jobs_key: &'a str, sched_key: &'a str, fin_key: &'a str,
            events_key: &'a str, done_key: &'a str, acked_key: &'a str,
        }
        argv {
            id: &'a str, evmax: usize, hint_p: &'a str, hint_eid: &'a str, by: &'a str,
            drop_recorded: &'a str,
        }
    }
}

call! {
    /// lua/retry_dead.lua
    RetryDead("retry_dead.lua", prelude: true, script: retry_dead) {
        keys { streams: &'a [String; 3], jobs_key: &'a str, dead_key: &'a str, events_key: &'a str }
        argv { id: &'a str, evmax: usize }
    }
}

call! {
    /// lua/restore.lua
    Restore("restore.lua", prelude: true, script: restore) {
        keys {
            streams: &'a [String; 3], jobs_key: &'a str, sched_key: &'a str, events_key: &'a str,
            queues_key: &'a str,
        }
        argv { queue: &'a str, evmax: usize, n: usize, actor: &'a str }
        /// One job to put back, as the durable record holds it.
        each RestoreJob {
            id: &'a str, ms: u64, mode: &'a str, p: usize, a: u32, x: u32, j: &'a str, m: &'a str,
            data: &'a str, run_at: &'a str, rec: &'a str,
        }
    }
}

call! {
    /// lua/stats.lua
    Stats("stats.lua", prelude: true, script: stats) {
        keys {
            streams: &'a [String; 3], sched_key: &'a str, dead_key: &'a str, paused_key: &'a str,
            acked_key: &'a str,
        }
        argv {}
    }
}

call! {
    /// lua/maintain.lua
    Maintain("maintain.lua", prelude: true, script: maintain) {
        keys {
            streams: &'a [String; 3], jobs_key: &'a str, fin_key: &'a str, done_key: &'a str,
            acked_key: &'a str,
        }
        argv { retention_ms: u64, batch: usize, recorded_below: &'a str }
    }
}

call! {
    /// lua/publish.lua: application channel publish with history (no prelude).
    Publish("publish.lua", prelude: false, script: publish) {
        keys { history_key: &'a str, epoch_key: &'a str }
        argv { channel: &'a str, payload: &'a str, size: usize, ttl_ms: u64, fresh_epoch: &'a str }
    }
}

call! {
    /// lua/members.lua: the gateway membership (no prelude: it touches no job keys). Every op sends all four
    /// values, the ones it does not use empty, so each keeps its position.
    Members("members.lua", prelude: false, script: members) {
        keys { members_key: &'a str, info_key: &'a str }
        argv { op: &'a str, node_id: &'a str, node_info: &'a str, ttl_ms: u64 }
    }
}

call! {
    /// lua/missed.lua: how far a history reaches back (no prelude). Sent by EVAL in the pipeline that reads the
    /// entries (see `RedisBroker::read_missed`): history reads are rare, and Redis caches the compiled script.
    HistoryReach("missed.lua", prelude: false) {
        keys { stream_key: &'a str, epoch_key: &'a str }
        argv { fresh_epoch: &'a str }
    }
}

/// The loaded scripts, one per [`Loaded`] call.
#[derive(Debug)]
pub struct Scripts {
    enqueue: Script,
    complete_claim: Script,
    abandon: Script,
    fail: Script,
    release: Script,
    progress: Script,
    promote: Script,
    reclaim: Script,
    cancel: Script,
    retry_dead: Script,
    restore: Script,
    stats: Script,
    maintain: Script,
    publish: Script,
    members: Script,
}

impl Scripts {
    pub fn new() -> Self {
        Self {
            enqueue: Enqueue::LAYOUT.load(),
            complete_claim: CompleteClaim::LAYOUT.load(),
            abandon: Abandon::LAYOUT.load(),
            fail: Fail::LAYOUT.load(),
            release: Release::LAYOUT.load(),
            progress: Progress::LAYOUT.load(),
            promote: Promote::LAYOUT.load(),
            reclaim: Reclaim::LAYOUT.load(),
            cancel: Cancel::LAYOUT.load(),
            retry_dead: RetryDead::LAYOUT.load(),
            restore: Restore::LAYOUT.load(),
            stats: Stats::LAYOUT.load(),
            maintain: Maintain::LAYOUT.load(),
            publish: Publish::LAYOUT.load(),
            members: Members::LAYOUT.load(),
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
            files.len() >= 17,
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

    /// Every call's layout.
    const ALL: [Layout; 16] = [
        Enqueue::LAYOUT,
        CompleteClaim::LAYOUT,
        Abandon::LAYOUT,
        Fail::LAYOUT,
        Release::LAYOUT,
        Progress::LAYOUT,
        Promote::LAYOUT,
        Reclaim::LAYOUT,
        Cancel::LAYOUT,
        RetryDead::LAYOUT,
        Restore::LAYOUT,
        Stats::LAYOUT,
        Maintain::LAYOUT,
        Publish::LAYOUT,
        Members::LAYOUT,
        HistoryReach::LAYOUT,
    ];

    #[test]
    fn only_scripts_with_the_prelude_use_the_group() {
        // A script loaded without the prelude has no GROUP: Redis would refuse the global at run time.
        for l in ALL.iter().filter(|l| !l.prelude) {
            assert!(!uses_identifier(l.source, "GROUP"), "{}", l.file);
        }
        assert!(uses_identifier(CompleteClaim::LAYOUT.source, "GROUP"));
        assert!(!uses_identifier(
            "redis.call('XREADGROUP', 'GROUP', g)",
            "GROUP"
        ));
    }

    /// What a script's declaration block says, and how the rest of it reads ARGV.
    #[derive(Debug, Default, PartialEq)]
    struct Declared {
        keys: Vec<(String, usize)>,
        argv: Vec<String>,
        /// `local FIRST, EACH = first, each`.
        items: Option<(usize, usize)>,
        /// The names of every `local … = unpack(ARGV, i, i + EACH - 1)`.
        unpacked: Vec<Vec<String>>,
    }

    /// `KEYS[n]` or `ARGV[n]`: the table and n.
    fn indexed(expr: &str) -> Option<(&str, usize)> {
        let (table, rest) = expr.split_once('[')?;
        let n = rest.strip_suffix(']')?.parse().ok()?;
        matches!(table, "KEYS" | "ARGV").then_some((table, n))
    }

    fn identifier(s: &str) -> bool {
        s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    }

    /// Parse a script's declaration block (see the module's doc), and check the rest reaches KEYS and ARGV only
    /// through it. Comments are left out first (no script has `--` inside a string).
    fn declared(source: &str) -> Result<Declared, String> {
        let mut d = Declared::default();
        let (mut next_key, mut next_arg) = (1, 1);
        let mut in_block = true;
        for (no, line) in source.lines().enumerate() {
            let no = no + 1;
            let code = line.split("--").next().unwrap_or("").trim();
            if code.is_empty() {
                continue;
            }
            let decl = code
                .strip_prefix("local ")
                .and_then(|rest| rest.split_once(" = "))
                .filter(|(_, rhs)| {
                    rhs.contains("KEYS")
                        || rhs.contains("ARGV")
                        || code.starts_with("local FIRST, EACH = ")
                });
            if in_block && let Some((lhs, rhs)) = decl {
                if lhs == "FIRST, EACH" {
                    let nums: Vec<usize> = rhs
                        .split(", ")
                        .map(|n| n.parse().map_err(|_| format!("line {no}: {code}")))
                        .collect::<Result<_, _>>()?;
                    let &[first, each] = nums.as_slice() else {
                        return Err(format!("line {no}: {code}"));
                    };
                    d.items = Some((first, each));
                    continue;
                }
                if !identifier(lhs) {
                    return Err(format!("line {no}: one name per declaration: {code}"));
                }
                let rhs = rhs
                    .strip_prefix("tonumber(")
                    .and_then(|r| r.strip_suffix(')'))
                    .unwrap_or(rhs);
                let exprs: Vec<&str> =
                    match rhs.strip_prefix("{ ").and_then(|r| r.strip_suffix(" }")) {
                        Some(list) => list.split(", ").collect(),
                        None => vec![rhs],
                    };
                let mut table = None;
                for e in &exprs {
                    let (t, n) = indexed(e)
                        .ok_or_else(|| format!("line {no}: not KEYS[n] or ARGV[n]: {code}"))?;
                    if table.is_some_and(|x| x != t) {
                        return Err(format!("line {no}: KEYS and ARGV mixed: {code}"));
                    }
                    table = Some(t);
                    let next = if t == "KEYS" {
                        &mut next_key
                    } else {
                        &mut next_arg
                    };
                    if n != *next {
                        return Err(format!(
                            "line {no}: {t}[{n}] where {t}[{next}] was due: {code}"
                        ));
                    }
                    *next += 1;
                }
                match table {
                    Some("KEYS") => d.keys.push((lhs.to_owned(), exprs.len())),
                    _ if exprs.len() == 1 => d.argv.push(lhs.to_owned()),
                    _ => {
                        return Err(format!(
                            "line {no}: ARGV values are declared one by one: {code}"
                        ));
                    }
                }
                continue;
            }
            in_block = false;
            if code.contains("KEYS") {
                return Err(format!(
                    "line {no}: KEYS outside the declaration block: {code}"
                ));
            }
            if code.contains("ARGV") {
                let names = code
                    .strip_prefix("local ")
                    .and_then(|c| c.strip_suffix(" = unpack(ARGV, i, i + EACH - 1)"))
                    .ok_or_else(|| {
                        format!("line {no}: ARGV outside the declaration block: {code}")
                    })?;
                let names: Vec<String> = names.split(", ").map(str::to_owned).collect();
                if !names.iter().all(|n| identifier(n)) {
                    return Err(format!("line {no}: {code}"));
                }
                d.unpacked.push(names);
            }
        }
        Ok(d)
    }

    /// A script's declarations against its call's layout.
    fn check(layout: &Layout) -> Result<(), String> {
        let d = declared(layout.source)?;
        let keys: Vec<(String, usize)> = layout
            .keys
            .iter()
            .map(|(k, n)| ((*k).to_owned(), *n))
            .collect();
        if d.keys != keys {
            return Err(format!(
                "KEYS declared {:?}, the Rust call writes {keys:?}",
                d.keys
            ));
        }
        if d.argv != layout.argv {
            return Err(format!(
                "ARGV declared {:?}, the Rust call writes {:?}",
                d.argv, layout.argv
            ));
        }
        let mut names: Vec<&String> = d.keys.iter().map(|(k, _)| k).chain(&d.argv).collect();
        names.sort();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err(format!("a name is declared twice: {names:?}"));
        }
        if layout.each.is_empty() {
            if d.items.is_some() || !d.unpacked.is_empty() {
                return Err("items declared, and the Rust call writes none".into());
            }
            return Ok(());
        }
        let want = (layout.argv.len() + 1, layout.each.len());
        if d.items != Some(want) {
            return Err(format!(
                "FIRST, EACH declared {:?}, the Rust call writes items at {want:?}",
                d.items
            ));
        }
        if d.unpacked.is_empty() {
            return Err("the items are never read".into());
        }
        for names in &d.unpacked {
            // A read may stop early (Lua drops the values past its names), never differ.
            if names.len() > layout.each.len() || layout.each[..names.len()] != names[..] {
                return Err(format!(
                    "an item read as {names:?}, the Rust call writes {:?}",
                    layout.each
                ));
            }
        }
        Ok(())
    }

    #[test]
    fn every_script_declares_the_layout_its_call_writes() {
        for l in ALL {
            if let Err(e) = check(&l) {
                panic!("{}: {e}", l.file);
            }
        }
        // Every script has a call, and the prelude reads no argument (each script declares its own).
        let mut files: Vec<String> = ALL.iter().map(|l| l.file.to_owned()).collect();
        files.push("prelude.lua".into());
        files.sort();
        let on_disk: Vec<String> = lua_files().into_iter().map(|(name, _)| name).collect();
        assert_eq!(files, on_disk);
        assert_eq!(declared(PRELUDE), Ok(Declared::default()));
    }

    #[test]
    fn layout_mismatches_are_caught() {
        let layout = |source: &'static str| Layout {
            file: "t.lua",
            source,
            prelude: true,
            keys: &[("streams", 3), ("jobs_key", 1)],
            argv: &["n", "actor"],
            each: &["p", "eid"],
        };
        let good = "-- header\nlocal streams = { KEYS[1], KEYS[2], KEYS[3] }\nlocal jobs_key = KEYS[4]\n\
                    local n = tonumber(ARGV[1])\nlocal actor = ARGV[2] -- who\nlocal FIRST, EACH = 3, 2\n\
                    local i = FIRST\nlocal p = unpack(ARGV, i, i + EACH - 1)\n\
                    local p, eid = unpack(ARGV, i, i + EACH - 1)\nreturn jobs_key\n";
        assert_eq!(check(&layout(good)), Ok(()));
        for (bad, why) in [
            (
                good.replace("local actor = ARGV[2]", "local who = ARGV[2]"),
                "ARGV declared",
            ),
            (
                good.replace("KEYS[4]", "KEYS[5]"),
                "KEYS[5] where KEYS[4] was due",
            ),
            (good.replace("3, 2", "3, 3"), "FIRST, EACH declared"),
            (
                good.replace("return jobs_key", "return KEYS[4]"),
                "KEYS outside",
            ),
            (
                good.replace("return jobs_key", "return ARGV[2]"),
                "ARGV outside",
            ),
            (
                good.replace("return jobs_key", "return ARGV[i + 2]"),
                "ARGV outside",
            ),
            (
                good.replace("local p, eid =", "local eid, p ="),
                "an item read as",
            ),
            (
                good.replace("KEYS[2], KEYS[3] }", "KEYS[2] }"),
                "KEYS[4] where KEYS[3] was due",
            ),
            (
                good.replace("local jobs_key = KEYS[4]\n", ""),
                "KEYS declared",
            ),
            // A declaration after the block has ended is outside it.
            (
                good.replace(
                    "local n = tonumber(ARGV[1])",
                    "local x = 1\nlocal n = tonumber(ARGV[1])",
                ),
                "ARGV outside",
            ),
        ] {
            let e = check(&layout(Box::leak(bad.into_boxed_str()))).unwrap_err();
            assert!(e.contains(why), "{why}: {e}");
        }
    }

    #[test]
    fn names_are_quoted_safely() {
        assert_eq!(lua_string("workers"), "'workers'");
        assert_eq!(lua_string("a'b\\c d"), "'a\\039b\\092c\\032d'");
    }
}
